#!/usr/bin/env python
"""Train a face-embedding model: ``python train.py --help`` shows real examples.

Besides the options ``--help`` lists: ``--set`` takes several ``SECTION.KEY=VALUE`` pairs
(``--set a.b=1 c.d=2``) as well as one per flag, and ``--verbose`` keeps TensorFlow's own log
lines (hidden by default unless ``TF_CPP_MIN_LOG_LEVEL`` is set).
"""

import sys

from facerec_tf.cli import quiet_tensorflow, split_script_args

if __name__ == "__main__":
    argv, verbose = split_script_args(sys.argv[1:])
    quiet_tensorflow(verbose)
    from facerec_tf.training.run import main

    sys.exit(main(argv))
