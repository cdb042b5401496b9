"""Pure-Python reader for MXNet RecordIO files (``.rec`` + ``.idx`` + ``property``).

No MXNet (and no TensorFlow) is needed: only the standard library and numpy.

File format (what MXNet's ``dmlc::RecordIOWriter`` writes):

* A ``.rec`` file is a sequence of *frames*. Each frame is the little-endian ``uint32`` magic
  ``0xced7230a``, a ``uint32`` ``lrecord`` (``cflag = lrecord >> 29``,
  ``length = lrecord & (2**29 - 1)``), ``length`` data bytes, then zero padding up to a
  multiple of 4 bytes.
* ``cflag`` 0 is a whole record. When a record contains the magic word at a 4-byte-aligned
  position, the writer cuts the record there and drops the magic word: the pieces are written
  as a start frame (cflag 1), middle frames (cflag 2) and an end frame (cflag 3). The reader
  puts the 4 magic bytes back between the pieces, so records come back byte for byte.
* A *record* (what the writer was given) is an ``IRHeader`` packed as ``<IfQQ`` (flag,
  label, id, id2), then ``flag`` float32 labels when ``flag > 0`` (the header's ``label``
  field is then unused), then the *payload* (usually JPEG bytes).
* The ``.idx`` file has one ``"key\\toffset\\n"`` line per record: the record key and the
  byte offset of its first frame in the ``.rec``.

Two dataset layouts are understood by :class:`RecDataset`:

* **insightface**: record 0 is "header0" (flag 2, labels ``[first_identity_key, end_key]``,
  empty payload); records ``1 .. first_identity_key - 1`` are images with a scalar label;
  records ``first_identity_key .. end_key - 1`` are one per identity, each with flag 2 and
  labels ``[first_image_key, end_image_key)``. A ``property`` file holds ``num_classes,h,w``.
* **flat** (``im2rec``): every key in the ``.idx`` is an image record (keys usually from 0).

Terms used below: *record* = the reassembled bytes given to the writer (header + labels +
payload); *payload* = the bytes after the header and labels.

Nothing here reads a whole ``.rec`` into memory: records are read with ``os.pread`` at the
offsets from the ``.idx``, which is held as two numpy ``int64`` arrays (16 bytes a record, or
8 when the keys are contiguous), so a 42M-record index costs well under 1 GB. ``os.pread`` on
one shared descriptor is safe from several threads at once.
"""

from __future__ import annotations

import math
import operator
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, NamedTuple, NoReturn

import numpy as np

from facerec_tf.errors import RecordIOError

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecDataset",
    "Record",
    "RecordIOReader",
    "float32_int_candidates",
    "read_property",
    "unpack_header",
    "unpack_record",
]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_FRAME_IR = struct.Struct("<IIIfQQ")  # a frame header followed by an IRHeader
IR_SIZE = _IR.size  # 24
_FLOAT32_EXACT = 1 << 24  # every integer below this is exact in float32

# Bytes read past a record's header when the record's extent is unknown.
_DEFAULT_READAHEAD = 64 * 1024
# Cap on one read when the .idx says a record spans more than this (sparse index).
_MAX_READAHEAD = 4 * 1024 * 1024
# Keys looked up at once by RecordIOReader.read_many.
_MANY_CHUNK = 1024
# Chunk size used to parse big .idx files.
_IDX_CHUNK = 64 * 1024 * 1024
# Longest decimal field accepted in a .idx line (fits int64 without overflow).
_MAX_IDX_DIGITS = 18
_IDX_LINE = re.compile(rb"(\d{1,18})\t(\d{1,18})")

PathLike = str | os.PathLike


class IRHeader(NamedTuple):
    """An unpacked MXNet ``IRHeader``.

    Attributes:
        flag: number of float32 labels that follow the header (0: the scalar ``label`` is used).
        label: the header's scalar float32 label (meaningful only when ``flag == 0``).
        labels: the ``flag`` float32 labels that follow the header (empty when ``flag == 0``).
        id: the header's ``id`` field (uint64).
        id2: the header's ``id2`` field (uint64).
    """

    flag: int
    label: float
    labels: tuple[float, ...]
    id: int
    id2: int


