"""Shared pytest fixtures.

Real data lives in ``../shared/data`` beside the checkout (read-only, never copied into the
repo). Tests that need it use the fixtures below, which skip with a reason when it is absent.
Set ``FACEREC_SHARED_DATA`` to point somewhere else.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("FACEREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"test data not found at {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def rec_dir() -> pathlib.Path:
    """``../shared/data/rec``: RecordIO and .bin fixtures written by MXNet 1.9.1."""
    return _require(SHARED_DATA / "rec")


@pytest.fixture(scope="session")
def arcface_torch_dir() -> pathlib.Path:
    """``../shared/data/arcface_torch``: MobileFaceNets written by arcface_torch itself."""
    return _require(SHARED_DATA / "arcface_torch")


@pytest.fixture(scope="session")
def yale_dir() -> pathlib.Path:
    """``../shared/data/faces/yale``: 165 real grey face photographs, 15 identities."""
    return _require(SHARED_DATA / "faces" / "yale")


def pytest_collection_modifyitems(config, items):
    """Run the ``slow`` tests first: with ``pytest -n 2`` a long test collected last would
    otherwise run alone at the end while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# ----------------------------------------------------------------------------------------------
# Files written by torch (tests/torch_twin.py in a subprocess; torch is never imported here)

TORCH_TWIN = ROOT / "tests" / "torch_twin.py"


def torch_python() -> str:
    """The Python that runs ``tests/torch_twin.py``: ``FACEREC_TORCH_PYTHON`` or this one."""
    return os.environ.get("FACEREC_TORCH_PYTHON") or sys.executable


@functools.cache
def _torch_import_error(python: str) -> str | None:
    """Why ``python`` cannot import torch (its last stderr line), or None; asked once per
    interpreter and test process."""
    probe = subprocess.run(
        [python, "-c", "import torch"], capture_output=True, text=True, check=False, timeout=300
    )
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or [""])[-1]


def require_torch_python() -> str:
    """:func:`torch_python`, or skip the test with the reason when it cannot import torch."""
    python = torch_python()
    error = _torch_import_error(python)
    if error is not None:
        pytest.skip(
            f"torch is not importable by {python} (install the test extra `.[torch-tests]` "
            "or set FACEREC_TORCH_PYTHON): " + error
        )
    return python


@pytest.fixture(scope="session")
def torch_fixture(tmp_path_factory):
    """Factory ``torch_fixture(arch, embedding=512, onnx=True)`` -> dict of paths.

    Runs ``tests/torch_twin.py --arch ARCH`` once per argument set and run (a few SGD steps
    on the real probe faces of ``../shared/data/arcface_torch`` when present, else on random
    images) and returns ``{"pth", "onnx", "probe", "eval", "train", "json"}``. Skips with a
    reason when that Python cannot import torch.
    """
    python = require_torch_python()
    # one folder per argument set, shared by the pytest-xdist workers of this run
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    faces = SHARED_DATA / "arcface_torch" / "probe_faces.npy"

    def make(arch: str, embedding: int = 512, onnx: bool = True) -> dict[str, pathlib.Path]:
        out = base / f"torch_{arch}_e{embedding}{'_onnx' if onnx else ''}"
        out.mkdir(parents=True, exist_ok=True)
        stem = out / arch
        paths = {
            "pth": stem.with_suffix(".pth"),
            "json": stem.with_suffix(".json"),
            "probe": out / f"{arch}_probe.npy",
            "eval": out / f"{arch}_eval.npy",
            "train": out / f"{arch}_train.npy",
        }
        if onnx:
            paths["onnx"] = stem.with_suffix(".onnx")
        with open(out / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker may be writing it
            if not (out / "done").exists():
                cmd = [python, str(TORCH_TWIN), "--arch", arch, "--out", str(out)]
                cmd += ["--embedding", str(embedding), "--threads", "1"]
                cmd += [] if onnx else ["--no-onnx"]
                cmd += ["--faces", str(faces)] if faces.exists() else []
                run = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
                (out / "done").touch()
        return paths

    return make
