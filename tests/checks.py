"""Run a check script of this folder in a fresh Python process and return its JSON result.

Distributed checks need their own process: logical CPU devices must be configured before
TensorFlow starts, and one process cannot hold MirroredStrategies of different sizes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_check(script: str, *args, timeout: float = 300) -> dict:
    """``python tests/<script> <args>``; its last stdout line is a JSON object."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