class Record(NamedTuple):
    """One record of a ``.rec`` file (immutable).

    Attributes:
        key: the ``.idx`` key, or ``None`` when the record was read by offset.
        offset: byte offset of the record's first frame in the ``.rec``.
        flag: IRHeader flag (number of float labels after the header).
        label: IRHeader scalar label (meaningful only when ``flag == 0``).
        labels: the ``flag`` float labels that follow the header (empty when ``flag == 0``).
        id: IRHeader ``id``.
        id2: IRHeader ``id2``.
        payload: the bytes after header and labels (the JPEG for an image record).
    """

    key: int | None
    offset: int
    flag: int
    label: float
    labels: tuple[float, ...]
    id: int
    id2: int
    payload: bytes

    @property
    def label_values(self) -> tuple[float, ...]:
        """The labels as MXNet's ``unpack`` reports them: ``(label,)`` or ``labels``."""
        return self.labels if self.flag else (self.label,)

    def class_label(self, path: PathLike | None = None) -> int:
        """The record's class label as an exact ``int``.

        Follows insightface: a scalar label (``flag == 0``) is the class; with ``flag >= 1``
        the first float label is. Raises :class:`RecordIOError` (naming ``path``, the key and
        the offset) when the value is not an integer.
        """
        value = self.labels[0] if self.flag else self.label
        return _exact_int(value, what="label", path=path, key=self.key, offset=self.offset)


def _exact_int(
    value: float, *, what: str, path: PathLike | None, key: int | None, offset: int | None
) -> int:
    """``int(value)`` if ``value`` is a finite integral float, else :class:`RecordIOError`."""
    if not math.isfinite(value) or value != math.floor(value):
        raise RecordIOError(
            f"{what} {value!r} is not an integer",
            path=path,
            key=key,
            offset=offset,
            expected="an integral float32 value",
        )
    return int(value)


def float32_int_candidates(value: float) -> list[int]:
    """All integers ``n`` with ``float32(n) == float32(value)``, for an integral ``value``.

    Below 2**24 this is ``[int(value)]``. Above, float32 cannot represent every integer, so
    insightface's float32 key ranges (header0 and identity records of files with more than
    16.7M records) are ambiguous by a few units; :class:`RecDataset` uses this list to pick the
    value that agrees with the ``.idx`` and the records themselves.
    """
    v = np.float32(value)
    if abs(float(v)) < _FLOAT32_EXACT:
        return [int(v)]
    ulp = int(np.spacing(np.abs(v)))
    centre = int(v)
    return [n for n in range(centre - ulp, centre + ulp + 1) if np.float32(n) == v]


def unpack_header(
    buf: bytes | memoryview,
    *,
    path: PathLike | None = None,
    key: int | None = None,
    offset: int | None = None,
) -> tuple[IRHeader, int]:
    """Unpack the ``IRHeader`` (and its float labels) at the start of a record.

    Args:
        buf: the reassembled record bytes.
        path, key, offset: where the record comes from, used only in error messages.

    Returns:
        ``(header, payload_start)``: the header and the index in ``buf`` where the payload
        starts (``24 + 4 * flag``).

    Raises:
        RecordIOError: the record is shorter than the 24-byte header, or its ``flag`` asks for
            more float labels than the record holds.
    """
    size = len(buf)
    if size < IR_SIZE:
        raise RecordIOError(
            f"record of {size} bytes is shorter than the {IR_SIZE}-byte IRHeader",
            path=path,
            key=key,
            offset=offset,
            expected=f"at least {IR_SIZE} bytes",
        )
    flag, label, id_, id2 = _IR.unpack_from(buf, 0)
    if flag == 0:
        return IRHeader(0, label, (), id_, id2), IR_SIZE
    start = IR_SIZE + 4 * flag
    if start > size:
        raise RecordIOError(
            f"IRHeader flag {flag} asks for {flag} float32 labels ({4 * flag} bytes) but only "
            f"{size - IR_SIZE} bytes follow the header",
            path=path,
            key=key,
            offset=offset,
            expected=f"a label flag of at most {(size - IR_SIZE) // 4}",
        )
    labels = struct.unpack_from(f"<{flag}f", buf, IR_SIZE)
    return IRHeader(flag, label, labels, id_, id2), start


def unpack_record(
    buf: bytes | memoryview,
    *,
    path: PathLike | None = None,
    key: int | None = None,
    offset: int = 0,
) -> Record:
    """Unpack reassembled record bytes into a :class:`Record` (see :func:`unpack_header`)."""
    header, start = unpack_header(buf, path=path, key=key, offset=offset)
    return Record(
        key,
        offset,
        header.flag,
        header.label,
        header.labels,
        header.id,
        header.id2,
        bytes(buf[start:]),
    )


