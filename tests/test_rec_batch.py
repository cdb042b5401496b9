"""The converter's fast paths agree with the careful per-record path.

:func:`facerec_tf.data.rec_batch.check_records` (NumPy) and its C twin
:func:`facerec_tf.data.fastrec.check_records` may only say "ok" for a record that the
per-record path (``_ImageReader.read_image`` + ``jpeg_info`` + the acceptance rules) accepts
with the same payload; everything it does not recognise must be left to that path.
"""

from __future__ import annotations

import pathlib
import struct

import numpy as np
import pytest

from facerec_tf.data import fastrec
from facerec_tf.data.convert import _SOF_SUPPORTED, _ImageReader, jpeg_info
from facerec_tf.data.rec_batch import check_records
from facerec_tf.data.recordio import RecordIOReader
from facerec_tf.data.recordio_writer import encode_frames, frame, pack_record, write_rec
from facerec_tf.errors import DataFormatError


def careful(reader: _ImageReader, key: int, label: int, expected, max_side: int):
    """The per-record path's verdict: the payload if accepted, else None."""
    try:
        image, _ = reader.read_image(key, label)
        info = jpeg_info(image)
    except DataFormatError:
        return None
    h, w, comps, precision, sof, _ = info
    if (
        sof not in _SOF_SUPPORTED
        or precision != 8
        or comps not in (1, 3)
        or max(h, w) > max_side
        or (expected is not None and (h, w) != tuple(expected))
    ):
        return None
    return image


@pytest.fixture(params=["numpy", "c"], autouse=True)
def impl(request, monkeypatch):
    """Every test runs against both fast paths: the NumPy one and the C accelerator's."""
    if request.param == "c" and not fastrec.available():
        pytest.skip("the C accelerator is not built (facerec_tf.data._fastrec)")
    monkeypatch.setitem(_IMPL, "check", request.param)
    return request.param


_IMPL = {"check": "numpy"}


def fast(rec_path, keys, labels, expected=(112, 112), max_side=4096):
    reader = _ImageReader(str(rec_path), str(pathlib.Path(rec_path).with_suffix(".idx")), 4096)
    try:
        offsets = reader.reader.offsets_of(np.asarray(keys))
        data = np.fromfile(rec_path, dtype=np.uint8)
        check = check_records if _IMPL["check"] == "numpy" else fastrec.check_records
        ok, start, end = check(
            data,
            offsets,
            np.asarray(labels),
            limits=np.full(len(keys), data.size, np.int64),
            expected_size=expected,
            max_side=max_side,
        )
        verdicts = [careful(reader, k, lab, expected, max_side) for k, lab in zip(keys, labels)]
        return ok, [data[a:b].tobytes() for a, b in zip(start, end)], verdicts
    finally:
        reader.close()


def test_mxnet_fixture_images_all_take_the_fast_path(rec_dir):
    rec = rec_dir / "yale112" / "train.rec"
    with RecordIOReader(rec) as r:
        keys = [k for k in r.keys.tolist() if 1 <= k <= 164]
        labels = [int(r.read(k).label) for k in keys]
    ok, payloads, verdicts = fast(rec, keys, labels)
    assert ok.all()
    assert payloads == verdicts  # byte-identical to the careful path's payloads


def test_split_records_are_left_to_the_careful_path(rec_dir):
    """Every record of the MXNet fixture is split (magic words inside): none is fast, and
    the careful path reassembles each one."""
    rec = rec_dir / "split_record" / "train.rec"
    with RecordIOReader(rec) as r:
        keys = r.keys.tolist()
        labels = [r.read(k).class_label() for k in keys]
    ok, _, verdicts = fast(rec, keys, labels, expected=None)
    assert len(keys) == 4 and not ok.any()
    assert all(v is not None for v in verdicts)


def _jpeg(sof=0xC0, h=112, w=112, comps=3, precision=8, fill=b"", extra_app=0):
    seg = struct.pack(">BHHB", precision, h, w, comps) + b"\x01\x22\x00" * comps
    app = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    apps = app + (b"\xff\xe1" + struct.pack(">H", 6) + b"abcd") * extra_app
    body = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x12\x34" * 20 + b"\xff\xd9"
    return (
        b"\xff\xd8"
        + apps
        + fill
        + bytes((0xFF, sof))
        + struct.pack(">H", 2 + len(seg))
        + seg
        + body
    )


