"""The converter's C accelerator (``facerec_tf.data._fastrec``) against its references.

Every function is compared with the pure-Python / NumPy code it replaces or with an
independent implementation: CRC-32C with ``google-crc32c``, Example framing with
:func:`facerec_tf.data.tfrecord.frame_examples` (itself checked against TensorFlow in
``test_convert.py``), record checks with :func:`facerec_tf.data.rec_batch.check_records`,
reads with ``os.pread``; and whole conversions with and without it give identical bytes.
CI sets ``FACEREC_TF_REQUIRE_C=1`` so that a build that silently skipped the extension fails.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import struct
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest

from facerec_tf.data import directio, fastrec
from facerec_tf.data.convert import convert
from facerec_tf.data.rec_batch import check_records
from facerec_tf.data.recordio import RecordIOReader
from facerec_tf.data.recordio_writer import (
    pack_record,
    synthetic_faces,
    write_insightface,
    write_rec,
)
from facerec_tf.data.tfrecord import BufferPool, TFRecordWriter, frame_examples, iter_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "convert_rec_to_tfrecord.py"

needs_c = pytest.mark.skipif(
    not fastrec.available(), reason="the C accelerator is not built (facerec_tf.data._fastrec)"
)


def test_accelerator_is_built_where_required():
    if os.environ.get("FACEREC_TF_REQUIRE_C") != "1":
        pytest.skip("FACEREC_TF_REQUIRE_C is not set (CI sets it)")
    assert fastrec.available(), "facerec_tf.data._fastrec did not build or import"


def test_pure_python_switch(monkeypatch):
    monkeypatch.setenv(fastrec.ENV_PURE_PYTHON, "1")
    assert fastrec.get() is None and not fastrec.available()
    with pytest.raises(RuntimeError, match="not available"):
        fastrec.frame_examples(b"", [], [], [], [])
    assert fastrec.start_writeback(0) is False


@needs_c
@pytest.mark.parametrize("hardware", [True, False])
def test_crc32c_equals_google_crc32c(hardware):
    mod = fastrec.get()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    # the hardware path runs 3 interleaved CRCs over 768-byte rounds: lengths around them
    rounds = [768 * k + d for k in (1, 2, 5) for d in (-9, -1, 0, 1, 7, 8, 9)]
    for n in [*range(0, 70), 255, *rounds, 4095, 4096, 4097, 1 << 16]:
        for start in range(0, 9):  # every alignment
            chunk = data[start : start + n]
            assert mod.crc32c(chunk, hardware=hardware) == google_crc32c.value(chunk), (n, start)
    # extending a running CRC
    crc = mod.crc32c(data[:1000], hardware=hardware)
    assert mod.crc32c(data[1000:], crc, hardware=hardware) == google_crc32c.value(data)
    assert mod.crc32c(b"123456789", hardware=hardware) == 0xE3069283  # the CRC-32C check value


def _images(rng, sizes):
    return [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in sizes]


@needs_c
def test_frame_examples_equals_the_python_encoder(tmp_path):
    """Varint boundaries of the image length (1-4 bytes), labels and keys (0, boundaries,
    negative int64 as 10 bytes, int64 extremes): byte-identical to the Python path."""
    rng = np.random.default_rng(1)
    sizes = [0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 4000]
    labels = [0, 1, 127, 128, -1, 2**40, -(2**63), 2**63 - 1, 70001]
    keys = [16383, 16384, 0, -5, 2**21, 3, 2**63 - 1, 1, -(2**63)]
    images = _images(rng, sizes)
    data = np.frombuffer(b"pad" + b"".join(images), dtype=np.uint8)
    lengths = np.array(sizes)
    ends = 3 + np.cumsum(lengths)
    pieces: list[bytes] = []
    frame_examples(images, labels, keys, pieces)
    want = b"".join(pieces)
    assert fastrec.frame_examples(data, ends - lengths, ends, labels, keys) == want
    # into a reused buffer: too small (grown), exact, larger than needed
    out, n = fastrec.frame_examples_into(bytearray(10), data, ends - lengths, ends, labels, keys)
    assert n == len(want) and bytes(out[:n]) == want and len(out) >= n
    exact = bytearray(len(want))
    assert fastrec.frame_examples_into(exact, data, ends - lengths, ends, labels, keys) == (
        exact,
        len(want),
    )
    assert bytes(exact) == want
    # at an offset: the bytes before it are left alone
    head = np.full(7 + len(want), 0xAB, dtype=np.uint8)
    out, n = fastrec.frame_examples_into(head, data, ends - lengths, ends, labels, keys, offset=7)
    assert out is head and n == len(want) and out[7:].tobytes() == want
    assert (out[:7] == 0xAB).all()
    out, n = fastrec.frame_examples_into(head[:9], data, ends - lengths, ends, labels, keys, 3)
    assert out[3 : 3 + n].tobytes() == want and out.ctypes.data % directio.ALIGN == 0
    # and the framed records read back (lengths, both CRCs)
    path = tmp_path / "c.tfrecord"
    path.write_bytes(want)
    assert len(list(iter_records(path))) == len(sizes)


@needs_c
def test_frame_examples_rejects_ranges_outside_the_data():
    data = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match=r"record 1: image range \[90, 101\)"):
        fastrec.frame_examples(data, [0, 90], [10, 101], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="expected 2 items"):
        fastrec.frame_examples(data, [0, 90], [10], [1, 2], [1, 2])


@needs_c
def test_pread_records_equals_os_pread(tmp_path):
    path = tmp_path / "f.bin"
    blob = np.random.default_rng(2).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    path.write_bytes(blob)
    offsets = np.array([5, 99_990, 0, 50_000, 100_000])
    lengths = np.array([100, 100, 0, 4096, 8])  # the second and last run past the end
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    buf = np.full(int(lengths.sum()), 7, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fastrec.pread_records(fd, offsets, lengths, buf, starts)
        for o, n, s, g in zip(offsets, lengths, starts, got):
            want = os.pread(fd, int(n), int(o))
            assert g == len(want) and buf[s : s + g].tobytes() == want
        assert got.tolist() == [100, 10, 0, 4096, 0]
        with pytest.raises(ValueError, match="does not fit"):
            fastrec.pread_records(fd, [0], [10], np.zeros(5, np.uint8), [0])
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        fastrec.pread_records(-1, [0], [10], np.zeros(10, np.uint8), [0])


@needs_c
@pytest.mark.parametrize("seed", range(4))
def test_check_records_equals_numpy_on_corrupted_records(tmp_path, seed):
    """Random bytes overwritten in frames, IRHeaders and JPEG headers, random limits and
    labels: the C checks give the NumPy verdict for every record, and the same range."""
    rng = np.random.default_rng(seed)
    faces = list(synthetic_faces(60, 6, size=24, seed=seed))
    records = {}
    for k, (jpeg, label) in enumerate(faces):
        flags = rng.integers(0, 3)
        labels = (float(label),) + (1.0,) * int(flags) if flags else None
        records[k] = pack_record(jpeg, labels=labels) if labels else pack_record(jpeg, label)
    rec, _ = write_rec(tmp_path, records.items())
    raw = bytearray(pathlib.Path(rec).read_bytes())
    with RecordIOReader(rec) as r:
        offsets = r.offsets_of(np.arange(len(records)))
    for off in offsets.tolist():
        for _ in range(int(rng.integers(0, 4))):
            raw[off + int(rng.integers(0, 120))] = int(rng.integers(0, 256))
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    labels = np.array([lab for _, lab in faces]) + (rng.random(len(faces)) < 0.1)
    offs = np.concatenate([offsets, [1, -4, len(raw) - 8]])  # misaligned, negative, at the end
    labels = np.concatenate([labels, [0, 0, 0]])
    limits = np.where(rng.random(offs.size) < 0.1, offs + 40, len(raw))
    for expected, max_side in [((24, 24), 4096), (None, 4096), (None, 20), ((24, 23), 4096)]:
        want = check_records(
            data, offs, labels, limits=limits, expected_size=expected, max_side=max_side
        )
        got = fastrec.check_records(
            data, offs, labels, limits=limits, expected_size=expected, max_side=max_side
        )
        assert np.array_equal(got[0], want[0]), expected
        ok = want[0]
        assert np.array_equal(got[1][ok], want[1][ok]) and np.array_equal(got[2][ok], want[2][ok])
        if expected == (24, 24):
            assert 0 < ok.sum() < offs.size  # both verdicts occur


@needs_c
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
def test_reserved_buffer_writer_equals_the_list_writer(tmp_path, direct_io):
    """Blocks framed into pooled buffers (reserve / write_reserved) and written by the
    helper thread give the bytes and sha256 of the per-record writer, buffered or direct;
    buffers come back to the pool."""
    rng = np.random.default_rng(3)
    images = _images(rng, rng.integers(100, 6000, 300))
    labels = rng.integers(0, 1000, 300).tolist()
    keys = list(range(300))
    ref = TFRecordWriter(tmp_path / "ref.tfrecord")
    ref.write_examples(images, labels, keys)
    ref.close()
    data = np.frombuffer(b"".join(images), dtype=np.uint8)
    ends = np.cumsum([len(i) for i in images])
    starts = ends - [len(i) for i in images]
    pool = BufferPool()
    w = TFRecordWriter(
        tmp_path / "c.tfrecord",
        background=True,
        writeback_bytes=1 << 16,
        direct_io=direct_io,
        pool=pool,
    )
    for lo in range(0, 300, 64):
        sl = slice(lo, lo + 64)
        buf, at = w.reserve()
        assert at == (w.bytes % directio.ALIGN if w.direct_io else 0)
        buf, n = fastrec.frame_examples_into(
            buf, data, starts[sl], ends[sl], labels[sl], keys[sl], offset=at
        )
        w.write_reserved(buf, at, n, len(keys[sl]))
    w.close(fsync=True)
    a, b = (tmp_path / "ref.tfrecord").read_bytes(), (tmp_path / "c.tfrecord").read_bytes()
    assert a == b and w.num_records == 300 and w.bytes == len(a)
    assert w.sha256 == ref.sha256 == hashlib.sha256(a).hexdigest()
    assert isinstance(pool.get(), np.ndarray) and pool._free.qsize() >= 1


def _tree(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@needs_c
def test_conversions_with_and_without_the_accelerator_are_identical(tmp_path, monkeypatch):
    """In-process (workers 1 and 2) and through the CLI (2 forked workers): identical shards
    and manifest whether or not the C code runs and whether the shards are written buffered
    or with direct I/O; a few split records take the careful path in the middle of C-framed
    batches."""
    src = tmp_path / "src"
    items = list(synthetic_faces(3000, 30, size=20, seed=5))
    magic = struct.pack("<I", 0xCED7230A)
    for i, pad in zip(range(100, 3000, 700), range(4)):  # every alignment of a magic word
        jpeg, label = items[i]
        comment = b"\xff\xfe" + struct.pack(">H", 10 + pad) + b"x" * pad + magic + b"yyyy"
        items[i] = (jpeg[:2] + comment + jpeg[2:], label)
    rec, _ = write_insightface(src, iter(items), num_classes=30, image_size=(20, 20))
    raw = np.frombuffer(pathlib.Path(rec).read_bytes(), dtype="<u4")
    with RecordIOReader(rec) as r:
        assert (raw == 0xCED7230A).sum() > r.keys.size  # some records are really split
    runs = {}
    for pure in (False, True):
        if pure:
            monkeypatch.setenv(fastrec.ENV_PURE_PYTHON, "1")
        else:
            monkeypatch.delenv(fastrec.ENV_PURE_PYTHON, raising=False)
        for workers in (1, 2):
            out = tmp_path / f"out-{pure}-{workers}"
            # buffered writes with 1 worker, direct I/O (O_DIRECT) with 2
            direct = workers == 2
            convert(src, out, num_shards=3, workers=workers, progress=False, direct_io=direct)
            runs[pure, workers] = _tree(out)
    env = {k: v for k, v in os.environ.items() if k != fastrec.ENV_PURE_PYTHON}
    cli_out = tmp_path / "cli"
    r = subprocess.run(
        [sys.executable, str(CLI), str(src), str(cli_out), "--num-shards", "3", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    first = runs[False, 1]
    assert all(tree == first for tree in runs.values())
    assert _tree(cli_out) == first
    assert sum(name.endswith(".tfrecord") for name in first) == 3
