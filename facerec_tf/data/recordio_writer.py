"""MXNet-compatible RecordIO writer (``.rec`` + ``.idx`` [+ ``property``]), pure Python.

The output is byte-identical to what MXNet's ``MXIndexedRecordIO`` writes for the same records
(see :mod:`facerec_tf.data.recordio` for the format):

* a record is an ``IRHeader`` packed as ``<IfQQ`` (flag, label, id, id2), then ``flag``
  float32 labels when there are several labels (MXNet then stores 0 in the scalar ``label``),
  then the payload;
* the record is cut at every 4-byte-aligned occurrence of the magic word, which is dropped:
  the pieces become a start frame (cflag 1), middle frames (cflag 2) and an end frame
  (cflag 3); a record without such a word is one frame (cflag 0). Every cut is 4-aligned, so
  only the last frame needs zero padding to a multiple of 4;
* the ``.idx`` has one ``"key\\toffset\\n"`` line per record, ``offset`` being where the
  record's first frame starts.

Two dataset writers build on :class:`RecordIOWriter`: :func:`write_insightface` (header0 at
key 0, images from key 1, one identity record per class, ``property``) and :func:`write_flat`
(im2rec layout: images at keys ``start_key ..``). Both stream: records are written as they
come, nothing is held in memory.

:func:`synthetic_faces` makes small deterministic JPEG datasets (Pillow) for the tests and
the benchmark. Used by the tests and the benchmark to build synthetic datasets, and to check (against the
MXNet-written fixtures) that our understanding of the format is exact.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence

from facerec_tf.data.recordio import MAGIC, MAGIC_BYTES

__all__ = [
    "RecordIOWriter",
    "encode_frames",
    "frame",
    "pack_record",
    "synthetic_faces",
    "write_flat",
    "write_insightface",
    "write_rec",
]

PathLike = str | os.PathLike

_IR = struct.Struct("<IfQQ")
_FRAME = struct.Struct("<II")
_MAX_LENGTH = (1 << 29) - 1


def pack_record(
    payload: bytes = b"",
    label: float = 0.0,
    labels: Sequence[float] = (),
    id: int = 0,
    id2: int = 0,
) -> bytes:
    """Pack an ``IRHeader`` + float labels + payload, like ``mx.recordio.pack``.

    Args:
        payload: the bytes after the header (e.g. the JPEG).
        label: the scalar label, used when ``labels`` is empty (``flag = 0``).
        labels: several float32 labels; when non-empty ``flag = len(labels)`` and the scalar
            label field is stored as 0, as MXNet does.
        id, id2: the header's ``id`` / ``id2`` fields (uint64).
    """
    if labels:
        head = _IR.pack(len(labels), 0.0, id, id2) + struct.pack(f"<{len(labels)}f", *labels)
    else:
        head = _IR.pack(0, label, id, id2)
    return head + payload


def frame(cflag: int, data: bytes) -> bytes:
    """One RecordIO frame: magic, ``lrecord = cflag << 29 | len``, data, zero padding to 4."""
    if not 0 <= cflag <= 3:
        raise ValueError(f"cflag must be 0..3, got {cflag}")
    if len(data) > _MAX_LENGTH:
        raise ValueError(f"a frame holds at most {_MAX_LENGTH} bytes, got {len(data)}")
    return _FRAME.pack(MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def encode_frames(record: bytes) -> bytes:
    """The frames MXNet's writer emits for ``record`` (split at 4-byte-aligned magic words)."""
    mv = memoryview(record)
    cuts = []
    pos = record.find(MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:
            cuts.append(pos)
            pos = record.find(MAGIC_BYTES, pos + 4)
        else:
            pos = record.find(MAGIC_BYTES, pos + 1)
    if not cuts:
        return frame(0, record)
    out = []
    start = 0
    for n, cut in enumerate(cuts):
        out.append(frame(1 if n == 0 else 2, bytes(mv[start:cut])))
        start = cut + 4
    out.append(frame(3, bytes(mv[start:])))
    return b"".join(out)


class RecordIOWriter:
    """Streaming writer of a ``.rec`` file and (optionally) its ``.idx``.

    Args:
        rec_path: the ``.rec`` file to create (truncated if it exists).
        idx_path: the ``.idx`` file, or ``None`` for no index.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike | None = None) -> None:
        self.path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        self._rec = open(self.path, "wb", buffering=1 << 20)
        self._idx = (
            open(self.idx_path, "w", encoding="ascii", newline="\n")
            if self.idx_path is not None
            else None
        )
        self.offset = 0

    def write(self, record: bytes, key: int | None = None) -> int:
        """Append one record; list it in the ``.idx`` under ``key`` when given.

        Returns:
            the byte offset of the record's first frame.
        """
        offset = self.offset
        data = encode_frames(record)
        self._rec.write(data)
        self.offset += len(data)
        if key is not None:
            if self._idx is None:
                raise ValueError("this writer has no .idx file, so it cannot record a key")
            self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def patch(self, offset: int, record: bytes) -> None:
        """Overwrite the record at ``offset`` with ``record`` of the same encoded size."""
        data = encode_frames(record)
        self._rec.flush()
        if os.pwrite(self._rec.fileno(), data, offset) != len(data):  # pragma: no cover
            raise OSError(f"{self.path}: short write at byte {offset}")

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if not self._rec.closed:
            self._rec.close()
        if self._idx is not None and not self._idx.closed:
            self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_rec(
    folder: PathLike,
    records: Mapping[int, bytes] | Iterable[tuple[int, bytes]],
    name: str = "train",
) -> tuple[str, str]:
    """Write raw records (``key -> record bytes``, in the given order) as ``name.rec/.idx``.

    Returns:
        ``(rec_path, idx_path)`` (the same path type as ``folder`` joined with the names).
    """
    os.makedirs(folder, exist_ok=True)
    items = records.items() if isinstance(records, Mapping) else records
    rec, idx = _paths(folder, name)
    with RecordIOWriter(rec, idx) as w:
        for key, record in items:
            w.write(record, key)
    return rec, idx


def write_flat(
    folder: PathLike,
    images: Iterable[tuple[bytes, float]],
    name: str = "train",
    *,
    start_key: int = 0,
) -> tuple[str, str]:
    """Write an im2rec-layout dataset: image ``i`` at key ``start_key + i``.

    Each record is ``IRHeader(0, float(label), key, 0)`` + payload, as im2rec and the
    insightface tools pack them.

    Args:
        folder: output folder (created).
        images: ``(payload, label)`` pairs, in key order.
        name: file stem (``train`` -> ``train.rec`` / ``train.idx``).
        start_key: key of the first image.

    Returns:
        ``(rec_path, idx_path)``.
    """
    os.makedirs(folder, exist_ok=True)
    rec, idx = _paths(folder, name)
    with RecordIOWriter(rec, idx) as w:
        for key, (payload, label) in enumerate(images, start=start_key):
            w.write(pack_record(payload, float(label), id=key), key)
    return rec, idx


def write_insightface(
    folder: PathLike,
    images: Iterable[tuple[bytes, int]],
    *,
    num_classes: int | None = None,
    image_size: tuple[int, int] | None = (112, 112),
    name: str = "train",
) -> tuple[str, str]:
    """Write an insightface-layout dataset: header0, images, identity records, ``property``.

    Layout: key 0 is header0 ``IRHeader(2, [first_id_key, end_key], 0, 0)`` with no payload;
    keys ``1 .. n`` are the images ``IRHeader(0, float(label), key, 0)`` + payload; keys
    ``n + 1 .. n + num_classes`` are one record per identity ``IRHeader(2, [lo, hi], 0, 0)``
    giving its image keys ``[lo, hi)`` (empty when the class has no image).

    Header0 is written first as a placeholder (its size does not depend on the counts) and
    patched at the end, so the images are streamed.

    Args:
        folder: output folder (created).
        images: ``(payload, label)`` pairs; labels must be non-decreasing integers >= 0.
        num_classes: number of identities (default: last label + 1).
        image_size: ``(height, width)`` for ``property``; ``None`` writes no ``property``.
        name: file stem.

    Returns:
        ``(rec_path, idx_path)``.
    """
    os.makedirs(folder, exist_ok=True)
    rec, idx = _paths(folder, name)
    starts: list[int] = []  # starts[c] = first image key of class c
    key = 0
    with RecordIOWriter(rec, idx) as w:
        w.write(pack_record(b"", labels=(0.0, 0.0)), 0)  # placeholder, patched below
        for key, (payload, label) in enumerate(images, start=1):
            label = int(label)
            if label < len(starts) - 1 or label < 0:
                raise ValueError(
                    f"image {key}: labels must be non-decreasing and >= 0 for the insightface "
                    f"layout, got {label} after {len(starts) - 1}"
                )
            while len(starts) <= label:
                starts.append(key)
            w.write(pack_record(payload, float(label), id=key), key)
        end_images = key + 1
        n_cls = len(starts) if num_classes is None else int(num_classes)
        if n_cls < len(starts):
            raise ValueError(f"num_classes={n_cls} but labels go up to {len(starts) - 1}")
        starts += [end_images] * (n_cls - len(starts))
        bounds = [*starts, end_images]
        first_id = end_images
        for c in range(n_cls):
            w.write(pack_record(b"", labels=(bounds[c], bounds[c + 1])), first_id + c)
        w.patch(0, pack_record(b"", labels=(first_id, first_id + n_cls)))
    if image_size is not None:
        with open(os.path.join(folder, "property"), "w", encoding="ascii") as f:
            f.write(f"{n_cls},{int(image_size[0])},{int(image_size[1])}")
    return rec, idx


def _paths(folder: PathLike, name: str):
    """``folder/name.rec`` and ``folder/name.idx``, keeping ``folder``'s path type."""
    if isinstance(folder, os.PathLike) and hasattr(folder, "__truediv__"):
        return folder / f"{name}.rec", folder / f"{name}.idx"  # type: ignore[operator]
    return os.path.join(folder, f"{name}.rec"), os.path.join(folder, f"{name}.idx")


def synthetic_faces(
    num_images: int,
    num_classes: int,
    *,
    size: int = 16,
    quality: int = 75,
    variants: int = 8,
    seed: int = 0,
) -> Iterator[tuple[bytes, int]]:
    """Deterministic ``(jpeg, label)`` pairs for synthetic datasets, sorted by label.

    ``variants`` base JPEGs of ``size x size`` RGB pixels (smooth random colour fields, about
    800 bytes at 16x16 and 4 KB at 112x112) are encoded once with Pillow; image ``i`` is base
    ``i % variants`` with a JPEG comment segment holding ``i`` inserted after the SOI marker, so
    every payload is a distinct, valid JPEG. Image ``i`` has label
    ``i * num_classes // num_images`` (classes as balanced as possible).
    """
    import numpy as np
    from PIL import Image

    if num_images < 1 or not 1 <= num_classes <= num_images:
        raise ValueError(f"need 1 <= num_classes <= num_images, got {num_classes}, {num_images}")
    rng = np.random.default_rng(seed)
    small = max(2, size // 8)
    bases = []
    for _ in range(variants):
        pixels = rng.integers(0, 256, (small, small, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        bases.append(buf.getvalue())
    for i in range(num_images):
        base = bases[i % variants]
        text = b"facerec_tf synthetic %d" % i
        comment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
        yield base[:2] + comment + base[2:], i * num_classes // num_images
