#!/usr/bin/env python
"""train.py — distributed ArcFace training.

NOT IMPLEMENTED YET: this entry point is filled by the training issue. Run with --help.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a face-embedding model with tf.distribute. "
        "NOT IMPLEMENTED YET (tracked by the training issue)."
    )
    parser.parse_args(argv)
    print("train.py is not implemented yet; see README.md 'Status'.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
