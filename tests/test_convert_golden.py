"""The converter's output, byte for byte, against hashes recorded from an earlier converter.

``tests/data/convert_golden.json`` holds the sha256 of every shard and of the manifest (with
the input path replaced by ``<input>``) for the MXNet-written sets in ``../shared/data/rec``,
a JPEG image-folder tree and a 1,500-record ``.rec`` built from their payloads, under several
shard counts, seeds and options. Any change to the bytes the converter writes fails here.

Re-record only on purpose (a deliberate format change):
``python tests/test_convert_golden.py --record /path/to/shared/data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

import pytest

from facerec_tf.data.convert import convert
from facerec_tf.data.recordio import RecDataset
from facerec_tf.data.recordio_writer import write_insightface

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "convert_golden.json"

# name -> (input, options); inputs: a folder of ../shared/data/rec, or "tree" / "big" (built)
CASES: dict[str, tuple[str, dict]] = {
    "yale112-1": ("yale112", {"num_shards": 1}),
    "yale112-4": ("yale112", {"num_shards": 4}),
    "yale112-3-seed7-workers2": ("yale112", {"num_shards": 3, "seed": 7, "workers": 2}),
    "yale112-filter11-prefix": (
        "yale112",
        {"num_shards": 2, "images_filter": 11, "prefix": "val", "layout": "insightface"},
    ),
    "yale112-shardsize": ("yale112", {"shard_size_mb": 0.5, "seed": 3}),
    "flat-2": ("yale112_flat", {"num_shards": 2}),
    "flat-5-seed3-filter11": ("yale112_flat", {"num_shards": 5, "seed": 3, "images_filter": 11}),
    "flat-mixed": ("yale112_flat", {"num_shards": 1, "seed": 1, "allow_mixed_sizes": True}),
    "split-1": ("split_record", {"num_shards": 1}),
    "split-2-seed1": ("split_record", {"num_shards": 2, "seed": 1}),
    "tree-3": ("tree", {"num_shards": 3, "seed": 5}),
    "tree-1-filter10": ("tree", {"num_shards": 1, "images_filter": 10}),
    "big-3": ("big", {"num_shards": 3, "seed": 11}),
    "big-2-workers2": ("big", {"num_shards": 2, "workers": 2}),
}


def build_tree(rec_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """yale112's JPEG payloads as an identity-per-folder tree (passed through byte for byte)."""
    with RecDataset(rec_dir / "yale112") as ds:
        for key in ds.image_keys.tolist():
            payload, label = ds.read_image(key)
            d = root / f"id{label:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{key:03d}.jpg").write_bytes(payload)
    return root


def build_big(rec_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """1,500 records (more than one read batch per shard) cycling yale112's payloads."""
    with RecDataset(rec_dir / "yale112") as ds:
        images = [ds.read_image(k) for k in ds.image_keys.tolist()]
    big = [(images[i % len(images)][0], i // 30) for i in range(1500)]
    write_insightface(root, big, num_classes=50)
    return root


def run_case(rec_dir: pathlib.Path, tmp: pathlib.Path, name: str) -> dict[str, str]:
    """``{file name: sha256}`` of one case's output (the manifest with its input path hidden)."""
    src_name, options = CASES[name]
    if src_name == "tree":
        src = build_tree(rec_dir, tmp / "tree")
    elif src_name == "big":
        src = build_big(rec_dir, tmp / "big")
    else:
        src = rec_dir / src_name
    out = tmp / "out"
    manifest = convert(src, out, progress=False, **options)
    hashes = {}
    for f in sorted(os.listdir(out)):
        data = (out / f).read_bytes()
        if f == "manifest.json":
            data = data.replace(json.dumps(manifest["source"]["path"])[1:-1].encode(), b"<input>")
        hashes[f] = hashlib.sha256(data).hexdigest()
    return hashes


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_matches_recorded_hashes(rec_dir, tmp_path, name):
    expected = json.loads(GOLDEN.read_text())[name]
    assert run_case(rec_dir, tmp_path, name) == expected


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        sys.exit("usage: python tests/test_convert_golden.py --record SHARED_DATA")
    rec = pathlib.Path(sys.argv[2]) / "rec"
    golden = {}
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as d:
            golden[case] = run_case(rec, pathlib.Path(d), case)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(golden)} cases in {GOLDEN}")
