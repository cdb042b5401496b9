#!/usr/bin/env python
"""Train a face-embedding model: ``python train.py --help`` shows real examples."""

import sys

from facerec_tf.training.run import main

if __name__ == "__main__":
    sys.exit(main())
