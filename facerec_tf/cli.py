"""What the command-line scripts share (no TensorFlow import here): exit codes, the ``--set``
and ``--verbose`` options, and quiet TensorFlow start-up.

Quiet by default: a script calls :func:`quiet_tensorflow` before anything imports TensorFlow.
Unless the user asked for TensorFlow's own lines (``--verbose``, or ``TF_CPP_MIN_LOG_LEVEL``
already set in the environment), it sets ``TF_CPP_MIN_LOG_LEVEL=3`` (TensorFlow's C++ log
lines off), drops the log lines TensorFlow's libraries print while ``import tensorflow`` runs,
before that setting takes effect (``WARNING: All log messages before absl::InitializeLog()
...``, ``I0000 ... oneDNN custom operations are on ...``: they are written to file descriptor
2 by C++, so they are filtered there, for the duration of the import only; every other line
written then is passed on), and sets TensorFlow's and absl's Python loggers to ``ERROR``.
TensorFlow's errors still reach the user: they are raised as Python exceptions, which the
scripts print.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

# Lines C++ logging writes: glog/absl "I0000 00:00:1796316182.224424    5517 port.cc:153] ...",
# absl's pre-initialisation notice, and the second line of TensorFlow's CPU-feature notice.
TF_LOG_LINE = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
)


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


def add_set_option(parser: argparse.ArgumentParser, dest: str = "overrides") -> None:
    """``--set SECTION.KEY=VALUE [SECTION.KEY=VALUE ...]``, repeatable: all pairs, in order."""
    parser.add_argument(
        "--set",
        dest=dest,
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override config fields, e.g. --set optimizer.weight_decay=1e-4 data.batch_size=64 "
        "(several pairs after one --set, and --set repeatable)",
    )


VERBOSE_HELP = "also show TensorFlow's and onnxruntime's own log lines"


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def quiet_tensorflow(verbose: bool = False) -> bool:
    """Make TensorFlow quiet for this process (see the module docstring); call it before
    TensorFlow is imported. Does nothing when ``verbose`` or when the environment already sets
    ``TF_CPP_MIN_LOG_LEVEL``. Returns whether it did anything."""
    if verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietImport())
    return True


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` with its C++ start-up lines filtered out."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; find the real spec without this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def quiet_exec(module) -> None:
            with filtered_stderr(TF_LOG_LINE):
                exec_module(module)

        loader.exec_module = quiet_exec  # type: ignore[method-assign]
        return spec


@contextlib.contextmanager
def filtered_stderr(drop: re.Pattern[bytes]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 (by Python or C) while the block runs,
    then pass on every line that ``drop`` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp if not drop.match(line))
            if kept:
                os.write(2, kept)
