#!/usr/bin/env python
"""Train a face-embedding model: ``python train.py --help`` shows real examples."""

import sys

from facerec_tf.cli import quiet_tensorflow

if __name__ == "__main__":
    # before TensorFlow is imported: its own log lines only with --verbose
    quiet_tensorflow("--verbose" in sys.argv[1:])
    from facerec_tf.training.run import main

    sys.exit(main(sys.argv[1:]))