VARIANTS = {
    "baseline": (_jpeg(), True),
    "progressive_grey": (_jpeg(sof=0xC2, comps=1), True),
    "many_app_segments": (_jpeg(extra_app=5), True),
    "fill_bytes": (_jpeg(fill=b"\xff\xff"), False),  # legal: careful path accepts
    "lossless": (_jpeg(sof=0xC3), False),
    "12_bit": (_jpeg(precision=12), False),
    "cmyk": (_jpeg(comps=4), False),
    "wrong_size": (_jpeg(h=100), False),
    "huge": (_jpeg(h=10000, w=10000), False),
    "zero_height": (_jpeg(h=0), False),
    "not_jpeg": (b"GIF89a" + b"\x00" * 40, False),
    "truncated_header": (_jpeg()[:10], False),
    "scan_before_sof": (b"\xff\xd8\xff\xda\x00\x04ab" + b"\x00" * 30, False),
    "too_many_segments": (_jpeg(extra_app=40), False),  # walk gives up; careful path accepts
}


def test_crafted_records_agree_with_the_careful_path(tmp_path):
    names = list(VARIANTS)
    records = {}
    for i, name in enumerate(names):
        records[i] = pack_record(VARIANTS[name][0], float(i))
    # header variants: several float labels, a non-matching label, a split record
    payload = _jpeg()
    records[100] = pack_record(payload, labels=(100.0, 7.0))
    records[101] = pack_record(payload, 5.0)  # planned label 101 below: mismatch
    # a magic word 4-byte aligned inside the record (in an APP1 segment): MXNet splits it
    magic_app = b"\xff\xe1\x00\x06" + struct.pack("<I", 0xCED7230A)
    split_jpeg = payload[:20] + magic_app + payload[20:]
    records[102] = pack_record(split_jpeg, 102.0)
    rec, _ = write_rec(tmp_path, records.items())
    raw = pathlib.Path(rec).read_bytes()
    assert encode_frames(records[102]) in raw
    assert encode_frames(records[102]) != frame(0, records[102])  # really several frames
    keys = list(records)
    ok, payloads, verdicts = fast(rec, keys, keys)
    for k, good, payload_fast, verdict in zip(keys, ok, payloads, verdicts):
        name = names[k] if k < len(names) else k
        if good:
            assert verdict is not None and payload_fast == verdict, name
        else:
            assert k in (101, 102) or not VARIANTS[name][1], name
    assert {names[k] for k in keys[: len(names)] if ok[k]} == {
        n for n, (_, fast_ok) in VARIANTS.items() if fast_ok
    }
    assert ok[keys.index(100)] and not ok[keys.index(101)] and not ok[keys.index(102)]
    # the careful path still accepts the legal variants the fast path leaves to it
    for name in ("fill_bytes", "too_many_segments"):
        assert verdicts[names.index(name)] is not None, name
    assert verdicts[keys.index(102)] is not None


@pytest.mark.parametrize("seed", range(3))
def test_random_corruptions_never_pass_wrongly(tmp_path, seed):
    """Flip random header bytes of records: whatever the fast path accepts, the careful path
    accepts with the same payload."""
    rng = np.random.default_rng(seed)
    payload = _jpeg(extra_app=2)
    records = {k: pack_record(payload, float(k)) for k in range(300)}
    rec, _ = write_rec(tmp_path, records.items())
    raw = bytearray(pathlib.Path(rec).read_bytes())
    with RecordIOReader(rec) as r:
        offsets = r.offsets_of(np.arange(300))
    for k, off in enumerate(offsets.tolist()):
        if k % 3:
            for _ in range(int(rng.integers(1, 4))):
                at = off + int(rng.integers(0, 32 + 80))
                raw[at] = int(rng.integers(0, 256))
    pathlib.Path(rec).write_bytes(bytes(raw))
    keys = list(range(300))
    ok, payloads, verdicts = fast(rec, keys, keys)
    for k in keys:
        if ok[k]:
            assert verdicts[k] is not None and payloads[k] == verdicts[k], k
    assert ok[::3].all()  # untouched records stay on the fast path
