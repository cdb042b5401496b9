#!/usr/bin/env python
"""evaluate.py — verification of a face-embedding model (insightface-exact metrics).

NOT IMPLEMENTED YET: this entry point is filled by the evaluation issue. Run with --help.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate a face-embedding model on insightface .bin verification sets. "
        "NOT IMPLEMENTED YET (tracked by the evaluation/export issue)."
    )
    parser.parse_args(argv)
    print("evaluate.py is not implemented yet; see README.md 'Status'.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
