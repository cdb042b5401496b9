"""Tests of the RecordIO writer, the TFRecord framing / Example codec and the converter.

Real data: ``../shared/data/rec`` (MXNet-written fixtures) and ``../shared/data/faces/yale``
through the conftest fixtures (skipped when absent). Synthetic ``.rec`` files are written in
``tmp_path`` with :mod:`facerec_tf.data.recordio_writer`. The converter CLI is run in
subprocesses where the brief asks for it (it does not import TensorFlow, so each run costs
well under a second); TensorFlow is imported by one test only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from facerec_tf.data import schema, tfrecord
from facerec_tf.data.convert import (
    JpegInfo,
    ReencodeWarning,
    convert,
    jpeg_info,
    load_manifest,
    verify_output,
)
from facerec_tf.data.recordio import RecDataset, RecordIOReader
from facerec_tf.data.recordio_writer import (
    encode_frames,
    pack_record,
    synthetic_faces,
    write_flat,
    write_insightface,
    write_rec,
)
from facerec_tf.data.tfrecord import (
    TFRecordWriter,
    decode_example,
    encode_example,
    frame_record,
    iter_records,
    masked_crc32c,
    parse_example,
    read_shard,
    verify_shard,
)
from facerec_tf.errors import ImageError, RecordIOError, TFRecordError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "convert_rec_to_tfrecord.py"


# ----------------------------------------------------------------------------------------------
# helpers


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def examples(out: pathlib.Path) -> list[tuple[str, int, int, bytes]]:
    """``(shard, key, label, image)`` of every example, in shard order."""
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    rows = []
    for entry in manifest["shards"]:
        for ex in read_shard(out / entry["name"]):
            rows.append((entry["name"], ex.key, ex.label, ex.image))
    return rows


def converter_files(out: pathlib.Path) -> list[str]:
    """Names of every converter-owned file left in ``out`` (shards, temps, manifest)."""
    if not out.exists():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name.endswith(".tfrecord") or ".tmp-" in p.name or p.name == schema.MANIFEST_NAME
    )


def tree_bytes(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def copy_fixture(rec_dir: pathlib.Path, name: str, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("train.rec", "train.idx", "property"):
        if (rec_dir / name / f).exists():
            (dst / f).write_bytes((rec_dir / name / f).read_bytes())
            (dst / f).chmod(0o644)
    return dst


def read_idx(path: pathlib.Path) -> dict[int, int]:
    return {int(k): int(o) for k, o in (ln.split("\t") for ln in path.read_text().splitlines())}


def patch(path: pathlib.Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def record_offsets(shard: pathlib.Path) -> list[int]:
    """Byte offset of every record of a (well-formed) TFRecord file."""
    raw = shard.read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        out.append(pos)
        (n,) = struct.unpack_from("<Q", raw, pos)
        pos += 16 + n
    return out


@pytest.fixture(scope="module")
def fixture_manifest(rec_dir):
    return json.loads((rec_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def yale_out(rec_dir, tmp_path_factory):
    """yale112 converted once into 4 shards (seed 0), shared by read-only tests."""
    out = tmp_path_factory.mktemp("yale_out")
    convert(rec_dir / "yale112", out, num_shards=4, seed=0, progress=False)
    return out


def tiny_rec(folder: pathlib.Path, counts: list[int], *, layout: str = "insightface", size=16):
    """A synthetic dataset with ``counts[c]`` images of class ``c``."""
    n = sum(counts)
    jpegs = [j for j, _ in synthetic_faces(n, 1, size=size, variants=4)]
    labels = [c for c, k in enumerate(counts) for _ in range(k)]
    images = list(zip(jpegs, labels))
    if layout == "insightface":
        write_insightface(folder, images, num_classes=len(counts), image_size=(size, size))
    else:
        write_flat(folder, images)
    return folder


# ----------------------------------------------------------------------------------------------
# RecordIO writer


@pytest.mark.parametrize("name", ["yale112", "yale112_flat", "split_record"])
def test_writer_reproduces_mxnet_fixtures_byte_for_byte(rec_dir, tmp_path, name):
    src = rec_dir / name
    with RecDataset(src) as ds:
        images = [ds.read_image(k) for k in ds.image_keys.tolist()]
        layout = ds.layout
    if layout == "insightface":
        write_insightface(tmp_path, images, num_classes=15, image_size=(112, 112))
        files = ["train.rec", "train.idx", "property"]
    else:
        write_flat(tmp_path, images)
        files = ["train.rec", "train.idx"]
    for f in files:
        assert (tmp_path / f).read_bytes() == (src / f).read_bytes(), f


def test_writer_split_and_streaming_header0(tmp_path):
    magic = struct.pack("<I", 0xCED7230A)
    record = pack_record(b"abcd" + magic + b"ef" + magic + magic + b"gh", label=2.0, id=7)
    frames = encode_frames(record)
    # start chunk, middle chunk (between two magic words), empty middle chunk, end chunk
    assert frames.count(magic) == 4
    rec, _ = write_rec(tmp_path / "raw", {5: record})
    with RecordIOReader(rec) as reader:
        assert reader.read_raw(5) == record
    # header0 is written as a placeholder and patched: labels must be right at the end
    write_insightface(tmp_path / "if", ((b"x", c) for c in (0, 0, 2)), num_classes=4)
    with RecDataset(tmp_path / "if") as ds:
        assert ds.header0 == (4, 8)
        assert ds.identity_ranges.tolist() == [[1, 3], [3, 3], [3, 4], [4, 4]]
    with pytest.raises(ValueError, match="non-decreasing"):
        write_insightface(tmp_path / "bad", [(b"x", 1), (b"y", 0)])


# ----------------------------------------------------------------------------------------------
# TFRecord framing and Example codec


def test_example_and_framing_match_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    cases = [
        (b"\xff\xd8" + bytes(range(256)) * 3, 0, 0),
        (b"\xff\xd8" + b"x" * 20000, 85741, 5_822_653),
        (b"\xff\xd8", 2**40, 2**63 - 1),
        (b"\xff\xd8" + b"y" * 127, 3, -1),
    ]
    path = tmp_path / "t.tfrecord"
    with TFRecordWriter(path) as w:
        for image, label, key in cases:
            data = encode_example(image, label, key)
            ref = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        schema.IMAGE_KEY: tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[image])
                        ),
                        schema.LABEL_KEY: tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[label])
                        ),
                        schema.SOURCE_KEY: tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[key])
                        ),
                    }
                )
            )
            assert data == ref.SerializeToString(deterministic=True)
            parsed = tf.train.Example.FromString(data)
            assert parsed == ref
            ours = parse_example(data)
            assert ours[schema.IMAGE_KEY] == ("bytes", [image])
            assert ours[schema.LABEL_KEY] == ("int64", [label])
            assert ours[schema.SOURCE_KEY] == ("int64", [key])
            tf_parsed = tf.io.parse_single_example(data, schema.feature_spec())
            assert tf_parsed[schema.IMAGE_KEY].numpy() == image
            assert int(tf_parsed[schema.LABEL_KEY]) == label
            assert int(tf_parsed[schema.SOURCE_KEY]) == key
            # protobuf's own (non-deterministic-order) encoding parses the same with our reader
            assert parse_example(ref.SerializeToString()) == ours
            w.write(data)
    ref_path = tmp_path / "ref.tfrecord"
    with tf.io.TFRecordWriter(str(ref_path)) as tw:
        for image, label, key in cases:
            tw.write(encode_example(image, label, key))
    assert path.read_bytes() == ref_path.read_bytes()
    got = [
        (r[schema.IMAGE_KEY].numpy(), int(r[schema.LABEL_KEY]), int(r[schema.SOURCE_KEY]))
        for r in tf.data.TFRecordDataset(str(path)).map(
            lambda x: tf.io.parse_single_example(x, schema.feature_spec())
        )
    ]
    assert got == cases
    stats = verify_shard(path, 4, sha(path.read_bytes()))
    assert (stats.num_records, stats.label_min, stats.label_max) == (4, 0, 2**40)


def test_batched_and_background_writing_give_the_same_bytes(tmp_path):
    """``write_examples`` (the converter's path) and the helper-thread writer produce exactly
    the bytes of ``write(encode_example(...))``, which the test above checks against TF."""
    rng = np.random.default_rng(0)
    sizes = [0, 1, 127, 128, 16383, 16384, 300000, *rng.integers(2, 9000, 400).tolist()]
    images = [b"\xff\xd8" + rng.bytes(n) for n in sizes]
    labels = [0, 1, 127, 128, 2**40, 85741, -1, *rng.integers(0, 2**20, 400).tolist()]
    keys = [0, 16383, 16384, 2**63 - 1, -5, 7, 9, *rng.integers(0, 2**33, 400).tolist()]
    with TFRecordWriter(tmp_path / "ref.tfrecord") as w:
        for image, label, key in zip(images, labels, keys):
            w.write(encode_example(image, label, key))
    ref = (tmp_path / "ref.tfrecord").read_bytes()
    for background in (False, True):
        path = tmp_path / f"batched-{background}.tfrecord"
        w = TFRecordWriter(path, block_size=64 << 10, background=background)
        for i in range(0, len(images), 37):
            w.write_examples(images[i : i + 37], labels[i : i + 37], keys[i : i + 37])
        digest = w.sha256  # waits for the helper thread
        w.close(fsync=True)
        assert path.read_bytes() == ref
        assert digest == w.sha256 == sha(ref) and w.bytes == len(ref) and w.num_records == 407


def test_background_writer_reraises_write_errors(tmp_path, monkeypatch):
    w = TFRecordWriter(tmp_path / "x.tfrecord", block_size=1024, background=True)
    real_write = os.write

    def full_disk(fd, data):
        if fd == w._fd:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(tfrecord.os, "write", full_disk)
    w.write_examples([b"\xff\xd8" + b"x" * 4000] * 3, [1, 2, 3], [1, 2, 3])
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert w._thread is None  # the helper thread was stopped
    assert w._f.closed


def test_masked_crc_and_decode_errors(tmp_path):
    assert masked_crc32c(b"") == 0xA282EAD8  # crc32c("") == 0, then masked
    assert frame_record(b"abc")[:8] == struct.pack("<Q", 3)
    ok = encode_example(b"\xff\xd8abc", 1, 2)
    assert decode_example(ok) == (b"\xff\xd8abc", 1, 2)
    with pytest.raises(TFRecordError, match="label 7 is out of range") as e:
        decode_example(encode_example(b"\xff\xd8abc", 7, 2), num_classes=5)
    assert e.value.key == schema.LABEL_KEY
    with pytest.raises(TFRecordError, match=r"not a valid tf\.train\.Example"):
        decode_example(ok[:-3], path="x", offset=12, index=1)
    with pytest.raises(TFRecordError, match="feature is missing") as e:
        decode_example(b"")
    assert e.value.key == schema.IMAGE_KEY
    with pytest.raises(TFRecordError, match="JPEG SOI"):
        decode_example(encode_example(b"GIF89a", 0, 0))


# ----------------------------------------------------------------------------------------------
# JPEG header parsing


def _jpeg_with_sof(sof: int = 0xC0, precision=8, h=112, w=96, comps=3) -> bytes:
    seg = struct.pack(">BHHB", precision, h, w, comps) + b"\x01\x22\x00" * comps
    app = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    return b"\xff\xd8" + app + bytes((0xFF, sof)) + struct.pack(">H", 2 + len(seg)) + seg


def test_jpeg_info_reads_sof_without_decoding(rec_dir):
    info = jpeg_info(_jpeg_with_sof())
    assert info == JpegInfo(112, 96, 3, 8, 0xC0, 20) and info.supported
    assert jpeg_info(_jpeg_with_sof(0xC2, comps=1)).supported  # progressive, grey
    assert not jpeg_info(_jpeg_with_sof(0xC3)).supported  # lossless
    assert not jpeg_info(_jpeg_with_sof(precision=12)).supported
    assert not jpeg_info(_jpeg_with_sof(comps=4)).supported
    fill = _jpeg_with_sof().replace(b"\xff\xc0", b"\xff\xff\xff\xc0")  # fill bytes are legal
    assert jpeg_info(fill).height == 112
    with RecDataset(rec_dir / "yale112") as ds:
        payload, _ = ds.read_image(1)
    assert jpeg_info(payload)[:3] == (112, 112, 3)


def test_jpeg_info_header_cache_gives_the_cold_answer(rec_dir):
    """jpeg_info remembers the last header (from the first non-APPn/COM segment to the SOF's
    end); a later image sharing those bytes gets the answer a fresh parse gives, errors
    included."""
    from facerec_tf.data import convert as convert_module

    base = _jpeg_with_sof()
    com = [b"\xff\xd8\xff\xfe" + struct.pack(">H", 2 + n) + b"c" * n + base[2:] for n in (0, 5, 77)]
    bad_app = b"\xff\xd8\xff\xe1\xff\xf0" + base[2:]  # APP1 running past the data
    with RecDataset(rec_dir / "yale112") as ds:
        yale = [ds.read_image(k)[0] for k in (1, 2, 3)]
    cases = [base, *com, *yale, _jpeg_with_sof(w=95), base + b"tail", bad_app, base[:-4]]

    def cold(data):
        convert_module._last_header.clear()
        try:
            return jpeg_info(data)
        except ImageError as e:
            return str(e)

    expected = [cold(d) for d in cases]
    for previous in cases:
        for data, want in zip(cases, expected):
            cold(previous)  # leaves ``previous``'s header in the cache (if it parsed)
            try:
                got = jpeg_info(data)
            except ImageError as e:
                got = str(e)
            assert got == want and type(got) is type(want)
    assert [e.sof_offset for e in expected[1:4]] == [24, 29, 101]


@pytest.mark.parametrize(
    "data,match",
    [
        (b"GIF89a....", "not a JPEG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "runs past"),
        (b"\xff\xd8\xff\xda\x00\x04ab", "SOS \\(scan\\) before any SOF"),
        (b"\xff\xd8\xff\xd9", "EOI before any SOF"),
        (b"\xff\xd8\x12\x34\x00\x00", "where a marker should be"),
        (_jpeg_with_sof(h=0), "SOF size 0x96"),
        (_jpeg_with_sof()[:-4], "runs past"),
    ],
)
def test_jpeg_info_rejects_malformed_headers(data, match):
    with pytest.raises(ImageError, match=match) as e:
        jpeg_info(data, path="a.rec", key=5, offset=40)
    assert (e.value.path, e.value.key, e.value.offset) == ("a.rec", 5, 40)


# ----------------------------------------------------------------------------------------------
# Converting the MXNet fixtures


@pytest.mark.parametrize("name", ["yale112", "yale112_flat"])
def test_every_fixture_image_lands_once_byte_identical(rec_dir, fixture_manifest, tmp_path, name):
    out = tmp_path / "out"
    manifest = convert(rec_dir / name, out, num_shards=4, seed=3, progress=False)
    expected = {r["key"]: (r["label"], r["sha256"]) for r in fixture_manifest[name]["records"]}
    rows = examples(out)
    assert len(rows) == len(expected) == 164
    got = {}
    for _shard, key, label, image in rows:
        assert key not in got, f"key {key} appears twice"
        got[key] = (label, sha(image))
    assert got == expected
    # each shard mixes identities (global shuffle, not one identity per shard)
    for shard in {r[0] for r in rows}:
        assert len({label for s, _, label, _ in rows if s == shard}) >= 8
    assert manifest == json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["format"] == schema.MANIFEST_FORMAT
    assert (manifest["num_images"], manifest["num_classes"]) == (164, 15)
    assert manifest["label_range"] == [0, 14] and manifest["image_size"] == [112, 112]
    assert manifest["source"]["kind"] == "rec"
    assert manifest["source"]["layout"] == ("insightface" if name == "yale112" else "flat")
    assert manifest["options"]["seed"] == 3 and manifest["options"]["num_shards"] == 4
    assert manifest["images_per_class"] == {"min": 10, "max": 11, "mean": round(164 / 15, 4)}
    assert [s["num_records"] for s in manifest["shards"]] == [41, 41, 41, 41]
    for s in manifest["shards"]:
        assert sha((out / s["name"]).read_bytes()) == s["sha256"]
        assert (out / s["name"]).stat().st_size == s["bytes"]
    assert verify_output(out) == manifest
    assert converter_files(out) == sorted(
        [schema.MANIFEST_NAME] + [schema.shard_name(i, 4) for i in range(4)]
    )


def test_split_records_survive_conversion(rec_dir, fixture_manifest, tmp_path):
    convert(rec_dir / "split_record" / "train.rec", tmp_path, num_shards=2, progress=False)
    got = {key: sha(image) for _, key, _, image in examples(tmp_path)}
    assert got == {r["key"]: r["sha256"] for r in fixture_manifest["split_record"]["records"]}


def test_same_seed_is_byte_identical_across_processes(rec_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run_cli(rec_dir / "yale112", a, "--num-shards", "3", "--seed", "11", "--workers", "1")
    rb = run_cli(rec_dir / "yale112", b, "--num-shards", "3", "--seed", "11", "--workers", "2")
    assert ra.returncode == 0, ra.stderr
    assert rb.returncode == 0, rb.stderr
    assert "wrote 164 images of 15 classes into 3 shards" in ra.stdout
    assert tree_bytes(a) == tree_bytes(b)
    assert len(tree_bytes(a)) == 4


def test_different_seed_changes_the_order(rec_dir, tmp_path, yale_out):
    convert(rec_dir / "yale112", tmp_path, num_shards=4, seed=1, progress=False)
    order0 = [k for _, k, _, _ in examples(yale_out)]
    order1 = [k for _, k, _, _ in examples(tmp_path)]
    assert order0 != order1 and sorted(order0) == sorted(order1) == list(range(1, 165))
    # the documented permutation: numpy default_rng(seed) over the sorted image keys
    assert order1 == (1 + np.random.default_rng(1).permutation(164)).tolist()


def test_images_filter_relabels_contiguously(tmp_path):
    src = tiny_rec(tmp_path / "src", [3, 1, 5, 2, 4, 0, 3])
    out = tmp_path / "out"
    r = run_cli(src, out, "--images-filter", "3", "--num-shards", "2")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / schema.MANIFEST_NAME).read_text())
    # classes 0, 2, 4, 6 keep (3, 5, 4, 3 images) -> labels 0, 1, 2, 3
    assert (m["num_images"], m["num_classes"], m["label_range"]) == (15, 4, [0, 3])
    assert m["source"]["dropped_classes"] == 3 and m["source"]["dropped_images"] == 3
    assert m["options"]["images_filter"] == 3
    with RecDataset(src) as ds:
        orig = dict(zip(ds.image_keys.tolist(), ds.labels.tolist()))
    relabel = {0: 0, 2: 1, 4: 2, 6: 3}
    rows = examples(out)
    assert sorted(k for _, k, _, _ in rows) == sorted(k for k, c in orig.items() if c in relabel)
    for _, key, label, _ in rows:
        assert label == relabel[orig[key]]
    assert m["images_per_class"] == {"min": 3, "max": 5, "mean": 3.75}


def test_image_folder_input(rec_dir, yale_dir, tmp_path):
    # (a) JPEG files: passed through byte for byte, identities sorted by folder name
    tree = tmp_path / "jpeg_tree"
    with RecDataset(rec_dir / "yale112") as ds:
        for key in range(1, 31):
            payload, label = ds.read_image(key)
            d = tree / f"person_{2 - label}"  # reversed names: label order comes from names
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{key:03d}.jpg").write_bytes(payload)
    (tree / "README.txt").write_text("root-level files are ignored")
    (tree / "person_0" / ".hidden.jpg").write_bytes(b"ignored")
    out = tmp_path / "out_a"
    m = convert(tree, out, num_shards=2, progress=False)
    assert m["source"]["kind"] == "folder" and m["num_classes"] == 3
    files = sorted(
        p.relative_to(tree).as_posix()
        for p in tree.glob("person_*/*.jpg")
        if not p.name.startswith(".")
    )
    assert m["num_images"] == len(files) == 30
    for _, key, label, image in examples(out):
        path = tree / files[key]
        assert image == path.read_bytes()
        assert label == int(path.parent.name[-1])
    assert verify_output(out)
    # (b) GIF files (no extension, as in the Yale set): re-encoded to JPEG with a warning
    gif_tree = tmp_path / "gif_tree"
    for subject in ("subject01", "subject02"):
        (gif_tree / subject).mkdir(parents=True)
        for f in sorted(yale_dir.glob(f"{subject}.*"))[:4]:
            shutil.copy(f, gif_tree / subject / f.name)
    with pytest.warns(ReencodeWarning, match="8 non-JPEG image"):
        m = convert(gif_tree, tmp_path / "out_b", num_shards=1, progress=False)
    assert m["image_size"] == [243, 320] and m["source"]["reencoded_images"] == 8
    from PIL import Image

    for _, _, _, image in examples(tmp_path / "out_b"):
        info = jpeg_info(image)
        assert (info.height, info.width) == (243, 320)
        with Image.open(__import__("io").BytesIO(image)) as im:
            assert im.format == "JPEG" and im.size == (320, 243)


def test_image_folder_with_non_image_file_fails_clean(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    for i, (jpeg, _) in enumerate(synthetic_faces(3, 1)):
        (tree / "a" / f"{i}.jpg").write_bytes(jpeg)
    (tree / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.me").write_text("user file")
    r = run_cli(tree, out, "--num-shards", "1", "--workers", "1")
    assert r.returncode == 2
    assert "notes.txt" in r.stderr and "not an image file" in r.stderr
    assert converter_files(out) == [] and (out / "keep.me").exists()


def test_output_inside_image_folder_is_refused(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "0.jpg").write_bytes(next(synthetic_faces(1, 1))[0])
    with pytest.raises(ValueError, match="inside the image-folder input"):
        convert(tree, tree / "out", progress=False)


def test_progress_bar_and_shard_size(tmp_path, capsys):
    src = tiny_rec(tmp_path / "src", [50] * 10)
    m = convert(src, tmp_path / "out", shard_size_mb=0.02, progress=True)
    assert "img/s" in capsys.readouterr().err
    size = sum(s["bytes"] for s in m["shards"])
    assert len(m["shards"]) == pytest.approx(size / (0.02 * 2**20), abs=1.5)
    with pytest.raises(ValueError, match="more than the 500 images"):
        convert(src, tmp_path / "o2", num_shards=501, progress=False)


def test_cli_help_and_no_tensorflow_import(rec_dir, tmp_path):
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--verify" in r.stdout
    assert "python tools/convert_rec_to_tfrecord.py" in r.stdout
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['convert', {str(rec_dir / 'yale112')!r}, {str(tmp_path / 'o')!r},"
        " '--num-shards', '2', '--workers', '1']\n"
        "try:\n"
        f"    runpy.run_path({str(CLI)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'tensorflow' not in sys.modules, 'the converter imported tensorflow'\n"
        "print('no-tf')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "no-tf" in p.stdout, p.stderr
    bad = run_cli(rec_dir / "yale112", tmp_path / "o3", "--num-shards", "0")
    assert bad.returncode == 2 and "num_shards must be >= 1" in bad.stderr


# ----------------------------------------------------------------------------------------------
# Verification


def test_verify_passes_and_catches_a_flipped_byte(tmp_path, yale_out):
    out = tmp_path / "out"
    shutil.copytree(yale_out, out)
    ok = run_cli("--verify", out)
    assert ok.returncode == 0 and "OK: 4 shards, 164 images" in ok.stdout, ok.stderr
    shard = out / schema.shard_name(1, 4)
    offsets = record_offsets(shard)
    patch(shard, offsets[3] + 12 + 100, b"\x00")  # inside record 3's data
    r = run_cli("--verify", out)
    assert r.returncode == 2
    assert str(shard) in r.stderr and f"byte offset {offsets[3]}" in r.stderr
    assert "record 3: data CRC mismatch" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("fix_crc", [False, True])
def test_verify_reports_a_32gib_length_without_reading_it(tmp_path, yale_out, fix_crc):
    out = tmp_path / "out"
    shutil.copytree(yale_out, out)
    shard = out / schema.shard_name(2, 4)
    off = record_offsets(shard)[2]
    length = struct.pack("<Q", 32 * 2**30)
    patch(shard, off, length + (struct.pack("<I", masked_crc32c(length)) if fix_crc else b""))
    r = run_cli("--verify", out)
    assert r.returncode == 2, r.stderr  # an error, not a crash (negative = killed by signal)
    assert str(shard) in r.stderr and f"byte offset {off}" in r.stderr
    assert "record 2" in r.stderr and "34359738368" in r.stderr
    if not fix_crc:
        assert "length-field CRC mismatch" in r.stderr
    else:
        assert "claims 34359738368 bytes but only" in r.stderr


def test_verify_output_checks_the_manifest(tmp_path, yale_out):
    out = tmp_path / "out"
    shutil.copytree(yale_out, out)
    mpath = out / schema.MANIFEST_NAME
    good = mpath.read_text()
    m = json.loads(good)
    m["shards"][0]["num_records"] += 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(TFRecordError, match="holds 41 records") as e:
        verify_output(out)
    assert e.value.path == str(out / m["shards"][0]["name"])
    m = json.loads(good)
    m["shards"][1]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(TFRecordError, match=r"sha256 .* differs"):
        verify_output(out)
    mpath.write_text(good)
    shard = out / m["shards"][3]["name"]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(TFRecordError, match="record 40: length field claims") as e:
        verify_output(out)
    assert e.value.path == str(shard) and e.value.offset == record_offsets(shard)[-1]
    shard.unlink()
    with pytest.raises(TFRecordError, match="missing"):
        verify_output(out)
    mpath.unlink()
    with pytest.raises(TFRecordError, match=r"manifest\.json is missing"):
        load_manifest(out)
    # records listed in iteration order with their offsets
    first = out / m["shards"][0]["name"]
    assert [off for _, off, _ in iter_records(first)] == record_offsets(first)


# ----------------------------------------------------------------------------------------------
# Crash safety


def test_rerun_after_a_crash_gives_identical_output(rec_dir, tmp_path, yale_out):
    out = tmp_path / "out"
    out.mkdir()
    # leftovers of a killed run: temp files, a partial shard, shards of another count, and a
    # user's file that must survive
    (out / ".train-00001-of-00004.tfrecord.tmp-99999").write_bytes(b"half a shard")
    (out / ".manifest.json.tmp-99999").write_text("{")
    good = (yale_out / schema.shard_name(2, 4)).read_bytes()
    (out / schema.shard_name(2, 4)).write_bytes(good[: len(good) // 2])
    (out / schema.shard_name(0, 2)).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    convert(rec_dir / "yale112", out, num_shards=4, seed=0, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert tree_bytes(out) == tree_bytes(yale_out)


def test_sigkill_mid_run_then_rerun(tmp_path):
    src = tiny_rec(tmp_path / "src", [100] * 200)  # 20,000 records
    ref = tmp_path / "ref"
    convert(src, ref, num_shards=20, seed=5, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, str(CLI), str(src), str(out), "--num-shards", "20", "--seed", "5"]
    proc = subprocess.Popen([*cmd, "--workers", "1"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / schema.shard_name(0, 20)).exists():
            assert proc.poll() is None, "the converter ended before the first shard"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / schema.MANIFEST_NAME).exists()
    assert converter_files(out)  # a completed shard and/or a temp file were left behind
    r = run_cli(src, out, "--num-shards", "20", "--seed", "5", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(ref)


# ----------------------------------------------------------------------------------------------
# Malformed input through the converter CLI: exit 2, a located message, nothing left behind


def _expect_clean_failure(src, out, *needles, extra=(), shards=4):
    r = run_cli(src, out, "--num-shards", shards, "--workers", "1", *extra)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    assert converter_files(out) == []
    return r.stderr


@pytest.fixture
def yale_copy(rec_dir, tmp_path):
    return copy_fixture(rec_dir, "yale112", tmp_path / "src")


def _last_key_written(n_images: int = 164, num_shards: int = 4, seed: int = 0) -> int:
    """The yale112 image key converted last (in the last shard): shards before it complete."""
    return int(1 + np.random.default_rng(seed).permutation(n_images)[-1])


def test_cli_bad_magic(yale_copy, tmp_path):
    key = _last_key_written()
    off = read_idx(yale_copy / "train.idx")[key]
    patch(yale_copy / "train.rec", off, b"\xde\xad\xbe\xef")
    msg = _expect_clean_failure(yale_copy, tmp_path / "out", f"key {key}", f"byte offset {off}")
    assert "train.rec" in msg and "magic" in msg


@pytest.mark.parametrize("cflag", [4, 5, 6, 7])
def test_cli_invalid_cflag(yale_copy, tmp_path, cflag):
    off = read_idx(yale_copy / "train.idx")[60]
    rec = yale_copy / "train.rec"
    (lrec,) = struct.unpack_from("<I", rec.read_bytes(), off + 4)
    patch(rec, off + 4, struct.pack("<I", (lrec & (2**29 - 1)) | (cflag << 29)))
    _expect_clean_failure(
        yale_copy, tmp_path / "out", f"invalid cflag {cflag}", "key 60", f"byte offset {off}"
    )


def test_cli_length_past_end_of_file(yale_copy, tmp_path):
    off = read_idx(yale_copy / "train.idx")[77]
    rec = yale_copy / "train.rec"
    patch(rec, off + 4, struct.pack("<I", rec.stat().st_size))  # cflag 0, huge length
    _expect_clean_failure(
        yale_copy, tmp_path / "out", "runs past the end", "key 77", f"byte offset {off}"
    )


def test_cli_split_record_missing_end_chunk(rec_dir, tmp_path):
    src = copy_fixture(rec_dir, "split_record", tmp_path / "src")
    rec = src / "train.rec"
    off = read_idx(src / "train.idx")[3]
    raw = rec.read_bytes()
    _magic, lrec = struct.unpack_from("<II", raw, off)
    assert lrec >> 29 == 1  # key 3 starts with a start chunk
    rec.write_bytes(raw[: off + 8 + (lrec & (2**29 - 1))])  # drop everything after it
    _expect_clean_failure(src, tmp_path / "out", "has no end chunk", "key 3", "train.rec")


def test_cli_truncated_padding(tmp_path):
    src = tmp_path / "src"
    jpeg = next(synthetic_faces(1, 1))[0]
    extra = next(e for e in range(1, 5) if (24 + len(jpeg) + e) % 4 == 2)
    write_flat(src, [(jpeg, 0), (jpeg + b"\0" * extra, 0)])  # the last record: 2 padding bytes
    rec = src / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-1])
    off = read_idx(src / "train.idx")[1]
    _expect_clean_failure(
        src,
        tmp_path / "out",
        "inside the zero padding",
        "key 1",
        f"byte offset {off}",
        shards=1,
    )


def test_cli_idx_offset_not_at_magic(yale_copy, tmp_path):
    idx = yale_copy / "train.idx"
    key = _last_key_written()
    offsets = read_idx(idx)
    offsets[key] += 16
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    _expect_clean_failure(
        yale_copy,
        tmp_path / "out",
        "does not point at a RecordIO magic",
        f"key {key}",
        f"byte offset {offsets[key]}",
    )


def test_cli_idx_offset_past_end(yale_copy, tmp_path):
    idx = yale_copy / "train.idx"
    offsets = read_idx(idx)
    offsets[9] = (yale_copy / "train.rec").stat().st_size + 400
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    _expect_clean_failure(yale_copy, tmp_path / "out", "past the end", "key 9", str(offsets[9]))


def test_cli_missing_key0_insightface(yale_copy, tmp_path):
    idx = yale_copy / "train.idx"
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[1:]))
    _expect_clean_failure(yale_copy, tmp_path / "out", "key 0", "header0", "train.idx")
    _expect_clean_failure(
        yale_copy,
        tmp_path / "out",
        "key 0 (the insightface header0 record) is missing",
        extra=("--layout", "insightface"),
    )


def test_cli_duplicate_keys(yale_copy, tmp_path):
    idx = yale_copy / "train.idx"
    text = idx.read_text()
    idx.write_text(text + f"42\t{read_idx(idx)[43]}\n")
    _expect_clean_failure(
        yale_copy, tmp_path / "out", "duplicate key 42", "train.idx", f"byte offset {len(text)}"
    )


def test_cli_header0_inconsistent_with_idx(yale_copy, tmp_path):
    patch(yale_copy / "train.rec", 8 + 24 + 4, struct.pack("<f", 181.0))  # [165, 181)
    _expect_clean_failure(yale_copy, tmp_path / "out", "key 180 is missing", "train.idx")


def test_cli_label_flag_larger_than_payload(yale_copy, tmp_path):
    key = _last_key_written()
    off = read_idx(yale_copy / "train.idx")[key]
    patch(yale_copy / "train.rec", off + 8, struct.pack("<I", 100_000))
    _expect_clean_failure(
        yale_copy, tmp_path / "out", "IRHeader flag 100000", f"key {key}", f"byte offset {off}"
    )


def test_cli_non_integral_label(yale_copy, tmp_path):
    key = _last_key_written()
    off = read_idx(yale_copy / "train.idx")[key]
    patch(yale_copy / "train.rec", off + 8 + 4, struct.pack("<f", 2.5))
    _expect_clean_failure(
        yale_copy,
        tmp_path / "out",
        "label 2.5 is not an integer",
        f"key {key}",
        f"byte offset {off}",
    )


def test_cli_label_disagrees_with_identity_range(yale_copy, tmp_path):
    off = read_idx(yale_copy / "train.idx")[5]  # identity 0 holds keys 1..10
    patch(yale_copy / "train.rec", off + 8 + 4, struct.pack("<f", 3.0))
    _expect_clean_failure(
        yale_copy, tmp_path / "out", "label 3 disagrees", "key 5", f"byte offset {off}"
    )


@pytest.mark.parametrize("name", ["yale112", "yale112_flat"])
def test_cli_jpeg_claiming_10000x10000(rec_dir, tmp_path, name):
    src = copy_fixture(rec_dir, name, tmp_path / "src")
    key = 100
    off = read_idx(src / "train.idx")[key]
    rec = src / "train.rec"
    with RecordIOReader(rec) as reader:
        payload = reader.read(key).payload
    sof = jpeg_info(payload).sof_offset
    patch(rec, off + 8 + 24 + sof + 5, struct.pack(">HH", 10000, 10000))
    msg = _expect_clean_failure(
        src, tmp_path / "out", "claims 10000x10000", f"key {key}", f"byte offset {off}"
    )
    assert "train.rec" in msg and "4096" in msg


def test_cli_jpeg_size_differs_from_property(yale_copy, tmp_path):
    key = 50
    off = read_idx(yale_copy / "train.idx")[key]
    rec = yale_copy / "train.rec"
    with RecordIOReader(rec) as reader:
        sof = jpeg_info(reader.read(key).payload).sof_offset
    patch(rec, off + 8 + 24 + sof + 5, struct.pack(">HH", 120, 112))
    _expect_clean_failure(yale_copy, tmp_path / "out", "120x112", "property", f"key {key}")


def test_typed_error_crosses_worker_processes(yale_copy, tmp_path, monkeypatch):
    """A bad record met by a worker process aborts the run with the same typed error."""
    key = _last_key_written()
    off = read_idx(yale_copy / "train.idx")[key]
    patch(yale_copy / "train.rec", off, b"\xde\xad\xbe\xef")
    out = tmp_path / "out"
    with pytest.raises(RecordIOError, match="magic") as e:
        convert(yale_copy, out, num_shards=4, workers=2, progress=False)
    assert (e.value.path, e.value.key, e.value.offset) == (
        str(yale_copy / "train.rec"),
        key,
        off,
    )
    assert converter_files(out) == [] and not out.exists()  # created by the run: removed


def test_failure_after_completed_shards_removes_them(yale_copy, tmp_path, monkeypatch):
    key = _last_key_written()
    off = read_idx(yale_copy / "train.idx")[key]
    patch(yale_copy / "train.rec", off + 8 + 4, struct.pack("<f", 0.5))
    replaced = []
    real_replace = os.replace

    def spy(a, b):
        replaced.append(os.path.basename(b))
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "out"
    with pytest.raises(RecordIOError, match="not an integer"):
        convert(yale_copy, out, num_shards=4, workers=1, progress=False)
    assert replaced == [schema.shard_name(i, 4) for i in range(3)]  # 3 shards were complete
    assert converter_files(out) == []


# ----------------------------------------------------------------------------------------------
# Memory


def test_peak_rss_of_a_200k_record_conversion(tmp_path):
    """Memory is O(shard buffer): a 200k-record conversion stays far below 500 MB."""
    src = tmp_path / "src"
    write_insightface(src, synthetic_faces(200_000, 1000), num_classes=1000, image_size=(16, 16))
    out = tmp_path / "out"
    # Measure from a small wrapper process: a child forked straight from pytest (which holds
    # TensorFlow by now) would report pytest's own resident size in ru_maxrss.
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
        "sys.stderr.write(r.stderr.decode())\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    cmd = [sys.executable, str(CLI), str(src), str(out), "--num-shards", "8", "--workers", "1"]
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.split()[-1]) / 1024  # KiB on Linux
    assert peak_mb <= 500, f"peak RSS {peak_mb:.0f} MB"
    m = load_manifest(out)
    assert m["num_images"] == 200_000 and sum(s["num_records"] for s in m["shards"]) == 200_000
