"""TFRecord shards without TensorFlow: framing, ``tf.train.Example`` encoding, verification.

A TFRecord file is a sequence of records, each::

    uint64 length                      (little endian)
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)``, ``c`` the
CRC-32C (Castagnoli) of ``x``. CRCs come from the ``google-crc32c`` package (C code).

Each record's data is a serialized ``tf.train.Example`` with the three features of
:mod:`facerec_tf.data.schema`. :func:`encode_example` writes it by hand, always with the same
bytes for the same values: map entries sorted by name (``image/encoded``, ``image/key``,
``image/label``), int64 values packed, which is exactly what protobuf's deterministic
serialization (``SerializeToString(deterministic=True)``) produces. So
converter workers need no TensorFlow (and no protobuf) and shards are reproducible byte for
byte. :func:`parse_example` is a small, strict wire-format reader used by :func:`verify_shard`;
it accepts any valid encoding of an ``Example`` (entries in any order, packed or unpacked
int64), not only ours.

:func:`verify_shard` checks a shard without trusting it: every length field is compared with
the bytes left in the file *before* anything is read (TensorFlow 2.21's own reader crashes on a
length claiming 32 GiB), both CRCs of every record, every example's schema keys and label
range, and optionally the record count and the file's sha256. Errors are
:class:`~facerec_tf.errors.TFRecordError` naming the shard, the byte offset of the record and
its index.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import google_crc32c

from facerec_tf.data import schema
from facerec_tf.errors import TFRecordError

__all__ = [
    "FaceExample",
    "ShardStats",
    "TFRecordWriter",
    "decode_example",
    "encode_example",
    "frame_examples",
    "frame_record",
    "iter_records",
    "masked_crc32c",
    "parse_example",
    "read_shard",
    "verify_shard",
]

PathLike = str | os.PathLike

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_LEN = struct.Struct("<Q")
_HEAD = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_HEADER_SIZE = 12  # length + its CRC
_FOOTER_SIZE = 4  # data CRC
_READ_CHUNK = 1 << 20


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = _crc32c(data if type(data) is bytes else bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


_crc32c = google_crc32c.value
_frame_heads: dict[int, bytes] = {}


def _frame_head(n: int) -> bytes:
    """The 12-byte length + length-CRC header of an ``n``-byte record (memoised)."""
    head = _frame_heads.get(n)
    if head is None:
        length = _LEN.pack(n)
        head = length + _CRC.pack(masked_crc32c(length))
        if len(_frame_heads) < 1 << 16:
            _frame_heads[n] = head
    return head


def frame_record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord record (length, its CRC, data, data CRC)."""
    crc = _crc32c(data)
    masked = (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32
    return b"".join((_frame_head(len(data)), data, _CRC.pack(masked)))


# ----------------------------------------------------------------------------------------------
# tf.train.Example encoding (hand-written protobuf wire format)
#
#   Example  { Features features = 1; }
#   Features { map<string, Feature> feature = 1; }   entry: { string key = 1; Feature value = 2; }
#   Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
#                      Int64List int64_list = 3; } }
#   BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
#   Int64List { repeated int64 value = 1 [packed]; }

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5
_TAG1_LEN = 0x0A  # field 1, wire type LEN
_TAG2_LEN = 0x12  # field 2, wire type LEN
_TAG3_LEN = 0x1A  # field 3, wire type LEN


# Varints of 0 .. 2**14 - 1 (one or two bytes), precomputed: lengths of typical face JPEGs.
_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)] + [
    bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(0x80, 0x4000)
]


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int < 2**64."""
    if 0 <= n < 0x4000:
        return _SMALL_VARINTS[n]
    if n < 0x200000:
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_INT64_MIN, _INT64_END = -(1 << 63), 1 << 63


def _int64_varint(v: int) -> bytes:
    """Varint of an int64 (negative values as 10-byte two's complement, like protobuf)."""
    if 0 <= v < _INT64_END:
        return _varint(v)
    if not _INT64_MIN <= v < _INT64_END:
        raise ValueError(f"{v} does not fit in int64")
    return _varint(v + (1 << 64))


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def _int64_entry(name: bytes, value: int) -> bytes:
    """Map entry ``name -> Feature(int64_list=[value])`` as one ``Features.feature`` field."""
    packed = _int64_varint(value)
    int64_list = _len_field(_TAG1_LEN, packed)
    feature = _len_field(_TAG3_LEN, int64_list)
    entry = _len_field(_TAG1_LEN, name) + _len_field(_TAG2_LEN, feature)
    return _len_field(_TAG1_LEN, entry)


def _int64_entry_prefixes(name: bytes) -> list[bytes]:
    """``prefixes[k] + varint`` is :func:`_int64_entry` for a ``k``-byte varint (k = 1..10)."""
    out = [b""]
    for k in range(1, 11):
        varint = b"\x01" * (k - 1) + b"\x00"  # any k-byte varint: only its length matters
        int64_list = _len_field(_TAG1_LEN, varint)
        feature = _len_field(_TAG3_LEN, int64_list)
        entry = _len_field(_TAG1_LEN, _len_field(_TAG1_LEN, name) + _len_field(_TAG2_LEN, feature))
        out.append(entry[: len(entry) - k])
    return out


_IMAGE_NAME = schema.IMAGE_KEY.encode()
_LABEL_NAME = schema.LABEL_KEY.encode()
_SOURCE_NAME = schema.SOURCE_KEY.encode()
_IMAGE_KEY_FIELD = _len_field(_TAG1_LEN, _IMAGE_NAME)
_LABEL_PREFIXES = _int64_entry_prefixes(_LABEL_NAME)
_SOURCE_PREFIXES = _int64_entry_prefixes(_SOURCE_NAME)
# Entries are sorted by name; "image/encoded" sorts first (checked by the tests against
# protobuf's deterministic serialization), the order of the two int64 entries is computed.
_LABEL_FIRST = _LABEL_NAME < _SOURCE_NAME
_HEAD_A = bytes((_TAG1_LEN,))  # Example.features
_HEAD_B = bytes((_TAG1_LEN,))  # Features.feature (the image map entry)
_HEAD_C = bytes((_TAG2_LEN,))  # entry.value (Feature)
_HEAD_D = bytes((_TAG1_LEN,))  # Feature.bytes_list
_HEAD_E = bytes((_TAG1_LEN,))  # BytesList.value


def encode_example(image: bytes, label: int, key: int) -> bytes:
    """Serialize ``tf.train.Example`` ``{image/encoded: image, image/key: key,
    image/label: label}`` deterministically (entries sorted by name, int64 values packed).

    The bytes equal protobuf's ``SerializeToString(deterministic=True)`` of the same example.

    Args:
        image: the encoded image bytes (stored untouched).
        label: the int64 class label.
        key: the int64 source key (record key in the ``.rec``, or file index).
    """
    lv = _int64_varint(label)
    kv = _int64_varint(key)
    if _LABEL_FIRST:
        tail = b"".join((_LABEL_PREFIXES[len(lv)], lv, _SOURCE_PREFIXES[len(kv)], kv))
    else:
        tail = b"".join((_SOURCE_PREFIXES[len(kv)], kv, _LABEL_PREFIXES[len(lv)], lv))
    n = len(image)
    head = _image_heads.get((n, len(tail)))
    if head is None:
        head = _image_head(n, len(tail))
    return b"".join((head, image, tail))


_image_heads: dict[tuple[int, int], bytes] = {}


def _image_head(n: int, tail_len: int) -> bytes:
    """Everything before the image bytes: it depends only on their length and the tail's."""
    vn = _varint(n)
    bytes_list_len = 1 + len(vn) + n
    vbl = _varint(bytes_list_len)
    feature_len = 1 + len(vbl) + bytes_list_len
    vf = _varint(feature_len)
    entry_len = len(_IMAGE_KEY_FIELD) + 1 + len(vf) + feature_len
    ve = _varint(entry_len)
    features_len = 1 + len(ve) + entry_len + tail_len
    parts = (_HEAD_A, _varint(features_len), _HEAD_B, ve, _IMAGE_KEY_FIELD)
    head = b"".join((*parts, _HEAD_C, vf, _HEAD_D, vbl, _HEAD_E, vn))
    if len(_image_heads) < 1 << 16:
        _image_heads[(n, tail_len)] = head
    return head


_KEY_FIRST = not _LABEL_FIRST


_label_pieces: dict[int, bytes] = {}


def _label_piece(label: int) -> bytes:
    """The ``image/label`` map entry of ``label`` (memoised: labels repeat)."""
    piece = _label_pieces.get(label)
    if piece is None:
        lv = _int64_varint(label)
        piece = _LABEL_PREFIXES[len(lv)] + lv
        if len(_label_pieces) < 1 << 22:
            _label_pieces[label] = piece
    return piece


def frame_examples(images, labels, keys, out: list) -> int:
    """Append the framed records of many examples to ``out`` (pieces to join, three per
    record: length + CRC + Example head, the image bytes, Example tail + data CRC).

    ``b"".join`` of the pieces equals ``frame_record(encode_example(image, label, key))`` for
    each ``(image, label, key)``, with less work and one copy less per record. Returns the
    number of bytes appended.
    """
    extend = google_crc32c.extend
    prefixes = _record_prefixes
    pack_crc = _CRC.pack
    small = _SMALL_VARINTS
    source_prefixes = _SOURCE_PREFIXES
    append = out.append
    total = 0
    for image, label, key in zip(images, labels, keys):
        lp = _label_piece(label)
        kv = small[key] if 0 <= key < 0x4000 else _int64_varint(key)
        kp = source_prefixes[len(kv)] + kv
        tail = kp + lp if _KEY_FIRST else lp + kp
        n = len(image)
        entry = prefixes.get((n, len(tail)))
        if entry is None:
            entry = _record_prefix(n, len(tail))
        prefix, head_crc, size = entry
        crc = extend(extend(head_crc, image), tail)
        append(prefix)
        append(image)
        append(tail + pack_crc((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32))
        total += size
    return total


_record_prefixes: dict[tuple[int, int], tuple[bytes, int, int]] = {}


def _record_prefix(n: int, tail_len: int) -> tuple[bytes, int, int]:
    """For an ``n``-byte image and a ``tail_len``-byte tail: the bytes before the image (frame
    header + Example head), the CRC-32C of the Example head, the framed record's size."""
    head = _image_head(n, tail_len)
    data_len = len(head) + n + tail_len
    entry = (_frame_head(data_len) + head, _crc32c(head), data_len + 16)
    if len(_record_prefixes) < 1 << 16:
        _record_prefixes[(n, tail_len)] = entry
    return entry


class _ProtoError(Exception):
    """Malformed protobuf wire data (converted to TFRecordError by the callers)."""


def _read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >> 64:
                raise _ProtoError("varint larger than 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise _ProtoError("varint longer than 10 bytes")


def _fields(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field_number, wire_type, a, b)`` for each field in ``buf[start:end]``.

    For LEN fields ``(a, b)`` is the payload's ``[start, end)``; for VARINT ``a`` is the value;
    for fixed-size fields ``a`` is the payload start.
    """
    pos = start
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wt == _WT_VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield field, wt, value, pos
        elif wt == _WT_LEN:
            n, pos = _read_varint(buf, pos, end)
            if n > end - pos:
                raise _ProtoError(f"length-delimited field of {n} bytes overruns its message")
            yield field, wt, pos, pos + n
            pos += n
        elif wt in (_WT_I64, _WT_I32):
            size = 8 if wt == _WT_I64 else 4
            if pos + size > end:
                raise _ProtoError("truncated fixed-size field")
            yield field, wt, pos, pos + size
            pos += size
        else:
            raise _ProtoError(f"unsupported wire type {wt}")


def _to_int64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _parse_feature(buf: memoryview, start: int, end: int) -> tuple[str, list]:
    kind, values = "none", []
    for field, wt, a, b in _fields(buf, start, end):
        if wt != _WT_LEN or field not in (1, 2, 3):
            continue  # unknown field: skipped, as protobuf does
        # oneof: the last kind seen wins, merged lists of the same kind concatenate.
        new_kind = ("bytes", "float", "int64")[field - 1]
        if new_kind != kind:
            kind, values = new_kind, []
        for f2, wt2, a2, b2 in _fields(buf, a, b):
            if f2 != 1:
                continue
            if kind == "bytes":
                if wt2 != _WT_LEN:
                    raise _ProtoError("BytesList value is not length-delimited")
                values.append(bytes(buf[a2:b2]))
            elif kind == "int64":
                if wt2 == _WT_VARINT:
                    values.append(_to_int64(a2))
                elif wt2 == _WT_LEN:
                    p = a2
                    while p < b2:
                        v, p = _read_varint(buf, p, b2)
                        values.append(_to_int64(v))
                else:
                    raise _ProtoError("Int64List value has a bad wire type")
            else:
                if wt2 == _WT_I32:
                    values.append(struct.unpack_from("<f", buf, a2)[0])
                elif wt2 == _WT_LEN:
                    if (b2 - a2) % 4:
                        raise _ProtoError("packed FloatList is not a multiple of 4 bytes")
                    values.extend(struct.unpack_from(f"<{(b2 - a2) // 4}f", buf, a2))
                else:
                    raise _ProtoError("FloatList value has a bad wire type")
    return kind, values


def parse_example(data: bytes | memoryview) -> dict[str, tuple[str, list]]:
    """Parse a serialized ``tf.train.Example`` into ``{name: (kind, values)}``.

    ``kind`` is ``"bytes"``, ``"int64"``, ``"float"`` or ``"none"`` (an empty ``Feature``).
    Follows protobuf's merge rules (a repeated map key: the last entry wins).

    Raises:
        ValueError: the bytes are not a valid ``Example`` encoding.
    """
    buf = memoryview(data)
    out: dict[str, tuple[str, list]] = {}
    try:
        for field, wt, a, b in _fields(buf, 0, len(buf)):
            if field != 1 or wt != _WT_LEN:
                continue
            for f2, wt2, a2, b2 in _fields(buf, a, b):
                if f2 != 1 or wt2 != _WT_LEN:
                    continue
                name, value = "", ("none", [])
                for f3, wt3, a3, b3 in _fields(buf, a2, b2):
                    if f3 == 1 and wt3 == _WT_LEN:
                        try:
                            name = bytes(buf[a3:b3]).decode("utf-8")
                        except UnicodeDecodeError as e:
                            raise _ProtoError("feature name is not UTF-8") from e
                    elif f3 == 2 and wt3 == _WT_LEN:
                        value = _parse_feature(buf, a3, b3)
                out[name] = value
    except _ProtoError as e:
        raise ValueError(f"not a valid tf.train.Example: {e}") from None
    return out


class FaceExample(NamedTuple):
    """One decoded face example: the image bytes, its label and its source key."""

    image: bytes
    label: int
    key: int


def decode_example(
    data: bytes | memoryview,
    *,
    path: PathLike | None = None,
    offset: int | None = None,
    index: int | None = None,
    num_classes: int | None = None,
) -> FaceExample:
    """Parse and check one face example against :mod:`~facerec_tf.data.schema`.

    Checks: valid ``Example`` encoding; ``image/encoded`` one non-empty JPEG bytes value
    (starts with the SOI marker); ``image/label`` one int64 in ``[0, num_classes)`` (or ``>= 0``
    when ``num_classes`` is ``None``); ``image/key`` absent (the schema's default -1) or one
    int64.

    Raises:
        TFRecordError: naming ``path``, ``offset``, the record ``index`` and the feature key.
    """
    where = f"record {index}: " if index is not None else ""

    def fail(detail: str, key: str | None, expected: str) -> TFRecordError:
        return TFRecordError(where + detail, path=path, offset=offset, key=key, expected=expected)

    try:
        feats = parse_example(data)
    except ValueError as e:
        raise fail(str(e), None, "a serialized tf.train.Example") from None

    def single(name: str, kind: str, required: bool):
        if name not in feats:
            if required:
                raise fail("feature is missing", name, f"one {kind} value")
            return None
        got_kind, values = feats[name]
        if got_kind != kind or len(values) != 1:
            raise fail(
                f"feature holds {len(values)} {got_kind} value(s)", name, f"exactly one {kind}"
            )
        return values[0]

    image = single(schema.IMAGE_KEY, "bytes", True)
    label = single(schema.LABEL_KEY, "int64", True)
    key = single(schema.SOURCE_KEY, "int64", False)
    if not image.startswith(b"\xff\xd8"):
        raise fail(
            f"image does not start with a JPEG SOI marker ({image[:4].hex() or 'empty'})",
            schema.IMAGE_KEY,
            "JPEG bytes starting with ffd8",
        )
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise fail(f"label {label} is out of range", schema.LABEL_KEY, f"a label in {bound}")
    return FaceExample(image, label, -1 if key is None else key)


# ----------------------------------------------------------------------------------------------
# Writing


class TFRecordWriter:
    """Append framed records to a file, keeping a running sha256, count and byte size.

    Records are gathered into blocks of about ``block_size`` bytes, each written and hashed in
    one call (fewer Python-level calls per record). With ``background=True`` a helper thread
    writes and hashes the blocks (both release the GIL) while the caller encodes the next
    ones; at most two blocks wait, so memory stays O(block size).

    Args:
        path: the file to create (truncated if it exists).
        block_size: bytes gathered before a write.
        background: write and hash in a helper thread.

    Use as a context manager or call :meth:`close` (``close(fsync=True)`` also fsyncs).
    """

    def __init__(
        self, path: PathLike, *, block_size: int = 1 << 20, background: bool = False
    ) -> None:
        self.path = os.fspath(path)
        self._f: BinaryIO = open(self.path, "wb", buffering=0)
        self._fd = self._f.fileno()
        self._sha = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._block_size = block_size
        self.num_records = 0
        self.bytes = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=2)
            self._thread = threading.Thread(
                target=self._drain_queue, name="tfrecord-writer", daemon=True
            )
            self._thread.start()

    def write(self, data: bytes) -> None:
        """Append ``data`` as one record."""
        record = frame_record(data)
        self._pending.append(record)
        self._pending_bytes += len(record)
        self.num_records += 1
        if self._pending_bytes >= self._block_size:
            self.flush()

    def write_examples(self, images, labels, keys) -> None:
        """Append one face example per ``(image, label, key)`` (see :func:`frame_examples`)."""
        self._pending_bytes += frame_examples(images, labels, keys, self._pending)
        self.num_records += len(images)
        if self._pending_bytes >= self._block_size:
            self.flush()

    def _consume(self, block: bytes) -> None:
        """Hash and write one block."""
        self._sha.update(block)
        view = memoryview(block)
        while view:
            view = view[os.write(self._fd, view) :]

    def _drain_queue(self) -> None:
        """The helper thread: write and hash blocks until ``None``; keep the first error."""
        assert self._queue is not None
        while True:
            block = self._queue.get()
            try:
                if block is None:
                    return
                if self._error is None:
                    self._consume(block)
            except BaseException as e:  # re-raised in the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def flush(self) -> None:
        """Write and hash the gathered records (hand them to the helper thread)."""
        if not self._pending:
            return
        block = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self.bytes += len(block)
        if self._queue is None:
            self._consume(block)
        else:
            self._raise_error()
            self._queue.put(block)

    def _sync(self) -> None:
        """Flush and wait until every block is written and hashed."""
        self.flush()
        if self._queue is not None:
            self._queue.join()
            self._raise_error()

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def discard(self) -> None:
        """Drop the gathered records and close the file without flushing (error paths)."""
        self._pending.clear()
        self._pending_bytes = 0
        self._stop_thread()
        self._error = None
        self._f.close()

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far (flushes)."""
        if not self._f.closed:
            self._sync()
        return self._sha.hexdigest()

    def close(self, *, fsync: bool = False) -> None:
        """Flush (and optionally fsync) and close; idempotent."""
        if self._f.closed:
            return
        try:
            self._sync()
            if fsync:
                os.fsync(self._fd)
        finally:
            self._stop_thread()
            self._f.close()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Reading and verification


@dataclass(frozen=True, slots=True)
class ShardStats:
    """What :func:`verify_shard` found.

    Attributes:
        path: the shard.
        num_records: number of records.
        bytes: file size.
        sha256: hex sha256 of the file.
        label_min, label_max: smallest / largest label (``None`` for an empty shard).
    """

    path: str
    num_records: int
    bytes: int
    sha256: str
    label_min: int | None
    label_max: int | None


def iter_records(path: PathLike, *, _hasher: Any = None) -> Iterator[tuple[int, int, bytes]]:
    """Iterate over a TFRecord file's records, checking framing and both CRCs.

    Each length field is checked against the bytes left in the file before the data is read,
    so a corrupt length cannot make us allocate or read gigabytes.

    Yields:
        ``(index, offset, data)``: the record index, the byte offset of its length field and
        its data.

    Raises:
        TFRecordError: naming the file, the record's byte offset and its index.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb", buffering=_READ_CHUNK)
    except OSError as e:
        raise TFRecordError(f"cannot open shard: {e}", path=path) from e
    with f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        index = 0
        while pos < size:
            left = size - pos
            if left < _HEADER_SIZE:
                raise TFRecordError(
                    f"record {index}: the file ends inside a record header ({left} of "
                    f"{_HEADER_SIZE} bytes)",
                    path=path,
                    offset=pos,
                    expected="a 12-byte length + length-CRC header",
                )
            head = f.read(_HEADER_SIZE)
            if len(head) != _HEADER_SIZE:  # pragma: no cover - file shrank while reading
                raise TFRecordError("short read: file changed while reading", path=path, offset=pos)
            if _hasher is not None:
                _hasher.update(head)
            length, length_crc = _HEAD.unpack(head)
            room = left - _HEADER_SIZE - _FOOTER_SIZE
            want_crc = masked_crc32c(head[:8])
            if length_crc != want_crc:
                fits = "fits in" if length <= room else "runs past"
                raise TFRecordError(
                    f"record {index}: length-field CRC mismatch (stored 0x{length_crc:08x}, "
                    f"computed 0x{want_crc:08x}): the length field is corrupt; it claims "
                    f"{length} bytes, which {fits} the {max(room, 0)} bytes left in the file",
                    path=path,
                    offset=pos,
                    expected="the masked CRC-32C of the 8 length bytes",
                )
            if length > room:
                raise TFRecordError(
                    f"record {index}: length field claims {length} bytes but only "
                    f"{max(room, 0)} bytes of data can follow before the end of the "
                    f"{size}-byte file",
                    path=path,
                    offset=pos,
                    expected=f"a length of at most {max(room, 0)}",
                )
            body = f.read(length + _FOOTER_SIZE)
            if len(body) != length + _FOOTER_SIZE:  # pragma: no cover - file shrank
                raise TFRecordError("short read: file changed while reading", path=path, offset=pos)
            if _hasher is not None:
                _hasher.update(body)
            data = body[:length]
            (data_crc,) = _CRC.unpack_from(body, length)
            want_crc = masked_crc32c(data)
            if data_crc != want_crc:
                raise TFRecordError(
                    f"record {index}: data CRC mismatch (stored 0x{data_crc:08x}, computed "
                    f"0x{want_crc:08x}) for the {length} data bytes at byte "
                    f"{pos + _HEADER_SIZE}",
                    path=path,
                    offset=pos,
                    expected="the masked CRC-32C of the record data",
                )
            yield index, pos, data
            pos += _HEADER_SIZE + length + _FOOTER_SIZE
            index += 1


def read_shard(path: PathLike, *, num_classes: int | None = None) -> Iterator[FaceExample]:
    """Iterate over the decoded, schema-checked examples of a shard (see :func:`verify_shard`)."""
    for index, offset, data in iter_records(path):
        yield decode_example(data, path=path, offset=offset, index=index, num_classes=num_classes)


def verify_shard(
    path: PathLike,
    expected_records: int | None = None,
    expected_sha256: str | None = None,
    *,
    num_classes: int | None = None,
    on_example: Callable[[FaceExample], None] | None = None,
) -> ShardStats:
    """Check a TFRecord shard from the first byte to the last.

    Args:
        path: the shard.
        expected_records: the number of records it must hold (``None``: not checked).
        expected_sha256: the hex sha256 the file must have (``None``: not checked).
        num_classes: labels must be in ``[0, num_classes)`` (``None``: only ``>= 0``).
        on_example: called with each decoded :class:`FaceExample` (e.g. to collect keys).

    Returns:
        a :class:`ShardStats`.

    Raises:
        TFRecordError: bad framing, a CRC mismatch, a length field larger than the rest of the
            file (reported, never read), an example that does not parse or lacks the schema
            keys, a label out of range, or a count / sha256 that differs from the expected one.
            The message names the shard and the byte offset (and the record index).
    """
    path = os.fspath(path)
    hasher = hashlib.sha256()
    n = 0
    lo: int | None = None
    hi: int | None = None
    for index, offset, data in iter_records(path, _hasher=hasher):
        ex = decode_example(data, path=path, offset=offset, index=index, num_classes=num_classes)
        if lo is None or ex.label < lo:
            lo = ex.label
        if hi is None or ex.label > hi:
            hi = ex.label
        if on_example is not None:
            on_example(ex)
        n += 1
    size = os.path.getsize(path)
    if expected_records is not None and n != expected_records:
        raise TFRecordError(
            f"holds {n} records",
            path=path,
            offset=size,
            expected=f"{expected_records} records",
        )
    digest = hasher.hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise TFRecordError(
            f"sha256 {digest} differs from the expected one although every record is "
            "well framed (the file was modified or replaced)",
            path=path,
            offset=0,
            expected=f"sha256 {expected_sha256}",
        )
    return ShardStats(path, n, size, digest, lo, hi)
