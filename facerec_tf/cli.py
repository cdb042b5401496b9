"""Shared exit-code handling of the command-line scripts (no TensorFlow import here)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_main(
    body: Callable[[], int], *, debug: bool, bad_input: tuple[type[BaseException], ...]
) -> int:
    """Run ``body``; map errors to exit codes: ``bad_input`` -> 2 (message only), Ctrl-C -> 130,
    anything else -> 1. ``debug`` re-raises for a traceback."""
    try:
        return body()
    except bad_input as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for a traceback)", file=sys.stderr)
        return 1
