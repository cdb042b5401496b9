"""Tests of the pure-Python MXNet RecordIO reader (facerec_tf.data.recordio).

Fixture tests compare against ``../shared/data/rec`` (written by MXNet 1.9.1 itself) byte for
byte; malformed-file tests build their input in ``tmp_path`` from the fixtures or with the
MXNet-compatible writer in ``facerec_tf.data.recordio_writer``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import numpy as np
import pytest

from facerec_tf.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    RecDataset,
    RecordIOReader,
    float32_int_candidates,
    read_property,
    unpack_header,
    unpack_record,
)
from facerec_tf.data.recordio_writer import frame, write_rec
from facerec_tf.data.recordio_writer import pack_record as ir
from facerec_tf.errors import DataFormatError, RecordIOError

# ----------------------------------------------------------------------------------------------
# helpers


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_idx(path: pathlib.Path) -> dict[int, int]:
    out = {}
    for line in path.read_text().splitlines():
        k, o = line.split("\t")
        out[int(k)] = int(o)
    return out


def copy_fixture(rec_dir: pathlib.Path, name: str, dst: pathlib.Path):
    """Copy ``rec_dir/name/train.{rec,idx}`` into ``dst`` as writable files."""
    dst.mkdir(parents=True, exist_ok=True)
    rec, idx = dst / "train.rec", dst / "train.idx"
    rec.write_bytes((rec_dir / name / "train.rec").read_bytes())
    idx.write_bytes((rec_dir / name / "train.idx").read_bytes())
    return rec, idx


def patch(path: pathlib.Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def frames_of(raw: bytes) -> list[tuple[int, int, int]]:
    """``(offset, cflag, length)`` of every frame, parsed independently of the module."""
    out, pos = [], 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        out.append((pos, lrec >> 29, length))
        pos += 8 + (length + 3) // 4 * 4
    return out


@pytest.fixture(scope="module")
def manifest(rec_dir):
    return json.loads((rec_dir / "manifest.json").read_text())


# ----------------------------------------------------------------------------------------------
# byte-exact reads of the MXNet-written fixtures


def test_insightface_layout_matches_manifest(rec_dir, manifest):
    expected = manifest["yale112"]
    with RecDataset(rec_dir / "yale112") as ds:
        assert ds.layout == "insightface"
        assert ds.header0 == tuple(expected["header0"]) == (165, 180)
        assert ds.image_keys.tolist() == [r["key"] for r in expected["records"]]
        assert len(ds) == 164
        for r in expected["records"]:
            payload, label = ds.read_image(r["key"])
            assert sha(payload) == r["sha256"], r["key"]
            assert payload[:3] == b"\xff\xd8\xff"
            assert type(label) is int and label == r["label"]
        ranges = {str(i): list(map(int, row)) for i, row in enumerate(ds.identity_ranges)}
        assert ranges == expected["identity_ranges"]
        assert ds.identity_ranges.dtype == np.int64
        assert ds.num_identities == 15
        assert ds.labels.dtype == np.int64
        assert ds.labels.tolist() == [r["label"] for r in expected["records"]]
        assert np.array_equal(ds.labels_from_headers(), ds.labels)
    assert read_property(rec_dir / "yale112" / "property") == (15, 112, 112)
    assert read_property(rec_dir / "yale112") == (15, 112, 112)


def test_header0_and_identity_records(rec_dir):
    with RecordIOReader(rec_dir / "yale112" / "train.rec") as reader:
        assert len(reader) == 180
        assert reader.keys.tolist() == list(range(180))
        rec0 = reader.read(0)
        assert (rec0.key, rec0.offset, rec0.flag, rec0.labels, rec0.payload) == (
            0,
            0,
            2,
            (165.0, 180.0),
            b"",
        )
        ident = reader.read(166)
        assert ident.flag == 2 and ident.labels == (11.0, 22.0) and ident.payload == b""
        img = reader.read(12)
        assert img.flag == 0 and img.label == 1.0 and img.label_values == (1.0,)
        assert img.id == 12 and img.class_label() == 1
        assert reader.read_at(reader.offset_of(12)) == img.__class__(
            None, img.offset, img.flag, img.label, img.labels, img.id, img.id2, img.payload
        )
        raw = reader.read_raw(12)
        assert unpack_record(raw, key=12, offset=img.offset) == img
        assert 12 in reader and 180 not in reader and "x" not in reader
        with pytest.raises(KeyError, match="180"):
            reader.read(180)


def test_flat_layout_matches_manifest(rec_dir, manifest):
    expected = manifest["yale112_flat"]["records"]
    with RecDataset(rec_dir / "yale112_flat" / "train.rec") as ds:
        assert ds.layout == "flat"
        assert ds.header0 is None and ds.identity_ranges is None
        assert ds.image_keys.tolist() == list(range(164)) == [r["key"] for r in expected]
        for r in expected:
            payload, label = ds.read_image(r["key"])
            assert sha(payload) == r["sha256"] and label == r["label"]
        assert ds.labels.tolist() == [r["label"] for r in expected]
        assert ds.num_identities == 15


def test_split_records_come_back_byte_identical(rec_dir, manifest):
    expected = manifest["split_record"]
    raw = (rec_dir / "split_record" / "train.rec").read_bytes()
    cflags = [c for _, c, _ in frames_of(raw)]
    assert cflags == expected["chunk_cflags_in_file_order"]
    assert {1, 2, 3} <= set(cflags)  # the fixture really exercises splitting
    with RecDataset(rec_dir / "split_record") as ds:
        assert ds.layout == "flat"
        for r in expected["records"]:
            payload, label = ds.read_image(r["key"])
            assert sha(payload) == r["sha256"], r["key"]
            assert payload.count(MAGIC_BYTES) == r["magic_words_inside"]
            assert payload.endswith(b"tail") and label == r["label"]


@pytest.mark.parametrize("name", ["yale112", "yale112_flat", "split_record"])
def test_scan_without_idx_matches_indexed_reads(rec_dir, tmp_path, name):
    rec = tmp_path / "only.rec"  # no sibling .idx
    rec.write_bytes((rec_dir / name / "train.rec").read_bytes())
    with RecordIOReader(rec) as bare:
        assert bare.idx_path is None and len(bare) == 0
        scanned = list(bare.scan())
        with pytest.raises(KeyError, match=r"no \.idx"):
            bare.read(0)
    offsets = read_idx(rec_dir / name / "train.idx")
    assert [off for off, _ in scanned] == sorted(offsets.values())
    with RecordIOReader(rec_dir / name / "train.rec") as reader:
        by_offset = {off: key for key, off in offsets.items()}
        for off, raw in scanned:
            key = by_offset[off]
            assert raw == reader.read_raw(key)
            assert unpack_record(raw).payload == reader.read(key).payload


# ----------------------------------------------------------------------------------------------
# synthetic files (no shared data needed)


def test_split_edge_cases_round_trip(tmp_path):
    records = {
        0: ir(MAGIC_BYTES + b"abcd"),  # magic right after the header
        1: ir(b"wxyz" + MAGIC_BYTES + b"zz"),  # magic at a 4-aligned place inside the payload
        2: ir(b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"e"),  # empty middle chunk
        3: ir(b"abcd" + MAGIC_BYTES),  # empty end chunk
        4: ir(b"a" + MAGIC_BYTES + b"bcd"),  # unaligned magic: not split
        5: ir(b"q" * 5, label=3.0),
    }
    rec, _ = write_rec(tmp_path, records)
    cflags = [c for _, c, _ in frames_of(rec.read_bytes())]
    assert cflags == [1, 3, 1, 3, 1, 2, 3, 1, 3, 0, 0]
    with RecordIOReader(rec) as reader:
        for key, record in records.items():
            assert reader.read_raw(key) == record
        assert [raw for _, raw in reader.scan()] == list(records.values())
        assert reader.read(5).payload == b"qqqqq" and reader.read(5).class_label() == 3


def test_sparse_unsorted_idx(tmp_path):
    records = {k: ir(bytes([k % 251]) * (k % 7 + 1), label=float(k % 3)) for k in range(20)}
    rec, idx = write_rec(tmp_path, records)
    # Keep every other key, list them in reverse order: sorted lookup and offset-based extents.
    lines = idx.read_text().splitlines()[::2][::-1]
    idx.write_text("\n".join(lines))  # no trailing newline either
    with RecordIOReader(rec, idx) as reader:
        assert reader.keys.tolist() == list(range(0, 20, 2))
        for key in range(0, 20, 2):
            assert reader.read_raw(key) == records[key]
        assert 3 not in reader
    with RecDataset(rec, idx) as ds:
        assert ds.layout == "flat" and ds.labels.tolist() == [k % 3 for k in range(0, 20, 2)]


def test_large_idx_parses_to_arrays(tmp_path):
    n = 300_000
    rec = tmp_path / "big.rec"
    with open(rec, "wb") as f:
        f.truncate(4 * n + 8)
    offsets = np.arange(n, dtype=np.int64) * 4
    (tmp_path / "big.idx").write_text("".join(f"{k}\t{4 * k}\n" for k in range(n)))
    with RecordIOReader(rec) as reader:
        assert len(reader) == n and reader.offset_of(n - 1) == int(offsets[-1])
        assert reader._keys is None  # contiguous keys: no key array held
        assert reader._offsets.dtype == np.int64


def test_float32_key_candidates():
    assert float32_int_candidates(165.0) == [165]
    assert float32_int_candidates(16777216.0) == [16777216, 16777217]
    assert float32_int_candidates(16777218.0) == [16777218]
    # float32 spacing is 4 between 2**25 and 2**26: 41999998..42000002 all round to 42000000.
    cands = float32_int_candidates(np.float32(41999999))
    assert cands == [41999998, 41999999, 42000000, 42000001, 42000002]
    assert np.float32(41999997) != np.float32(42000000) != np.float32(42000003)


def test_unpack_header():
    header, start = unpack_header(ir(b"img", labels=(1.0, 5.0), id=9))
    assert header.flag == 2 and header.labels == (1.0, 5.0) and header.id == 9 and start == 32


# ----------------------------------------------------------------------------------------------
# malformed files


def test_bad_magic(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112_flat", tmp_path)
    off = read_idx(idx)[3]
    patch(rec, off, b"\xde\xad\xbe\xef")
    with RecordIOReader(rec, idx) as reader:
        with pytest.raises(RecordIOError, match=rf"byte offset {off}: bad magic word 0xefbeadde"):
            list(reader.scan())
        with pytest.raises(RecordIOError, match="does not point at a RecordIO magic") as e:
            reader.read(3)
    assert (e.value.path, e.value.offset, e.value.key) == (str(rec), off, 3)
    assert "0xced7230a" in str(e.value)


def test_idx_offset_not_at_magic_word(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    off = read_idx(idx)[5]
    idx.write_text(_replace_offset(idx, 5, off + 16))
    with RecordIOReader(rec, idx) as reader:
        reader.read(4)  # neighbours still fine
        with pytest.raises(RecordIOError, match=r"key 5, byte offset \d+: the .idx offset") as e:
            reader.read(5)
    assert (e.value.path, e.value.key, e.value.offset) == (str(rec), 5, off + 16)


def test_idx_offset_unaligned(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    off = read_idx(idx)[5]
    idx.write_text(_replace_offset(idx, 5, off + 2))
    with pytest.raises(RecordIOError, match="not 4-byte aligned") as e:
        RecordIOReader(rec, idx)
    assert (e.value.key, e.value.offset, e.value.path) == (5, off + 2, str(rec))
    assert "line 6" in str(e.value)


def test_idx_offset_past_end_of_file(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    size = rec.stat().st_size
    idx.write_text(_replace_offset(idx, 7, size + 400))
    with pytest.raises(RecordIOError, match="past the end of the 800088-byte file") as e:
        RecordIOReader(rec, idx)
    assert (e.value.key, e.value.offset, e.value.path) == (7, size + 400, str(rec))


def _replace_offset(idx: pathlib.Path, key: int, new: int) -> str:
    lines = idx.read_text().splitlines()
    out = [f"{key}\t{new}" if line.split("\t")[0] == str(key) else line for line in lines]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("cflag", [4, 5, 6, 7])
def test_invalid_cflag(rec_dir, tmp_path, cflag):
    rec, idx = copy_fixture(rec_dir, "yale112_flat", tmp_path)
    off = read_idx(idx)[10]
    (lrec,) = struct.unpack_from("<I", rec.read_bytes(), off + 4)
    patch(rec, off + 4, struct.pack("<I", (lrec & ((1 << 29) - 1)) | (cflag << 29)))
    with RecordIOReader(rec, idx) as reader:
        with pytest.raises(RecordIOError, match=f"invalid cflag {cflag}") as e:
            reader.read(10)
    assert (e.value.key, e.value.offset, e.value.path) == (10, off, str(rec))


def test_length_past_end_of_file(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112_flat", tmp_path)
    off = read_idx(idx)[163]
    rec.write_bytes(rec.read_bytes()[: off + 100])  # cut inside the last record's data
    with RecordIOReader(rec, idx) as reader:
        assert sha(reader.read(162).payload)  # earlier records unaffected
        with pytest.raises(RecordIOError, match="runs past the end of the") as e:
            reader.read(163)
        assert (e.value.key, e.value.offset, e.value.path) == (163, off, str(rec))
        with pytest.raises(RecordIOError, match=f"byte offset {off}: frame length"):
            list(reader.scan())


def test_truncated_padding(tmp_path):
    rec, idx = write_rec(tmp_path, {0: ir(b"abc"), 1: ir(b"12345")})  # 29 data bytes + 3 pad
    off = read_idx(idx)[1]
    rec.write_bytes(rec.read_bytes()[:-2])
    with RecordIOReader(rec, idx) as reader:
        assert reader.read(0).payload == b"abc"
        with pytest.raises(RecordIOError, match="inside the zero padding") as e:
            reader.read(1)
    assert (e.value.key, e.value.offset, e.value.path) == (1, off, str(rec))


def test_truncated_frame_header(tmp_path):
    rec, _ = write_rec(tmp_path, {0: ir(b"abcd")})
    size = rec.stat().st_size
    rec.write_bytes(rec.read_bytes() + MAGIC_BYTES)
    with RecordIOReader(rec) as reader, pytest.raises(RecordIOError) as e:
        list(reader.scan())
    assert "inside a frame header" in str(e.value) and e.value.offset == size


def test_split_record_missing_end_chunk_at_eof(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "split_record", tmp_path)
    (start, cflag, length), _ = frames_of(rec.read_bytes())[:2]
    assert cflag == 1
    end_of_first_chunk = start + 8 + length
    rec.write_bytes(rec.read_bytes()[:end_of_first_chunk])
    idx.unlink()
    with (
        RecordIOReader(rec) as reader,
        pytest.raises(RecordIOError, match="split record starting at byte 0 has no end chunk") as e,
    ):
        reader.read_at(0)
    assert e.value.offset == end_of_first_chunk and e.value.path == str(rec)


def test_split_record_followed_by_new_record(tmp_path):
    rec = tmp_path / "bad.rec"
    first = frame(1, ir(b"abcd"))
    rec.write_bytes(first + frame(0, ir(b"next")))
    with (
        RecordIOReader(rec) as reader,
        pytest.raises(
            RecordIOError, match=r"missing its end chunk: found a new record \(cflag 0\)"
        ) as e,
    ):
        list(reader.scan())
    assert e.value.offset == len(first)


@pytest.mark.parametrize("cflag,word", [(2, "middle"), (3, "end")])
def test_chunk_without_start(tmp_path, cflag, word):
    rec = tmp_path / "bad.rec"
    rec.write_bytes(frame(0, ir(b"ok")) + frame(cflag, b"orphan.."))
    with RecordIOReader(rec) as reader, pytest.raises(RecordIOError, match=f"{word} chunk") as e:
        list(reader.scan())
    assert e.value.offset == len(frame(0, ir(b"ok")))


def test_idx_pointing_at_end_chunk(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "split_record", tmp_path)
    second = frames_of(rec.read_bytes())[1]
    assert second[1] == 3
    idx.write_text(_replace_offset(idx, 0, second[0]))
    with (
        RecordIOReader(rec, idx) as reader,
        pytest.raises(RecordIOError, match=r"end chunk \(cflag 3\) with no start") as e,
    ):
        reader.read(0)
    assert (e.value.key, e.value.offset) == (0, second[0])


def test_missing_key0_insightface(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(RecordIOError, match=r"key 0 .*missing.* record 179 looks like") as e:
        RecDataset(rec, idx)
    assert (e.value.key, e.value.path) == (0, str(idx))
    with pytest.raises(RecordIOError, match="key 0 \\(the insightface header0 record\\)"):
        RecDataset(rec, idx, layout="insightface")
    with RecDataset(rec, idx, layout="flat") as ds:  # forcing flat still works
        assert len(ds) == 179


def test_forced_insightface_on_flat_file(rec_dir):
    with pytest.raises(RecordIOError, match="record 0 is not an insightface header0") as e:
        RecDataset(rec_dir / "yale112_flat", layout="insightface")
    assert (e.value.key, e.value.offset) == (0, 0)


def test_duplicate_key(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    text = idx.read_text()
    offsets = read_idx(idx)
    idx.write_text(text + f"42\t{offsets[43]}\n")
    with pytest.raises(RecordIOError, match="duplicate key 42 on lines 43 and 181") as e:
        RecordIOReader(rec, idx)
    assert (e.value.key, e.value.path, e.value.offset) == (42, str(idx), len(text))


def test_header0_end_disagrees_with_idx(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    patch(rec, 8 + 24 + 4, struct.pack("<f", 181.0))  # header0 = [165, 181)
    with pytest.raises(RecordIOError, match=r"key 180 is missing from the \.idx") as e:
        RecDataset(rec, idx)
    assert (e.value.key, e.value.path) == (180, str(idx))


def test_idx_lacks_identity_record(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    idx.write_text(
        "".join(ln for ln in idx.read_text().splitlines(True) if not ln.startswith("170\t"))
    )
    with pytest.raises(RecordIOError, match="key 170 is missing") as e:
        RecDataset(rec, idx)
    assert e.value.key == 170


def test_idx_has_key_beyond_header0(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    idx.write_text(idx.read_text() + f"{200}\t{read_idx(idx)[3]}\n")
    with pytest.raises(RecordIOError, match=r"key 200 is listed in the \.idx") as e:
        RecDataset(rec, idx)
    assert e.value.key == 200 and "keys exactly 0..179" in str(e.value)


def test_identity_range_does_not_tile(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    off = read_idx(idx)[167]
    patch(rec, off + 8 + 24, struct.pack("<f", 23.0))  # identity 2 = [23, 33) instead of [22, 33)
    with pytest.raises(RecordIOError, match=r"identity 2 covers image keys \[23, 33\)") as e:
        RecDataset(rec, idx)
    assert (e.value.key, e.value.offset, e.value.path) == (167, off, str(rec))


def test_label_flag_larger_than_record(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    patch(rec, 8, struct.pack("<I", 3))  # header0 holds 2 labels = 8 bytes, not 12
    with (
        RecordIOReader(rec, idx) as reader,
        pytest.raises(RecordIOError, match="IRHeader flag 3 asks for 3 float32 labels") as e,
    ):
        reader.read(0)
    assert (e.value.key, e.value.offset, e.value.path) == (0, 0, str(rec))
    assert "at most 2" in str(e.value)


def test_record_shorter_than_irheader(tmp_path):
    rec, idx = write_rec(tmp_path, {0: ir(b"ok"), 1: b"short"})
    with (
        RecordIOReader(rec, idx) as reader,
        pytest.raises(
            RecordIOError, match="record of 5 bytes is shorter than the 24-byte IRHeader"
        ) as e,
    ):
        reader.read(1)
    assert (e.value.key, e.value.offset) == (1, read_idx(idx)[1])


def test_non_integral_image_label(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112_flat", tmp_path)
    off = read_idx(idx)[7]
    patch(rec, off + 8 + 4, struct.pack("<f", 2.5))
    with RecDataset(rec, idx) as ds:
        assert ds.read_image(6)[1] == 0
        with pytest.raises(RecordIOError, match=r"label 2\.5 is not an integer") as e:
            ds.read_image(7)
        assert (e.value.key, e.value.offset, e.value.path) == (7, off, str(rec))
        with pytest.raises(RecordIOError, match="key 7"):
            ds.labels  # noqa: B018 - the property raises


def test_negative_label(tmp_path):
    rec, idx = write_rec(tmp_path, {0: ir(b"a", label=-1.0)})
    with RecDataset(rec, idx) as ds, pytest.raises(RecordIOError, match="negative class label"):
        ds.read_image(0)


def test_non_integral_header0(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    patch(rec, 8 + 24, struct.pack("<f", 165.5))
    with pytest.raises(RecordIOError, match=r"header0 label 165\.5 is not an integer") as e:
        RecDataset(rec, idx)
    assert (e.value.key, e.value.offset) == (0, 0)


@pytest.mark.parametrize(
    "line",
    [
        b"abc\t5\n",
        b"3 40\n",
        b"3\t40\t7\n",
        b"\n",
        b"-3\t40\n",
        b"3\t\n",
        b"\t40\n",
        b"1234567890123456789\t0\n",
        b"3\t4x0\n",
    ],
)
def test_malformed_idx_line(rec_dir, tmp_path, line):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    lines = idx.read_bytes().splitlines(keepends=True)
    lines[2] = line
    idx.write_bytes(b"".join(lines))
    with pytest.raises(RecordIOError, match=r"malformed \.idx line 3") as e:
        RecordIOReader(rec, idx)
    assert e.value.path == str(idx)
    assert e.value.offset == len(lines[0]) + len(lines[1])
    assert isinstance(e.value, DataFormatError) and "key<TAB>offset" in str(e.value)


def test_crlf_idx_is_accepted(rec_dir, tmp_path):
    rec, idx = copy_fixture(rec_dir, "yale112", tmp_path)
    idx.write_bytes(idx.read_bytes().replace(b"\n", b"\r\n"))
    with RecDataset(rec, idx) as ds:
        assert ds.header0 == (165, 180)


@pytest.mark.parametrize("content", [b"15,112", b"a,b,c", b"15,0,112", b""])
def test_malformed_property(tmp_path, content):
    prop = tmp_path / "property"
    prop.write_bytes(content)
    with pytest.raises(RecordIOError, match="property") as e:
        read_property(prop)
    assert e.value.path == str(prop)


def test_empty_idx(tmp_path):
    rec, idx = write_rec(tmp_path, {0: ir(b"a")})
    idx.write_text("")
    with pytest.raises(RecordIOError, match="lists no records"):
        RecDataset(rec, idx)


def test_closed_reader(tmp_path):
    rec, _ = write_rec(tmp_path, {0: ir(b"a")})
    reader = RecordIOReader(rec)
    reader.close()
    assert reader.closed
    with pytest.raises(ValueError, match="closed"):
        reader.read(0)


def test_float32_ambiguous_ranges_are_resolved(rec_dir, monkeypatch):
    """Above 2**24 header0 / identity values are ambiguous; simulate that on small data."""
    import facerec_tf.data.recordio as recordio

    def fuzzy(value: float) -> list[int]:
        n = int(value)
        return [n - 1, n, n + 1] if n >= 2 else [n]

    monkeypatch.setattr(recordio, "float32_int_candidates", fuzzy)
    with RecDataset(rec_dir / "yale112") as ds:
        assert ds.header0 == (165, 180)
        assert ds.identity_ranges[:3].tolist() == [[1, 11], [11, 22], [22, 33]]
        assert ds.identity_ranges[-1].tolist() == [154, 165]
        assert np.array_equal(ds.labels, ds.labels_from_headers())


@pytest.mark.parametrize("name", ["yale112", "yale112_flat", "split_record"])
def test_read_many_gives_the_records_of_read_in_the_order_asked(rec_dir, name):
    with RecordIOReader(rec_dir / name / "train.rec") as reader:
        keys = np.random.default_rng(1).permutation(reader.keys)
        keys = np.concatenate([keys, keys[:3]])  # repeated keys are read again
        got = list(reader.read_many(keys))
        assert got == [reader.read(k) for k in keys.tolist()]
        assert [r.key for r in got] == keys.tolist()
        with pytest.raises(KeyError, match="key 100000 is not in"):
            list(reader.read_many([int(keys[0]), 100000]))