def read_property(path: PathLike) -> tuple[int, int, int]:
    """Read an insightface ``property`` file (``"num_classes,height,width"``).

    Args:
        path: the ``property`` file, or the dataset folder that holds it.

    Returns:
        ``(num_classes, height, width)`` as positive ints.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "property")
    try:
        with open(path, "rb") as f:
            text = f.read(4096)
    except OSError as e:
        raise RecordIOError(f"cannot read property file: {e}", path=path) from e
    fields = text.strip().split(b",")
    if len(fields) != 3 or not all(re.fullmatch(rb"\s*[0-9]+\s*", f) for f in fields):
        raise RecordIOError(
            f"malformed property file content {text[:80]!r}",
            path=path,
            offset=0,
            expected="'num_classes,height,width' as three positive integers",
        )
    num_classes, height, width = (int(f) for f in fields)
    if min(num_classes, height, width) <= 0:
        raise RecordIOError(
            f"property values must be positive, got {num_classes},{height},{width}",
            path=path,
            offset=0,
            expected="three positive integers",
        )
    return num_classes, height, width


# ----------------------------------------------------------------------------------------------
# .idx parsing


def _idx_line_offset(idx_path: str, line_no: int) -> int:
    """Byte offset of 1-based line ``line_no`` in ``idx_path`` (error path only)."""
    pos = 0
    with open(idx_path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if n == line_no:
                return pos
            pos += len(line)
    return pos


def _raise_idx_syntax_error(idx_path: str) -> NoReturn:
    """Find the first malformed line of ``idx_path`` and raise a precise error (slow path)."""
    pos = 0
    with open(idx_path, "rb") as f:
        for n, line in enumerate(f, start=1):
            body = line[:-1] if line.endswith(b"\n") else line
            if body.endswith(b"\r"):
                body = body[:-1]
            if not _IDX_LINE.fullmatch(body):
                if not body.strip():
                    why = "empty line"
                elif len(fields := body.split(b"\t")) != 2:
                    why = f"{len(fields)} tab-separated fields instead of 2"
                else:
                    why = "a field that is not a non-negative integer of at most 18 digits"
                raise RecordIOError(
                    f"malformed .idx line {n} {body[:60]!r}: {why}",
                    path=idx_path,
                    offset=pos,
                    expected="'key<TAB>offset' with two non-negative decimal integers",
                )
            pos += len(line)
    raise RecordIOError(  # pragma: no cover - the fast path and this path agree
        "malformed .idx file", path=idx_path, expected="'key<TAB>offset' lines"
    )


def _parse_idx_chunk(chunk: bytes, idx_path: str) -> np.ndarray:
    """Parse complete ``key\\toffset\\n`` lines into an ``[n, 2]`` int64 array (vectorised)."""
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    arr = np.frombuffer(chunk, dtype=np.uint8)
    is_tab = arr == 9
    is_nl = arr == 10
    seps = np.flatnonzero(is_tab | is_nl)
    ok = (
        len(seps) % 2 == 0
        and bool(np.all(((arr >= 48) & (arr <= 57)) | is_tab | is_nl))
        and bool(np.all(arr[seps[0::2]] == 9))
        and bool(np.all(arr[seps[1::2]] == 10))
    )
    if ok and len(seps):
        widths = np.diff(seps, prepend=-1) - 1  # digits in each field
        ok = bool(widths.min() >= 1) and bool(widths.max() <= _MAX_IDX_DIGITS)
    if not ok:
        _raise_idx_syntax_error(idx_path)
    n = len(seps) // 2
    if n == 0:
        return np.empty((0, 2), dtype=np.int64)
    values = np.fromstring(chunk, dtype=np.int64, sep=" ")  # text mode: exact int64 parse
    if values.size != 2 * n:  # pragma: no cover - guaranteed by the checks above
        _raise_idx_syntax_error(idx_path)
    return values.reshape(n, 2)


def _read_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``.idx`` file into ``(keys, offsets)`` int64 arrays in file order."""
    parts = []
    rest = b""
    try:
        f = open(idx_path, "rb")  # closed by the with below
    except OSError as e:
        raise RecordIOError(f"cannot open .idx file: {e}", path=idx_path) from e
    with f:
        while True:
            block = f.read(_IDX_CHUNK)
            data = rest + block
            if not block:
                if data:
                    parts.append(_parse_idx_chunk(data + b"\n", idx_path))
                break
            cut = data.rfind(b"\n") + 1
            if cut:
                parts.append(_parse_idx_chunk(data[:cut], idx_path))
            rest = data[cut:]
    table = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)
    return np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1])


# ----------------------------------------------------------------------------------------------
# Reader


class _Window:
    """A slice of the file kept between frames (scan read-ahead)."""

    __slots__ = ("base", "buf")

    def __init__(self) -> None:
        self.buf = b""
        self.base = 0


