"""Shared pytest fixtures.

Real data lives in ``../shared/data`` beside the checkout (read-only, never copied into the
repo). Tests that need it use the fixtures below, which skip with a reason when it is absent.
Set ``FACEREC_SHARED_DATA`` to point somewhere else.
"""

from __future__ import annotations

import os
import pathlib

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
def yale_dir() -> pathlib.Path:
    """``../shared/data/faces/yale``: 165 real grey face photographs, 15 identities."""
    return _require(SHARED_DATA / "faces" / "yale")


def pytest_collection_modifyitems(config, items):
    """Run the ``slow`` tests first: with ``pytest -n 2`` a long test collected last would
    otherwise run alone at the end while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