class RecordIOReader:
    """Random-access and sequential reader of an MXNet ``.rec`` file.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` file. ``None`` (default) uses the sibling ``<stem>.idx`` when it
            exists; without an index only :meth:`scan` and :meth:`read_at` work.

    The reader holds one file descriptor; use it as a context manager or call :meth:`close`.

    Raises:
        RecordIOError: malformed ``.idx`` line, duplicate key, or an offset that is not
            4-byte aligned or leaves no room for a frame header in the ``.rec``.
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike | None = None) -> None:
        self.path = os.fspath(rec_path)
        if idx_path is None:
            guess = os.path.splitext(self.path)[0] + ".idx"
            idx_path = guess if os.path.exists(guess) else None
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise RecordIOError(f"cannot open .rec file: {e}", path=self.path) from e
        try:
            self.size = os.fstat(self._fd).st_size
            self._load_index()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    # -- index ---------------------------------------------------------------------------------

    def _load_index(self) -> None:
        self._k0 = 0
        self._n = 0
        self._keys: np.ndarray | None = None  # None when keys are k0 .. k0 + n - 1
        self._offsets = np.empty(0, dtype=np.int64)
        self._ends: np.ndarray | None = None  # None when offsets increase with the key
        if self.idx_path is None:
            return
        keys, offsets = _read_idx(self.idx_path)
        bad = np.flatnonzero((offsets + 8 > self.size) | (offsets % 4 != 0))
        if bad.size:
            i = int(bad[0])
            off, key = int(offsets[i]), int(keys[i])
            if off % 4:
                detail = f"offset {off} is not 4-byte aligned, so it cannot be a record start"
                expected = "a multiple of 4"
            elif off >= self.size:
                detail = f"offset {off} is past the end of the {self.size}-byte file"
                expected = f"an offset below {self.size - 8}"
            else:
                detail = f"offset {off} leaves no room for an 8-byte frame header"
                expected = f"an offset below {self.size - 8}"
            raise RecordIOError(
                f"{detail} (from {self.idx_path} line {i + 1})",
                path=self.path,
                key=key,
                offset=off,
                expected=expected,
            )
        if keys.size and not bool(np.all(keys[1:] > keys[:-1])):
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
            if dup.size:
                j = int(dup[0])
                first, again = int(order[j]) + 1, int(order[j + 1]) + 1
                key = int(sorted_keys[j])
                raise RecordIOError(
                    f"duplicate key {key} on lines {first} and {again}",
                    path=self.idx_path,
                    key=key,
                    offset=_idx_line_offset(self.idx_path, again),
                    expected="each key once",
                )
            keys, offsets = sorted_keys, offsets[order]
        n = int(keys.size)
        self._n = n
        self._offsets = offsets
        if n:
            self._k0 = int(keys[0])
            if int(keys[-1]) - self._k0 != n - 1:
                self._keys = keys
        if n > 1 and not bool(np.all(offsets[1:] > offsets[:-1])):
            by_offset = np.argsort(offsets, kind="stable")
            ends = np.empty(n, dtype=np.int64)
            ends[by_offset[:-1]] = offsets[by_offset[1:]]
            ends[by_offset[-1]] = self.size
            self._ends = ends

    @property
    def keys(self) -> np.ndarray:
        """Sorted int64 array of the keys in the ``.idx`` (empty without an index)."""
        if self._keys is not None:
            return self._keys
        return np.arange(self._k0, self._k0 + self._n, dtype=np.int64)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, key: object) -> bool:
        try:
            self._position(operator.index(key))  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def _position(self, key: int) -> int:
        if self._keys is None:
            i = key - self._k0
            if 0 <= i < self._n:
                return i
        else:
            i = int(np.searchsorted(self._keys, key))
            if i < self._n and int(self._keys[i]) == key:
                return i
        if self.idx_path is None:
            raise KeyError(f"{self.path}: no .idx file, so records cannot be read by key")
        raise KeyError(f"key {key} is not in {self.idx_path}")

    def offset_of(self, key: int) -> int:
        """Byte offset of ``key``'s first frame (``KeyError`` if the key is not indexed)."""
        return int(self._offsets[self._position(operator.index(key))])

    # -- reading -------------------------------------------------------------------------------

    def read(self, key: int) -> Record:
        """Read the record with ``key`` (one ``pread`` in the common case).

        Raises:
            KeyError: ``key`` is not in the ``.idx``.
            RecordIOError: the frames at the indexed offset are malformed.
        """
        key = operator.index(key)
        raw, offset = self._read_indexed(key)
        return unpack_record(raw, path=self.path, key=key, offset=offset)

    def read_many(self, keys: Iterable[int]) -> Iterator[Record]:
        """The records of ``keys``, in the order given (one ``pread`` per record in the common
        case: each record is read with the bytes up to the next indexed offset).

        Raises, when the iteration reaches the record:
            KeyError: a key is not in the ``.idx``.
            RecordIOError: the frames at a key's indexed offset are malformed.
        """
        keys = np.asarray(keys, dtype=np.int64)
        path, fd, size = self.path, self._fd, self.size
        pread, head = os.pread, _FRAME_IR.unpack_from
        if fd < 0:
            raise ValueError(f"{path}: reader is closed")
        for c0 in range(0, keys.size, _MANY_CHUNK):
            chunk = keys[c0 : c0 + _MANY_CHUNK]
            pos = self._positions(chunk)
            offsets = self._offsets[pos]
            if self._ends is not None:
                ends = self._ends[pos]
            else:
                nxt = np.minimum(pos + 1, self._n - 1)
                ends = np.where(pos + 1 < self._n, self._offsets[nxt], self.size)
            wants = ends - offsets
            wants = np.where((wants >= 8) & (wants <= _MAX_READAHEAD), wants, _DEFAULT_READAHEAD)
            for key, offset, want in zip(chunk.tolist(), offsets.tolist(), wants.tolist()):
                buf = pread(fd, want, offset)
                # The common shape, checked here in one go: a whole record in one frame
                # (cflag 0) that ends, padding included, inside the bytes read and the file,
                # with a header and its labels. Anything else takes the careful path below.
                if len(buf) >= 32:
                    magic, lrec, flag, label, id_, id2 = head(buf, 0)
                    end = 8 + lrec
                    start = 32 + 4 * flag
                    if (
                        magic == MAGIC
                        and lrec <= _LENGTH_MASK
                        and start <= end <= len(buf)
                        and offset + 8 + ((lrec + 3) & ~3) <= size
                    ):
                        labels = struct.unpack_from(f"<{flag}f", buf, 32) if flag else ()
                        yield Record(key, offset, flag, label, labels, id_, id2, buf[start:end])
                        continue
                raw, _ = self._read_frames(offset, key, want, _Window(), from_index=True)
                yield unpack_record(raw, path=path, key=key, offset=offset)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Index positions of many keys at once (``KeyError`` names the first missing key)."""
        if self._keys is None:
            pos = keys - self._k0
            bad = (pos < 0) | (pos >= self._n)
        else:
            pos = np.minimum(np.searchsorted(self._keys, keys), max(self._n - 1, 0))
            bad = self._keys[pos] != keys if self._n else np.ones(keys.shape, bool)
        if bad.any():
            self._position(int(keys[np.flatnonzero(bad)[0]]))  # raises the KeyError
        return pos

    def read_raw(self, key: int) -> bytes:
        """The reassembled record bytes (header + labels + payload) of ``key``."""
        return bytes(self._read_indexed(operator.index(key))[0])

    def _read_indexed(self, key: int) -> tuple[bytes | memoryview, int]:
        i = self._position(key)
        offset = int(self._offsets[i])
        if self._ends is not None:
            end = int(self._ends[i])
        else:
            end = int(self._offsets[i + 1]) if i + 1 < self._n else self.size
        extent = end - offset
        want = extent if 8 <= extent <= _MAX_READAHEAD else _DEFAULT_READAHEAD
        raw, _ = self._read_frames(offset, key, want, _Window(), from_index=True)
        return raw, offset

    def read_at(self, offset: int, key: int | None = None) -> Record:
        """Read the record whose first frame starts at byte ``offset``."""
        raw, _ = self._read_frames(offset, key, _DEFAULT_READAHEAD, _Window(), from_index=False)
        return unpack_record(raw, path=self.path, key=key, offset=offset)

    def scan(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """Iterate over the file's records in file order without using the ``.idx``.

        Yields:
            ``(offset, record_bytes)``: the byte offset of each record's first frame and the
            reassembled record (header + labels + payload; see :func:`unpack_record`).
        """
        window = _Window()
        pos = start
        while pos < self.size:
            raw, nxt = self._read_frames(pos, None, 1 << 20, window, from_index=False)
            yield pos, bytes(raw)
            pos = nxt

    def _err(self, detail: str, offset: int, key: int | None, expected: str) -> RecordIOError:
        return RecordIOError(detail, path=self.path, offset=offset, key=key, expected=expected)

    def _read_frames(
        self, offset: int, key: int | None, want: int, win: _Window, *, from_index: bool
    ) -> tuple[bytes | memoryview, int]:
        """Read and reassemble the frames of the record starting at ``offset``.

        Returns the record bytes and the offset just past its last frame (padding included).
        """
        if self._fd < 0:
            raise ValueError(f"{self.path}: reader is closed")
        if offset < 0:
            raise ValueError(f"{self.path}: negative offset {offset}")
        size = self.size
        pos = offset
        parts: list[memoryview] = []
        while True:
            in_split = bool(parts)
            if pos + 8 > size:
                if in_split:
                    raise self._err(
                        f"split record starting at byte {offset} has no end chunk: the file "
                        f"ends at byte {size}",
                        pos,
                        key,
                        "a middle or end chunk (cflag 2 or 3)",
                    )
                raise self._err(
                    f"file ends inside a frame header ({size - pos} of 8 bytes left)",
                    pos,
                    key,
                    "an 8-byte magic + lrecord frame header",
                )
            rel = pos - win.base
            if rel < 0 or rel + 8 > len(win.buf):
                win.buf = os.pread(self._fd, max(8, min(want, size - pos)), pos)
                win.base, rel = pos, 0
                if len(win.buf) < 8:
                    raise self._err("short read: file changed while reading", pos, key, "8 bytes")
            magic, lrec = _FRAME.unpack_from(win.buf, rel)
            if magic != MAGIC:
                if from_index and not in_split:
                    detail = (
                        f"the .idx offset does not point at a RecordIO magic word "
                        f"(found 0x{magic:08x}; {self.idx_path})"
                    )
                else:
                    detail = f"bad magic word 0x{magic:08x}"
                raise self._err(detail, pos, key, f"magic 0x{MAGIC:08x}")
            cflag = lrec >> 29
            length = lrec & _LENGTH_MASK
            if cflag > 3:
                raise self._err(
                    f"invalid cflag {cflag} in lrecord 0x{lrec:08x}", pos, key, "cflag 0, 1, 2 or 3"
                )
            if in_split and cflag in (0, 1):
                raise self._err(
                    f"split record starting at byte {offset} is missing its end chunk: found a "
                    f"new record (cflag {cflag})",
                    pos,
                    key,
                    "a middle or end chunk (cflag 2 or 3)",
                )
            if not in_split and cflag in (2, 3):
                raise self._err(
                    f"{'middle' if cflag == 2 else 'end'} chunk (cflag {cflag}) with no start "
                    "chunk before it",
                    pos,
                    key,
                    "a whole record (cflag 0) or a start chunk (cflag 1)",
                )
            padded = (length + 3) & ~3
            if pos + 8 + length > size:
                raise self._err(
                    f"frame length {length} runs past the end of the {size}-byte file",
                    pos,
                    key,
                    f"at most {size - pos - 8} data bytes",
                )
            if pos + 8 + padded > size:
                raise self._err(
                    f"file ends inside the zero padding of a {length}-byte frame "
                    f"({pos + 8 + padded - size} padding bytes missing)",
                    pos,
                    key,
                    f"the frame padded to {8 + padded} bytes",
                )
            if rel + 8 + padded > len(win.buf):
                win.buf = os.pread(self._fd, max(8 + padded, min(want, size - pos)), pos)
                win.base, rel = pos, 0
                if len(win.buf) < 8 + padded:
                    raise self._err(
                        "short read: file changed while reading", pos, key, f"{8 + padded} bytes"
                    )
            data = memoryview(win.buf)[rel + 8 : rel + 8 + length]
            pos += 8 + padded
            if cflag == 0:
                return data, pos
            parts.append(data)
            if cflag == 3:
                return MAGIC_BYTES.join(parts), pos

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd < 0

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"RecordIOReader({self.path!r}, idx={self.idx_path!r}, records={self._n})"


# ----------------------------------------------------------------------------------------------
# Dataset view


Layout = Literal["auto", "insightface", "flat"]


class RecDataset:
    """An image dataset stored as a ``.rec`` / ``.idx`` pair, in insightface or flat layout.

    Args:
        path: the ``.rec`` file, or a folder holding ``train.rec`` and ``train.idx``.
        idx_path: the ``.idx`` (default: beside the ``.rec``); it is required.
        layout: ``"auto"`` (default) picks ``"insightface"`` when key 0 is a header0 record
            (flag 2, empty payload), else ``"flat"``. When key 0 is absent but the record with
            the highest key looks like an insightface identity record (flag 2, empty payload),
            auto-detection raises instead of silently reading identity records as images; pass
            ``layout="flat"`` to force that. ``"insightface"`` requires key 0 to be header0.

    Attributes:
        reader: the underlying :class:`RecordIOReader`.
        layout: ``"insightface"`` or ``"flat"``.
        image_keys: sorted int64 array of the image record keys.
        header0: ``(first_identity_key, end_key)`` for the insightface layout, else ``None``.
        identity_ranges: int64 array ``[num_identities, 2]`` of ``[first_key, end_key)`` per
            identity (row ``i`` is identity/label ``i``) for the insightface layout, else
            ``None``.

    Raises:
        RecordIOError: see :class:`RecordIOReader`, plus a missing header0, a header0 range
            that disagrees with the ``.idx`` keys, malformed identity records, or identity
            ranges that do not tile the image keys.
    """

    def __init__(
        self,
        path: PathLike,
        idx_path: PathLike | None = None,
        *,
        layout: Layout = "auto",
    ) -> None:
        if layout not in ("auto", "insightface", "flat"):
            raise ValueError(f"layout must be 'auto', 'insightface' or 'flat', got {layout!r}")
        path = os.fspath(path)
        if os.path.isdir(path):
            if idx_path is None:
                idx_path = os.path.join(path, "train.idx")
            path = os.path.join(path, "train.rec")
        if idx_path is None:
            idx_path = os.path.splitext(path)[0] + ".idx"
        if not os.path.exists(idx_path):
            raise RecordIOError("the .idx file is missing", path=idx_path, expected="a .idx file")
        self.reader = RecordIOReader(path, idx_path)
        self.header0: tuple[int, int] | None = None
        self.identity_ranges: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        try:
            self.layout = self._detect(layout)
            if self.layout == "insightface":
                self._init_insightface()
            else:
                self.image_keys = self.reader.keys
        except BaseException:
            self.reader.close()
            raise

    @property
    def path(self) -> str:
        """The ``.rec`` path."""
        return self.reader.path

    @property
    def idx_path(self) -> str:
        """The ``.idx`` path."""
        assert self.reader.idx_path is not None
        return self.reader.idx_path

    # -- layout --------------------------------------------------------------------------------

    @staticmethod
    def _is_marker(rec: Record) -> bool:
        """header0 and identity records: flag 2 and no payload."""
        return rec.flag == 2 and not rec.payload

    def _detect(self, layout: Layout) -> str:
        reader = self.reader
        if len(reader) == 0:
            raise RecordIOError("the .idx lists no records", path=self.idx_path, expected="records")
        if layout == "flat":
            return "flat"
        if 0 not in reader:
            if layout == "insightface":
                raise RecordIOError(
                    "key 0 (the insightface header0 record) is missing from the .idx",
                    path=self.idx_path,
                    key=0,
                    expected="key 0 holding header0 (flag 2, [first identity key, end key))",
                )
            last = int(reader.keys[-1])
            if self._is_marker(reader.read(last)):
                raise RecordIOError(
                    f"key 0 (header0) is missing although record {last} looks like an "
                    "insightface identity record (flag 2, empty payload); pass layout='flat' "
                    "to read every key as an image anyway",
                    path=self.idx_path,
                    key=0,
                    expected="key 0 holding header0",
                )
            return "flat"
        rec0 = reader.read(0)
        if self._is_marker(rec0):
            return "insightface"
        if layout == "insightface":
            raise RecordIOError(
                f"record 0 is not an insightface header0 (flag {rec0.flag}, "
                f"{len(rec0.payload)} payload bytes)",
                path=self.path,
                key=0,
                offset=rec0.offset,
                expected="flag 2 with labels [first identity key, end key) and no payload",
            )
        return "flat"

    def _init_insightface(self) -> None:
        reader = self.reader
        rec0 = reader.read(0)
        keys = reader.keys
        max_key = int(keys[-1])
        first_f, end_f = rec0.labels
        for v in (first_f, end_f):
            _exact_int(v, what="header0 label", path=self.path, key=0, offset=rec0.offset)

        def first_id_fits(c: int) -> bool:
            return (
                0 < c - 1 < c <= max_key
                and c in reader
                and c - 1 in reader
                and self._is_marker(reader.read(c))
                and not self._is_marker(reader.read(c - 1))
            )

        end = _pick(float32_int_candidates(end_f), lambda c: c == max_key + 1)
        first_id = _pick(float32_int_candidates(first_f), first_id_fits)
        if not 1 < first_id <= end:
            raise RecordIOError(
                f"header0 range [{first_id}, {end}) is not a valid [first identity key, end key)",
                path=self.path,
                key=0,
                offset=rec0.offset,
                expected="1 < first identity key <= end key",
            )
        # The .idx keys must be exactly 0 .. end - 1 (keys are sorted and unique).
        if int(keys.size) != end or int(keys[0]) != 0 or max_key != end - 1:
            expected_keys = np.arange(end, dtype=np.int64)
            missing = np.setdiff1d(expected_keys, keys, assume_unique=True)
            extra = np.setdiff1d(keys, expected_keys, assume_unique=True)
            if missing.size:
                bad, what = int(missing[0]), "is missing from"
            else:
                bad, what = int(extra[0]), "is listed in"
            raise RecordIOError(
                f"header0 says images are keys 1..{first_id - 1} and identities are keys "
                f"{first_id}..{end - 1}, but key {bad} {what} the .idx",
                path=self.idx_path,
                key=bad,
                expected=f"keys exactly 0..{end - 1}",
            )
        self.header0 = (first_id, end)
        self.image_keys = np.arange(1, first_id, dtype=np.int64)
        self.identity_ranges = self._read_identity_ranges(first_id, end)

    def _read_identity_ranges(self, first_id: int, end: int) -> np.ndarray:
        """Read, resolve and check identity records ``first_id .. end - 1``."""
        reader = self.reader
        num_ids = end - first_id
        ranges = np.empty((num_ids, 2), dtype=np.int64)
        boundary = 1  # where the next identity must start
        for i in range(num_ids):
            key = first_id + i
            rec = reader.read(key)
            if rec.flag != 2:
                raise RecordIOError(
                    f"identity record has flag {rec.flag}",
                    path=self.path,
                    key=key,
                    offset=rec.offset,
                    expected="flag 2 with labels [first image key, end image key)",
                )
            lo_f, hi_f = rec.labels
            for v in (lo_f, hi_f):
                _exact_int(v, what="identity range", path=self.path, key=key, offset=rec.offset)
            lo = _pick(float32_int_candidates(lo_f), lambda c, b=boundary: c == b)

            def is_end(c: int, i: int = i) -> bool:
                # c ends identity i iff label(c - 1) <= i < label(c) (labels sorted by key).
                if not 1 <= c <= first_id:
                    return False
                before = c == 1 or self.label_of(c - 1) <= i
                return before and (c == first_id or self.label_of(c) > i)

            hi = _pick(float32_int_candidates(hi_f), is_end)
            if lo != boundary or hi < lo or hi > first_id:
                raise RecordIOError(
                    f"identity {i} covers image keys [{lo}, {hi}), which does not continue the "
                    f"previous identity's range (next free image key {boundary}) inside the "
                    f"image keys [1, {first_id}) given by header0",
                    path=self.path,
                    key=key,
                    offset=rec.offset,
                    expected=f"[{boundary}, end) with end <= {first_id}",
                )
            ranges[i] = (lo, hi)
            boundary = hi
        if boundary != first_id:
            raise RecordIOError(
                f"identity ranges end at image key {boundary} but header0 says the images end "
                f"at {first_id}",
                path=self.path,
                key=end - 1,
                expected=f"the last identity to end at {first_id}",
            )
        return ranges

    # -- labels --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of image records."""
        return int(self.image_keys.size)

    @property
    def num_identities(self) -> int:
        """Number of identities (classes).

        insightface layout: ``end_key - first_identity_key`` from header0. Flat layout: the
        largest image label + 1 (this reads every image header once).
        """
        if self.identity_ranges is not None:
            return int(self.identity_ranges.shape[0])
        labels = self.labels
        return int(labels.max()) + 1 if labels.size else 0

    @property
    def labels(self) -> np.ndarray:
        """int64 class label of each image, aligned with :attr:`image_keys`.

        insightface layout: derived from the identity records (no image is read); flat
        layout: read from every image header once (see :meth:`labels_from_headers`).
        """
        if self._labels is None:
            if self.identity_ranges is not None:
                sizes = self.identity_ranges[:, 1] - self.identity_ranges[:, 0]
                self._labels = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
            else:
                self._labels = self.labels_from_headers()
        return self._labels

    def labels_from_headers(self) -> np.ndarray:
        """int64 class label of each image read from its own record header.

        Raises:
            RecordIOError: a label is not a non-negative integer.
        """
        out = np.empty(self.image_keys.size, dtype=np.int64)
        for i, key in enumerate(self.image_keys.tolist()):
            out[i] = self.label_of(key)
        return out

    def label_of(self, key: int) -> int:
        """The class label in image record ``key``'s header, as an exact non-negative int."""
        rec = self.reader.read(key)
        label = rec.class_label(self.path)
        if label < 0:
            raise RecordIOError(
                f"negative class label {label}",
                path=self.path,
                key=key,
                offset=rec.offset,
                expected="a non-negative integer label",
            )
        return label

    def read_image(self, key: int) -> tuple[bytes, int]:
        """``(payload, label)`` of image record ``key``: the JPEG bytes and exact int label."""
        rec = self.reader.read(key)
        label = rec.class_label(self.path)
        if label < 0:
            raise RecordIOError(
                f"negative class label {label}",
                path=self.path,
                key=key,
                offset=rec.offset,
                expected="a non-negative integer label",
            )
        return rec.payload, label

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying reader."""
        self.reader.close()

    def __enter__(self) -> RecDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecDataset({self.path!r}, layout={self.layout!r}, images={len(self)})"


def _pick(candidates: list[int], fits: Callable[[int], bool]) -> int:
    """The only candidate, else the one ``fits`` accepts, else the first (checks then fail)."""
    if len(candidates) == 1:
        return candidates[0]
    good = [c for c in candidates if fits(c)]
    return good[0] if len(good) == 1 else candidates[0]
