"""Convert a ``.rec`` / ``.idx`` dataset or an image-folder tree into TFRecord shards.

Input (``input_path``):

* a ``.rec`` file, or a folder holding ``train.rec`` + ``train.idx`` (+ ``property``), in the
  insightface layout (header0 + identity records) or the flat im2rec layout (see
  :class:`~facerec_tf.data.recordio.RecDataset`). The JPEG payloads are copied untouched.
* any other folder: an image tree with one sub-folder per identity (CASIA-WebFace style).
  Identities are the non-hidden sub-folders sorted by name (labels 0, 1, ...), images the
  non-hidden regular files of each sub-folder sorted by name (files directly in the root and
  deeper folders are ignored). Every such file must be an image: JPEG files are passed through
  byte for byte, other formats Pillow can read are re-encoded to JPEG (quality 95, greyscale
  kept greyscale, everything else RGB) with a :class:`ReencodeWarning`. ``image/key`` is the
  file's index in that sorted listing.

Output (``output_dir``): ``train-00000-of-000NN.tfrecord`` shards (layout in
:mod:`facerec_tf.data.schema`, framing in :mod:`facerec_tf.data.tfrecord`) and
``manifest.json``, written last.

How it works, in three steps (:func:`convert`):

* **Plan** (reads only the index, the labels and the first image header; nothing is written):
  image keys and labels, the ``--images-filter`` selection (identities with fewer images are
  dropped and the rest relabelled 0.. in order of their original label), one global
  permutation ``numpy.random.default_rng(seed).permutation(n)`` of the selected images, and
  ``num_shards`` contiguous, balanced slices of it (shard ``i`` gets images
  ``[i * n // N, (i + 1) * n // N)`` of the permutation), so every shard mixes identities.
* **Write shards**: each shard asks the reader for its records in plan order with one call
  (:meth:`~facerec_tf.data.recordio.RecordIOReader.read_many`; offsets, extents and
  re-reads stay inside the reader), checks each, frames them as examples in blocks and writes
  them into ``.train-000ii-of-000NN.tfrecord.tmp-<pid>``, ``os.replace``\\ d to its name
  when complete. ``workers > 1`` writes shards in parallel processes, each with its own
  reader. Memory is O(one block) per process plus O(n) small integers for the plan.
* **Manifest**: ``manifest.json``, written last, lists every shard with its record count,
  size and sha256.
* **Validate while writing**: every record is read through the RecordIO reader (framing,
  magic, cflag, padding, label flag, integral labels; in the insightface layout the header's
  label must agree with its identity range), and every image's JPEG header is parsed in pure
  Python (:func:`jpeg_info`) *before* anything could decode it: it must be a baseline,
  extended or progressive 8-bit JPEG with 1 or 3 components, at most ``max_image_side`` pixels
  on each side, and of the expected size: ``property``'s ``h,w`` when there is a property,
  else the first image's (``allow_mixed_sizes=True`` keeps only the ``max_image_side`` cap).
* **Fail clean**: a :class:`~facerec_tf.errors.RecordIOError`, ``ImageError`` or
  ``DataFormatError`` aborts the conversion and is re-raised with its file, offset and key, and
  ``output_dir`` is left with none of the converter's files (shards of this prefix, temp files,
  manifest); other files are never touched. ``output_dir`` is removed if this run created it and
  it is empty.
* **Deterministic and restartable**: the same input, seed and options give byte-identical
  shards and manifest (no timestamps; ``workers`` and progress do not change the output). A
  new run first removes stale temp files, the old manifest and shard files of this prefix that
  the new plan does not produce, then (re)writes every shard, so rerunning after a kill gives
  exactly the output of an uninterrupted run. One conversion at a time per ``output_dir``.

Importing this module does not import TensorFlow (nor do the workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from facerec_tf.data import schema
from facerec_tf.data.recordio import RecDataset, Record, RecordIOReader, read_property
from facerec_tf.data.tfrecord import TFRecordWriter, verify_shard
from facerec_tf.errors import (
    DataFormatError,
    ImageError,
    RecordIOError,
    TFRecordError,
    VerificationBinError,
)

__all__ = [
    "DEFAULT_SHARD_SIZE_MB",
    "MAX_IMAGE_SIDE",
    "JpegInfo",
    "ReencodeWarning",
    "convert",
    "jpeg_info",
    "load_manifest",
    "verify_output",
]

PathLike = str | os.PathLike
Layout = Literal["auto", "insightface", "flat"]

DEFAULT_SHARD_SIZE_MB = 256.0
MAX_IMAGE_SIDE = 4096
REENCODE_QUALITY = 95
# Bytes a record adds to its image in a shard: TFRecord framing (16) + Example fields (~60).
_RECORD_OVERHEAD = 80
_BATCH = 512  # records framed at once, and between progress reports / abort checks


class ReencodeWarning(UserWarning):
    """Non-JPEG images of an image-folder input were re-encoded to JPEG."""


# ----------------------------------------------------------------------------------------------
# JPEG header parsing (no decode)

# SOF markers TensorFlow's decoder (libjpeg-turbo) reads: baseline, extended, progressive.
_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
# Other SOF markers (lossless, hierarchical, arithmetic coding): valid JPEG, but not accepted.
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers that are not "ff, marker, length, segment" to skip: fill, stuffing, TEM, RSTn, SOI,
# EOI, SOS, and every SOF.
_NOT_PLAIN = frozenset({0xFF, 0x00, 0x01, *range(0xD0, 0xDB), *_SOF_SUPPORTED, *_SOF_OTHER})
_SOF_ALL = frozenset({*_SOF_SUPPORTED, *_SOF_OTHER})
_SEGMENT = struct.Struct(">BBH")
_SOF = struct.Struct(">BHHB")


class JpegInfo(NamedTuple):
    """What the SOF segment of a JPEG says.

    Attributes:
        height, width: image size in pixels.
        components: 1 (greyscale) or 3 (YCbCr / RGB) for supported files.
        precision: bits per sample.
        sof: the SOF marker byte (0xC0 baseline, 0xC1 extended, 0xC2 progressive...).
        sof_offset: position of the SOF marker inside the JPEG bytes.
    """

    height: int
    width: int
    components: int
    precision: int
    sof: int
    sof_offset: int

    @property
    def supported(self) -> bool:
        """Whether TensorFlow's JPEG decoder reads this file (8-bit, 1 or 3 components)."""
        return self.sof in _SOF_SUPPORTED and self.precision == 8 and self.components in (1, 3)


def jpeg_info(
    data: bytes,
    *,
    path: PathLike | None = None,
    key: int | None = None,
    offset: int | None = None,
) -> JpegInfo:
    """Parse a JPEG's markers up to its SOF segment, without decoding anything.

    Args:
        data: the JPEG bytes.
        path, key, offset: where ``data`` comes from (the ``.rec`` and the record's key and byte
            offset, or the image file), used in error messages.

    Returns:
        a :class:`JpegInfo` (check :attr:`JpegInfo.supported` for decodability).

    Raises:
        ImageError: no SOI marker, a malformed or truncated marker segment before the SOF, a
            scan or end-of-image before any SOF, or a SOF with a zero size or a bad length.
    """

    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ImageError(
            f"not a JPEG: the image starts with {data[:4].hex() or 'nothing'}",
            path=path,
            key=key,
            offset=offset,
            expected="JPEG bytes starting with the SOI marker ffd8",
        )
    pos = 2
    # Fast path over ordinary segments (ff, marker, 16-bit length); anything else -- fill
    # bytes, standalone markers, SOF, bad lengths -- is left to the careful loop below.
    unpack = _SEGMENT.unpack_from
    first = 0  # position of the first segment that is not APPn / COM
    while pos + 4 <= n:
        ff, marker, seg_len = unpack(data, pos)
        if ff != 0xFF or seg_len < 2 or pos + 2 + seg_len > n:
            break
        if marker in _APP_COM:
            pos += 2 + seg_len
            continue
        if not first:
            first = pos
            if _last_header and type(data) is bytes and data.startswith(_last_header[0], pos):
                info, rel = _last_header[1], _last_header[2]
                if info.sof_offset == pos + rel:
                    return info
                return _new_tuple(JpegInfo, (*info[:5], pos + rel))
        if marker in _NOT_PLAIN:
            if marker in _SOF_ALL and seg_len >= 8:
                precision, height, width, comps = _SOF.unpack_from(data, pos + 4)
                if seg_len == 8 + 3 * comps and height and width:
                    info = JpegInfo(height, width, comps, precision, marker, pos)
                    if type(data) is bytes:
                        _last_header[:] = [data[first : pos + 2 + seg_len], info, pos - first]
                    return info
            break
        pos += 2 + seg_len

    def fail(detail: str, at: int, expected: str) -> ImageError:
        return _jpeg_fail(detail, at, expected, path, key, offset)

    while True:
        if pos >= n:
            raise fail("the data ends before any SOF segment", pos, "a SOF segment")
        if data[pos] != 0xFF:
            raise fail(f"found byte 0x{data[pos]:02x} where a marker should be", pos, "0xff")
        start = pos
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise fail("the data ends inside a marker", start, "a marker byte")
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no segment
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):
            what = {0x00: "a stuffed 0x00", 0xD8: "a second SOI", 0xD9: "EOI", 0xDA: "SOS (scan)"}
            raise fail(f"{what[marker]} before any SOF segment", start, "a SOF segment first")
        if pos + 2 > n:
            raise fail(f"the data ends inside marker 0x{marker:02x}'s length", pos, "2 bytes")
        seg_len = (data[pos] << 8) | data[pos + 1]
        if seg_len < 2 or pos + seg_len > n:
            raise fail(
                f"segment 0xff{marker:02x} of length {seg_len} runs past the {n}-byte data"
                if seg_len >= 2
                else f"segment 0xff{marker:02x} has length {seg_len}",
                start,
                "a segment inside the data",
            )
        if marker in _SOF_SUPPORTED or marker in _SOF_OTHER:
            if seg_len < 8:
                raise fail(f"SOF segment of length {seg_len}", start, "at least 8 bytes")
            precision = data[pos + 2]
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            comps = data[pos + 7]
            if seg_len != 8 + 3 * comps:
                raise fail(
                    f"SOF length {seg_len} does not match its {comps} components",
                    start,
                    f"length {8 + 3 * comps}",
                )
            if height == 0 or width == 0:
                raise fail(f"SOF size {height}x{width}", start, "a non-zero height and width")
            return JpegInfo(height, width, comps, precision, marker, start)
        pos += seg_len


# APPn and COM segments: their content does not change what jpeg_info returns.
_APP_COM = frozenset({*range(0xE0, 0xF0), 0xFE})
# The last JPEG parsed by the fast path: its bytes from the first segment that is not APPn /
# COM to the end of its SOF segment, its JpegInfo, and the SOF's position relative to the
# start of those bytes. Images of one encoder usually share these bytes exactly, and
# jpeg_info's answer depends on nothing else (but the SOF's position), so a match gives the
# same result without walking the segments again.
_last_header: list = []
_new_tuple = tuple.__new__


def _jpeg_fail(
    detail: str, at: int, expected: str, path: PathLike | None, key: int | None, offset: int | None
) -> ImageError:
    return ImageError(
        f"malformed JPEG header: {detail} (at JPEG byte {at})",
        path=path,
        key=key,
        offset=offset,
        expected=expected,
    )


def _describe_unsupported(info: JpegInfo) -> str:
    if info.sof not in _SOF_SUPPORTED:
        return f"JPEG process SOF{info.sof - 0xC0} is not supported by TensorFlow's decoder"
    if info.precision != 8:
        return f"{info.precision}-bit JPEG samples are not supported"
    return f"{info.components}-component JPEG (CMYK/YCCK?) is not supported"


# ----------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class _SourceSpec:
    """Everything a worker needs to open the input (picklable)."""

    kind: Literal["rec", "folder"]
    path: str  # the .rec, or the folder root
    idx_path: str | None
    layout: str  # "insightface" | "flat" | "folder"
    expected_size: tuple[int, int] | None  # None: only the max-side cap
    size_from: str  # where expected_size comes from (for messages)
    max_side: int


@dataclass
class _ShardTask:
    index: int
    name: str
    final_path: str
    tmp_path: str
    keys: np.ndarray  # source keys, in shard order
    labels: np.ndarray  # output labels
    orig_labels: np.ndarray  # source labels (checked against each record header for .rec)
    files: list[str] | None = None  # folder input: file path per key


@dataclass(frozen=True)
class _ShardResult:
    index: int
    name: str
    num_records: int
    bytes: int
    sha256: str
    reencoded: int
    reencoded_example: str | None


@dataclass(frozen=True)
class _Failure:
    """A DataFormatError raised in a worker, carried across the process boundary intact."""

    cls: str
    detail: str
    path: str | None
    offset: int | None
    key: Any
    expected: str | None

    @classmethod
    def of(cls, e: DataFormatError) -> _Failure:
        return cls(type(e).__name__, e.detail, e.path, e.offset, e.key, e.expected)

    def error(self) -> DataFormatError:
        kinds: dict[str, type[DataFormatError]] = {
            c.__name__: c
            for c in (
                DataFormatError,
                RecordIOError,
                ImageError,
                TFRecordError,
                VerificationBinError,
            )
        }
        return kinds.get(self.cls, DataFormatError)(
            self.detail, path=self.path, offset=self.offset, key=self.key, expected=self.expected
        )


@dataclass
class _Plan:
    source: _SourceSpec
    source_info: dict[str, Any]
    keys: np.ndarray  # selected source keys, in permuted order
    labels: np.ndarray  # output labels, aligned with keys
    orig_labels: np.ndarray
    files: list[str] | None  # folder input: file per source key
    num_classes: int
    image_size: tuple[int, int]
    bounds: list[int]
    estimated_bytes: int
    options: dict[str, Any] = field(default_factory=dict)


def _resolve_input(input_path: str) -> tuple[str, str | None, str | None]:
    """``(kind, rec_path, property_path)`` for an input path."""
    if os.path.isdir(input_path):
        rec = os.path.join(input_path, "train.rec")
        if os.path.isfile(rec):
            prop = os.path.join(input_path, "property")
            return "rec", rec, prop if os.path.isfile(prop) else None
        return "folder", None, None
    if os.path.isfile(input_path):
        if not input_path.endswith(".rec"):
            raise DataFormatError(
                "the input file is not a .rec file",
                path=input_path,
                expected="a .rec file, a folder with train.rec/train.idx, or an image folder",
            )
        prop = os.path.join(os.path.dirname(input_path), "property")
        return "rec", input_path, prop if os.path.isfile(prop) else None
    raise DataFormatError("the input does not exist", path=input_path, expected="a file or folder")


def _list_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """``(files, labels, identities)`` of an identity-per-sub-folder image tree."""
    try:
        entries = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
    except OSError as e:
        raise DataFormatError(f"cannot list the input folder: {e}", path=root) from e
    if not entries:
        raise DataFormatError(
            "the folder holds neither train.rec nor identity sub-folders",
            path=root,
            expected="train.rec + train.idx, or one sub-folder of images per identity",
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(entries):
        sub = os.path.join(root, name)
        names = sorted(
            e.name for e in os.scandir(sub) if e.name[0] != "." and e.is_file(follow_symlinks=True)
        )
        files += [os.path.join(name, f) for f in names]
        labels += [label] * len(names)
    if not files:
        raise DataFormatError(
            "the identity sub-folders hold no files", path=root, expected="image files"
        )
    return files, np.asarray(labels, dtype=np.int64), entries


def _read_folder_file(root: str, rel: str) -> bytes:
    path = os.path.join(root, rel)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read image file: {e}", path=path) from e


def _make_plan(
    input_path: PathLike,
    output_dir: str,
    *,
    num_shards: int | None,
    shard_size_mb: float | None,
    seed: int,
    images_filter: int,
    layout: Layout,
    max_image_side: int,
    allow_mixed_sizes: bool,
    prefix: str,
) -> _Plan:
    input_path = os.path.abspath(os.fspath(input_path))
    kind, rec_path, prop_path = _resolve_input(input_path)
    files: list[str] | None = None
    prop: tuple[int, int, int] | None = None
    if kind == "rec":
        assert rec_path is not None
        with RecDataset(rec_path, layout=layout) as ds:
            keys = np.asarray(ds.image_keys, dtype=np.int64)
            labels = np.asarray(ds.labels, dtype=np.int64)  # flat: reads every header
            num_ids = ds.num_identities
            if prop_path is not None:
                prop = read_property(prop_path)
                if ds.layout == "insightface" and prop[0] != num_ids:
                    raise RecordIOError(
                        f"property says {prop[0]} classes but header0 lists {num_ids} identities",
                        path=prop_path,
                        offset=0,
                        expected=f"{num_ids} classes",
                    )
                if prop[0] < num_ids:
                    raise RecordIOError(
                        f"property says {prop[0]} classes but labels go up to {num_ids - 1}",
                        path=prop_path,
                        offset=0,
                        expected=f"at least {num_ids} classes",
                    )
                num_ids = prop[0]
            total_records = len(ds.reader)
            file_size = ds.reader.size
            source = _SourceSpec(
                "rec",
                ds.path,
                ds.idx_path,
                ds.layout,
                None,
                "",
                max_image_side,
            )
            if keys.size == 0:
                raise RecordIOError("the dataset holds no image records", path=ds.path)
            first = ds.reader.read(int(keys[0]))
            info = jpeg_info(first.payload, path=ds.path, key=first.key, offset=first.offset)
            first_size = (info.height, info.width)
        per_record = file_size / max(total_records, 1)
        source_info = {"path": input_path, "kind": "rec", "layout": source.layout}
    else:
        files, labels, identities = _list_folder(input_path)
        keys = np.arange(len(files), dtype=np.int64)
        num_ids = len(identities)
        out_abs = os.path.abspath(output_dir)
        if out_abs == input_path or out_abs.startswith(input_path.rstrip(os.sep) + os.sep):
            raise ValueError(
                f"the output folder {output_dir} is inside the image-folder input "
                f"{input_path}; it would be read as an identity on the next run"
            )
        source = _SourceSpec("folder", input_path, None, "folder", None, "", max_image_side)
        first = files[0]
        data = _read_folder_file(input_path, first)
        first_size = _probe_size(data, os.path.join(input_path, first), 0, max_image_side)
        per_record = 0.0
        source_info = {"path": input_path, "kind": "folder", "layout": "folder"}

    n_source = int(keys.size)
    source_info["num_images"] = n_source
    source_info["num_classes"] = int(num_ids)

    # Identity filter and contiguous relabelling.
    if images_filter > 0:
        counts = np.bincount(labels, minlength=num_ids)
        keep = counts >= images_filter
        new_id = np.cumsum(keep) - 1
        mask = keep[labels]
        keys, orig_labels = keys[mask], labels[mask]
        labels = new_id[orig_labels].astype(np.int64)
        num_classes = int(keep.sum())
        source_info["dropped_classes"] = int(num_ids - num_classes)
        source_info["dropped_images"] = int(n_source - keys.size)
        if keys.size == 0:
            raise ValueError(
                f"--images-filter {images_filter} drops every identity (the largest has "
                f"{int(counts.max()) if counts.size else 0} images)"
            )
    else:
        orig_labels = labels
        num_classes = int(num_ids)
    n = int(keys.size)

    # Expected image size.
    if prop is not None:
        image_size = (prop[1], prop[2])
        size_from = f"the property file {prop_path}"
    else:
        image_size = first_size
        first_name = (
            f"record {int(keys[0])}" if kind == "rec" else f"file {files[0]}"  # type: ignore[index]
        )
        size_from = f"the first image ({first_name})"
    source = dataclasses.replace(
        source, expected_size=None if allow_mixed_sizes else image_size, size_from=size_from
    )

    # Size estimate and shard count.
    if kind == "rec":
        estimated = int(per_record * n) + _RECORD_OVERHEAD * n
    else:
        assert files is not None
        estimated = _RECORD_OVERHEAD * n
        for k in keys.tolist():
            with contextlib.suppress(OSError):
                estimated += os.path.getsize(os.path.join(input_path, files[k]))
    if num_shards is None:
        size_mb = DEFAULT_SHARD_SIZE_MB if shard_size_mb is None else float(shard_size_mb)
        if not size_mb > 0:
            raise ValueError(f"shard size must be positive, got {shard_size_mb}")
        num_shards = max(1, math.ceil(estimated / (size_mb * 2**20)))
        num_shards = min(num_shards, n)
    elif shard_size_mb is not None:
        raise ValueError("give either num_shards or shard_size_mb, not both")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > n:
        raise ValueError(f"num_shards={num_shards} is more than the {n} images to convert")

    perm = np.random.default_rng(seed).permutation(n)
    bounds = [(i * n) // num_shards for i in range(num_shards + 1)]
    options = {
        "seed": int(seed),
        "images_filter": int(images_filter),
        "num_shards": int(num_shards),
        "shard_size_mb": None if shard_size_mb is None else float(shard_size_mb),
        "layout": layout,
        "max_image_side": int(max_image_side),
        "allow_mixed_sizes": bool(allow_mixed_sizes),
        "prefix": prefix,
    }
    return _Plan(
        source,
        source_info,
        keys[perm],
        labels[perm],
        orig_labels[perm],
        files,
        num_classes,
        image_size,
        bounds,
        estimated,
        options,
    )


def _probe_size(data: bytes, path: str, key: int, max_side: int) -> tuple[int, int]:
    """Size of an image file's first image (JPEG header, or Pillow's lazy header read)."""
    if data[:3] == b"\xff\xd8\xff":
        info = jpeg_info(data, path=path, key=key, offset=0)
        _check_side(info.height, info.width, path, key, 0, max_side)
        if info.supported:
            return info.height, info.width
    img = _open_pillow(data, path, key)
    w, h = img.size
    _check_side(h, w, path, key, 0, max_side)
    return h, w


def _check_side(h: int, w: int, path: str, key: int, offset: int | None, max_side: int) -> None:
    if h > max_side or w > max_side:
        raise ImageError(
            f"image header claims {h}x{w} (height x width) pixels, larger than the "
            f"{max_side}-pixel limit on a side; refusing to decode it",
            path=path,
            key=key,
            offset=offset,
            expected=f"at most {max_side}x{max_side}",
        )


def _open_pillow(data: bytes, path: str, key: int):
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImageError("Pillow is needed to re-encode non-JPEG images", path=path, key=key) from e
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:
        raise ImageError(
            f"not an image file Pillow can read ({type(e).__name__}: {e})",
            path=path,
            key=key,
            offset=0,
            expected="a JPEG or an image format Pillow reads (PNG, BMP, GIF, PGM, TIFF...)",
        ) from None


# ----------------------------------------------------------------------------------------------
# Writing one shard (in the main process or a worker)


def _open_reader(source: _SourceSpec) -> RecordIOReader | None:
    """The ``.rec`` reader of a source (``None`` for an image folder)."""
    if source.kind != "rec":
        return None
    return RecordIOReader(source.path, source.idx_path)


_worker_state: dict[str, Any] = {}


def _init_worker(source: _SourceSpec, abort: Any, queue: Any, reader: Any = None) -> None:
    """ProcessPoolExecutor initializer: remember the source, the abort flag, the queue, and
    the parent's :class:`RecordIOReader` when the worker was forked (its ``.idx`` index and
    file descriptor are inherited; ``pread`` needs no shared file position)."""
    if queue is not None:
        queue.cancel_join_thread()  # never block a worker's exit on progress messages
    _worker_state.clear()
    _worker_state.update(source=source, abort=abort, queue=queue)
    if reader is not None:
        _worker_state["reader"] = reader


def _run_in_worker(task: _ShardTask) -> _ShardResult | _Failure | None:
    """Worker entry point: write one shard; typed errors are returned, not raised."""
    source: _SourceSpec = _worker_state["source"]
    abort = _worker_state["abort"]
    queue = _worker_state["queue"]
    try:
        if "reader" not in _worker_state:
            _worker_state["reader"] = _open_reader(source)
        return _write_shard(
            source,
            task,
            _worker_state["reader"],
            report=queue.put if queue is not None else None,
            should_abort=abort.is_set,
        )
    except DataFormatError as e:
        abort.set()
        return _Failure.of(e)
    except _Aborted:
        return None


class _Aborted(Exception):
    """Another shard failed: stop early."""


def _write_shard(
    source: _SourceSpec,
    task: _ShardTask,
    reader: RecordIOReader | None,
    *,
    report: Callable[[int], Any] | None,
    should_abort: Callable[[], bool] | None,
) -> _ShardResult:
    """Write ``task``'s shard to its temp file and move it into place when complete."""
    writer = TFRecordWriter(task.tmp_path, background=True)
    reencoded: list[str] = []
    if source.kind == "rec":
        assert reader is not None
        batches = _rec_images(reader, source, task)
    else:
        batches = _folder_images(source, task, reencoded)
    labels = task.labels.tolist()
    keys = task.keys.tolist()
    c0 = 0
    try:
        for batch in batches:
            c1 = c0 + len(batch)
            writer.write_examples(batch, labels[c0:c1], keys[c0:c1])
            c0 = c1
            if report is not None:
                report(len(batch))
            if should_abort is not None and should_abort():
                raise _Aborted
        writer.close(fsync=True)
        os.replace(task.tmp_path, task.final_path)
    except BaseException:
        writer.discard()
        with contextlib.suppress(OSError):
            os.unlink(task.tmp_path)
        raise
    return _ShardResult(
        task.index,
        task.name,
        writer.num_records,
        writer.bytes,
        writer.sha256,
        len(reencoded),
        reencoded[0] if reencoded else None,
    )


def _rec_images(
    reader: RecordIOReader, source: _SourceSpec, task: _ShardTask
) -> Iterator[list[bytes]]:
    """The JPEG payloads of a shard's records, in shard order and lists of up to ``_BATCH``,
    each checked first: the record itself (by the reader), its label against the plan, its
    JPEG header."""
    path = source.path
    max_side = source.max_side
    exp_h, exp_w = source.expected_size or (0, 0)
    any_size = source.expected_size is None
    images: list[bytes] = []
    append = images.append
    for rec, orig in zip(reader.read_many(task.keys), task.orig_labels.tolist()):
        if (rec.labels[0] if rec.flag else rec.label) != orig:
            _label_problem(rec, orig, path)
        image = rec.payload
        info = jpeg_info(image, path=path, key=rec.key, offset=rec.offset)
        h, w, comps, precision, sof, _ = info
        if (
            sof not in _SOF_SUPPORTED
            or precision != 8
            or not (comps == 3 or comps == 1)
            or h > max_side
            or w > max_side
            or not (any_size or (h == exp_h and w == exp_w))
        ):
            _image_problem(info, source, path, rec.key, rec.offset)  # type: ignore[arg-type]
        append(image)
        if len(images) == _BATCH:
            yield images
            images = []
            append = images.append
    if images:
        yield images


def _label_problem(rec: Record, label: int, path: str) -> None:
    """Raise the RecordIOError for an image record whose label is not the planned one."""
    got = rec.class_label(path)  # raises for a label that is not an integer
    raise RecordIOError(
        f"the image record's label {got} disagrees with the plan made from the "
        f"identity records / headers, which put it in class {label}",
        path=path,
        key=rec.key,
        offset=rec.offset,
        expected=f"label {label}",
    )


def _image_problem(info: JpegInfo, source: _SourceSpec, path: str, key: int, offset: int | None):
    """Raise the ImageError for an image that failed the quick checks of the write loops."""
    h, w = info.height, info.width
    if not info.supported:
        raise ImageError(
            _describe_unsupported(info),
            path=path,
            key=key,
            offset=offset,
            expected="an 8-bit baseline/progressive JPEG with 1 or 3 components",
        )
    _check_side(h, w, path, key, offset, source.max_side)
    expected = source.expected_size
    if expected is not None and (h, w) != expected:
        raise ImageError(
            f"image is {h}x{w} (height x width) but {source.size_from} says "
            f"{expected[0]}x{expected[1]}",
            path=path,
            key=key,
            offset=offset,
            expected=f"{expected[0]}x{expected[1]} (or allow mixed sizes)",
        )
    raise AssertionError("unreachable: the image passed every check")  # pragma: no cover


def _folder_images(
    source: _SourceSpec, task: _ShardTask, reencoded: list[str]
) -> Iterator[list[bytes]]:
    """A shard's image files as JPEG bytes (passed through, or re-encoded and noted in
    ``reencoded``), in shard order and lists of up to ``_BATCH``, each checked first."""
    assert task.files is not None
    expected = source.expected_size
    images: list[bytes] = []
    for rel, key in zip(task.files, task.keys.tolist()):
        path = os.path.join(source.path, rel)
        data = _read_folder_file(source.path, rel)
        image, info, converted = _folder_image(data, path, key, source.max_side)
        if converted:
            reencoded.append(rel)
        h, w = info.height, info.width
        if h > source.max_side or w > source.max_side or (expected and (h, w) != expected):
            _image_problem(info, source, path, key, 0)
        images.append(image)
        if len(images) == _BATCH:
            yield images
            images = []
    if images:
        yield images


def _folder_image(data: bytes, path: str, key: int, max_side: int) -> tuple[bytes, JpegInfo, bool]:
    """An image file's JPEG bytes (passed through, or re-encoded), its header, re-encoded?"""
    if data[:3] == b"\xff\xd8\xff":
        info = jpeg_info(data, path=path, key=key, offset=0)
        if info.supported:
            return data, info, False
    img = _open_pillow(data, path, key)
    w, h = img.size
    _check_side(h, w, path, key, 0, max_side)  # before decoding any pixel
    try:
        img.load()
        mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        img = img.convert(mode)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=REENCODE_QUALITY)
    except Exception as e:
        raise ImageError(
            f"cannot decode / re-encode the image ({type(e).__name__}: {e})",
            path=path,
            key=key,
            offset=0,
            expected="a readable image",
        ) from None
    jpeg = out.getvalue()
    return jpeg, jpeg_info(jpeg, path=path, key=key, offset=0), True


# ----------------------------------------------------------------------------------------------
# Output folder bookkeeping


def _tmp_name(name: str, pid: int) -> str:
    return f".{name}.tmp-{pid}"


def _our_files(output_dir: str, prefix: str) -> tuple[list[str], list[str]]:
    """``(shards, temps)``: names of this prefix's shards, and of converter temp files."""
    shard_re = re.compile(schema.shard_pattern(prefix))
    tmp_re = re.compile(
        rf"\.(?:{schema.shard_pattern(prefix)}|{re.escape(schema.MANIFEST_NAME)})\.tmp-\d+"
    )
    shards, temps = [], []
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return [], []
    for name in names:
        if shard_re.fullmatch(name):
            shards.append(name)
        elif tmp_re.fullmatch(name):
            temps.append(name)
    return sorted(shards), sorted(temps)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: str, obj: Any) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, _tmp_name(name, os.getpid()))
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(folder)


# ----------------------------------------------------------------------------------------------
# Public entry points


def convert(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    num_shards: int | None = None,
    shard_size_mb: float | None = None,
    seed: int = 0,
    images_filter: int = 0,
    workers: int = 1,
    progress: bool | None = None,
    layout: Layout = "auto",
    max_image_side: int = MAX_IMAGE_SIDE,
    allow_mixed_sizes: bool = False,
    prefix: str = "train",
) -> dict[str, Any]:
    """Convert a ``.rec`` dataset or an image-folder tree into shuffled TFRecord shards.

    Args:
        input_path: a ``.rec`` file, a folder with ``train.rec`` / ``train.idx``
            (+ ``property``), or an image folder with one sub-folder per identity.
        output_dir: where shards and ``manifest.json`` go (created if needed).
        num_shards: number of shards. Default: from ``shard_size_mb``.
        shard_size_mb: target shard size in MiB (estimated from the ``.rec`` size or the image
            file sizes); default :data:`DEFAULT_SHARD_SIZE_MB` when ``num_shards`` is not given.
        seed: seed of the global shuffle (``numpy.random.default_rng(seed).permutation``).
        images_filter: drop identities with fewer than this many images and relabel the rest
            contiguously in order of original label (0 keeps every identity and label as is).
        workers: shards written in parallel by this many processes (1: in this process). The
            output does not depend on it.
        progress: show a tqdm bar (images/s) on stderr; ``None``: only when stderr is a TTY.
        layout: ``.rec`` layout, ``"auto"``, ``"insightface"`` or ``"flat"``.
        max_image_side: reject any image whose header claims more pixels on a side.
        allow_mixed_sizes: accept images of any size up to ``max_image_side`` instead of
            requiring every image to have the expected size (``property``, or first image).
        prefix: shard name prefix (``train`` -> ``train-00000-of-00016.tfrecord``).

    Returns:
        the manifest (also written to ``output_dir/manifest.json``).

    Raises:
        RecordIOError, ImageError, DataFormatError: bad input; nothing of the converter's is
            left in ``output_dir`` (see the module docstring).
        ValueError: inconsistent options (e.g. more shards than images).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if images_filter < 0:
        raise ValueError(f"images_filter must be >= 0, got {images_filter}")
    if max_image_side < 1:
        raise ValueError(f"max_image_side must be >= 1, got {max_image_side}")
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", prefix) or prefix.startswith("."):
        raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
    output_dir = os.fspath(output_dir)
    plan = _make_plan(
        input_path,
        output_dir,
        num_shards=num_shards,
        shard_size_mb=shard_size_mb,
        seed=seed,
        images_filter=images_filter,
        layout=layout,
        max_image_side=max_image_side,
        allow_mixed_sizes=allow_mixed_sizes,
        prefix=prefix,
    )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"the output path {output_dir} exists and is not a folder")
    created_dir = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    try:
        results = _write_shards(plan, output_dir, prefix, workers, progress)
        manifest = _write_manifest(plan, results, output_dir)
    except BaseException:
        _cleanup_failed(output_dir, prefix, created_dir)
        raise
    _warn_reencoded(plan, results)
    return manifest


def _write_shards(
    plan: _Plan, output_dir: str, prefix: str, workers: int, progress: bool | None
) -> list[_ShardResult]:
    """Write every shard of the plan (after removing this prefix's stale temps, the old
    manifest and old shards the plan does not make)."""
    num = len(plan.bounds) - 1
    pid = os.getpid()
    tasks = []
    for i in range(num):
        lo, hi = plan.bounds[i], plan.bounds[i + 1]
        name = schema.shard_name(i, num, prefix)
        keys = plan.keys[lo:hi]
        tasks.append(
            _ShardTask(
                i,
                name,
                os.path.join(output_dir, name),
                os.path.join(output_dir, _tmp_name(name, pid)),
                keys,
                plan.labels[lo:hi],
                plan.orig_labels[lo:hi],
                [plan.files[k] for k in keys.tolist()] if plan.files is not None else None,
            )
        )
    old_shards, temps = _our_files(output_dir, prefix)
    _remove(os.path.join(output_dir, schema.MANIFEST_NAME))
    planned = {t.name for t in tasks}
    for name in temps + [n for n in old_shards if n not in planned]:
        _remove(os.path.join(output_dir, name))
    return _run_tasks(plan, tasks, workers, progress)


def _write_manifest(plan: _Plan, results: list[_ShardResult], output_dir: str) -> dict[str, Any]:
    """Write ``manifest.json`` (last, atomically, after the shards are on disk)."""
    if plan.source.kind == "folder":
        plan.source_info["reencoded_images"] = sum(r.reencoded for r in results)
    manifest = _manifest(plan, results)
    _fsync_dir(output_dir)
    _write_json_atomic(os.path.join(output_dir, schema.MANIFEST_NAME), manifest)
    return manifest


def _warn_reencoded(plan: _Plan, results: list[_ShardResult]) -> None:
    reencoded = sum(r.reencoded for r in results)
    if reencoded:
        example = next(r.reencoded_example for r in results if r.reencoded_example)
        warnings.warn(
            f"{reencoded} non-JPEG image(s) were re-encoded to JPEG (quality "
            f"{REENCODE_QUALITY}), e.g. {os.path.join(plan.source.path, example or '')}",
            ReencodeWarning,
            stacklevel=3,
        )


def _cleanup_failed(output_dir: str, prefix: str, created_dir: bool) -> None:
    """Remove every converter file of this prefix (shards, temps, manifest) after a failure."""
    shards, temps = _our_files(output_dir, prefix)
    for name in shards + temps:
        _remove(os.path.join(output_dir, name))
    _remove(os.path.join(output_dir, schema.MANIFEST_NAME))
    if created_dir:
        with contextlib.suppress(OSError):
            os.rmdir(output_dir)  # only if empty


def _progress_enabled(enabled: bool | None) -> bool:
    """``progress=None`` means: a bar when stderr is a terminal."""
    if enabled is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(enabled)


def _progress_bar(total: int, enabled: bool | None):
    if not _progress_enabled(enabled):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, unit="img", unit_scale=True, smoothing=0.1, desc="convert", file=sys.stderr
    )


def _run_tasks(
    plan: _Plan, tasks: list[_ShardTask], workers: int, progress: bool | None
) -> list[_ShardResult]:
    if workers > 1 and len(tasks) > 1:
        return _run_parallel(plan, tasks, min(workers, len(tasks)), progress)
    bar = _progress_bar(int(plan.keys.size), progress)
    reader = None
    try:
        reader = _open_reader(plan.source)
        report = bar.update if bar is not None else None
        return [
            _write_shard(plan.source, t, reader, report=report, should_abort=None) for t in tasks
        ]
    finally:
        if reader is not None:
            reader.close()
        if bar is not None:
            bar.close()


def _pool_context() -> tuple[Any, bool]:
    """``(multiprocessing context, forked)``: ``fork`` where it exists and this process runs
    no other thread (a forked child starts in microseconds and inherits the plan and the
    ``.idx`` index), else ``spawn`` (each worker imports the library and reads the index)."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork"), True
    return multiprocessing.get_context("spawn"), False


def _run_parallel(
    plan: _Plan, tasks: list[_ShardTask], workers: int, progress: bool | None
) -> list[_ShardResult]:
    ctx, forked = _pool_context()
    reader = _open_reader(plan.source) if forked else None
    try:
        return _run_pool(plan, tasks, workers, progress, ctx, reader)
    finally:
        if reader is not None:
            reader.close()


def _run_pool(plan: _Plan, tasks, workers: int, progress, ctx, reader) -> list[_ShardResult]:
    abort = ctx.Event()
    want_bar = _progress_enabled(progress)
    queue = ctx.Queue() if want_bar else None
    results: list[_ShardResult] = []
    failure: BaseException | None = None
    bar = None

    def drain() -> None:
        if queue is None or bar is None:
            return
        while True:
            try:
                n = queue.get_nowait()
            except Exception:
                return
            bar.update(n)

    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(plan.source, abort, queue, reader),
    ) as pool:
        pending: set[Future] = {pool.submit(_run_in_worker, t) for t in tasks}
        # the bar (and its monitor thread) only after the workers were started
        bar = _progress_bar(int(plan.keys.size), progress) if want_bar else None
        try:
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                drain()
                for fut in done:
                    if fut.cancelled():
                        continue
                    try:
                        out = fut.result()
                    except BaseException as e:  # OSError, a dead worker...
                        out = None
                        if failure is None:
                            failure = e
                    if isinstance(out, _Failure):
                        if failure is None or not isinstance(failure, DataFormatError):
                            failure = out.error()
                    elif isinstance(out, _ShardResult):
                        results.append(out)
                    if failure is not None and not abort.is_set():
                        abort.set()
                    if abort.is_set():
                        for p in pending:
                            p.cancel()
        except BaseException:
            abort.set()
            for p in pending:
                p.cancel()
            raise
        finally:
            drain()
            if bar is not None:
                bar.close()
    if failure is not None:
        raise failure
    if len(results) != len(tasks):  # pragma: no cover - aborted without a reported error
        raise RuntimeError("conversion aborted")
    return sorted(results, key=lambda r: r.index)


def _manifest(plan: _Plan, results: list[_ShardResult]) -> dict[str, Any]:
    counts = np.bincount(plan.labels, minlength=plan.num_classes)
    return {
        schema.MANIFEST_FORMAT_KEY: schema.MANIFEST_FORMAT,
        schema.MANIFEST_NUM_IMAGES: int(plan.keys.size),
        schema.MANIFEST_NUM_CLASSES: int(plan.num_classes),
        schema.MANIFEST_LABEL_RANGE: [int(plan.labels.min()), int(plan.labels.max())],
        schema.MANIFEST_IMAGE_SIZE: [int(plan.image_size[0]), int(plan.image_size[1])],
        schema.MANIFEST_SHARDS: [
            {"name": r.name, "num_records": r.num_records, "bytes": r.bytes, "sha256": r.sha256}
            for r in results
        ],
        schema.MANIFEST_SOURCE: plan.source_info,
        schema.MANIFEST_OPTIONS: plan.options,
        schema.MANIFEST_IMAGES_PER_CLASS: {
            "min": int(counts.min()),
            "max": int(counts.max()),
            "mean": round(float(counts.mean()), 4),
        },
    }


_REQUIRED_KEYS = {
    schema.MANIFEST_FORMAT_KEY: str,
    schema.MANIFEST_NUM_IMAGES: int,
    schema.MANIFEST_NUM_CLASSES: int,
    schema.MANIFEST_LABEL_RANGE: list,
    schema.MANIFEST_IMAGE_SIZE: list,
    schema.MANIFEST_SHARDS: list,
}


def load_manifest(output_dir: PathLike) -> dict[str, Any]:
    """Read and structurally check ``output_dir/manifest.json``.

    Raises:
        TFRecordError: missing or unreadable manifest, wrong format, missing keys, or a shard
            entry that is not ``{name, num_records, bytes, sha256}`` with a plain file name.
    """
    path = os.path.join(os.fspath(output_dir), schema.MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise TFRecordError(
            "manifest.json is missing: the conversion did not finish (or this is not a "
            "converter output folder)",
            path=path,
            expected="a manifest written by facerec_tf.data.convert",
        ) from None
    except (OSError, ValueError) as e:
        raise TFRecordError(f"cannot read the manifest: {e}", path=path) from None

    def bad(detail: str, key: str | None = None) -> TFRecordError:
        return TFRecordError(detail, path=path, key=key, expected="a facerec_tf manifest")

    if not isinstance(manifest, dict):
        raise bad("the manifest is not a JSON object")
    for key, typ in _REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise bad(f"missing or malformed {key!r}", key)
    if manifest[schema.MANIFEST_FORMAT_KEY] != schema.MANIFEST_FORMAT:
        raise bad(f"format {manifest[schema.MANIFEST_FORMAT_KEY]!r}", schema.MANIFEST_FORMAT_KEY)
    for i, s in enumerate(manifest[schema.MANIFEST_SHARDS]):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and isinstance(s.get("num_records"), int)
            and isinstance(s.get("bytes"), int)
            and isinstance(s.get("sha256"), str)
        )
        if not ok or os.path.basename(s["name"]) != s["name"] or s["name"] in ("", ".", ".."):
            raise bad(f"shard entry {i} is malformed: {s!r}", schema.MANIFEST_SHARDS)
    return manifest


def verify_output(output_dir: PathLike, *, progress: bool | None = False) -> dict[str, Any]:
    """Re-check a conversion's output against its manifest.

    Every shard listed is read from the first byte to the last (:func:`verify_shard`: framing,
    both CRCs, length fields against the file size, examples with the schema keys, labels in
    ``[0, num_classes)``), its record count, byte size and sha256 compared with the manifest;
    then the totals (``num_images``, ``label_range``) and the uniqueness of ``image/key``.

    Returns:
        the manifest.

    Raises:
        TFRecordError: the first problem found, naming the shard and the byte offset.
    """
    output_dir = os.fspath(output_dir)
    manifest = load_manifest(output_dir)
    num_classes = manifest[schema.MANIFEST_NUM_CLASSES]
    bar = _progress_bar(manifest[schema.MANIFEST_NUM_IMAGES], progress)
    key_arrays: list[np.ndarray] = []
    total = 0
    lo: int | None = None
    hi: int | None = None
    try:
        for entry in manifest[schema.MANIFEST_SHARDS]:
            path = os.path.join(output_dir, entry["name"])
            if not os.path.isfile(path):
                raise TFRecordError(
                    "shard listed in the manifest is missing", path=path, expected="the file"
                )
            keys: list[int] = []

            def collect(ex, keys=keys) -> None:
                keys.append(ex.key)
                if bar is not None and len(keys) % 1024 == 0:
                    bar.update(1024)

            stats = verify_shard(
                path,
                entry["num_records"],
                entry["sha256"],
                num_classes=num_classes,
                on_example=collect,
            )
            if bar is not None:
                bar.update(len(keys) % 1024)
            if stats.bytes != entry["bytes"]:  # pragma: no cover - implied by the sha256
                raise TFRecordError(
                    f"size {stats.bytes} bytes", path=path, expected=f"{entry['bytes']} bytes"
                )
            total += stats.num_records
            if stats.label_min is not None:
                lo = stats.label_min if lo is None else min(lo, stats.label_min)
                hi = stats.label_max if hi is None else max(hi, stats.label_max)  # type: ignore[type-var]
            key_arrays.append(np.asarray(keys, dtype=np.int64))
    finally:
        if bar is not None:
            bar.close()
    mpath = os.path.join(output_dir, schema.MANIFEST_NAME)
    if total != manifest[schema.MANIFEST_NUM_IMAGES]:
        raise TFRecordError(
            f"the shards hold {total} records",
            path=mpath,
            key=schema.MANIFEST_NUM_IMAGES,
            expected=f"{manifest[schema.MANIFEST_NUM_IMAGES]} ({schema.MANIFEST_NUM_IMAGES})",
        )
    if total and [lo, hi] != manifest[schema.MANIFEST_LABEL_RANGE]:
        raise TFRecordError(
            f"the shards' labels span [{lo}, {hi}]",
            path=mpath,
            key=schema.MANIFEST_LABEL_RANGE,
            expected=f"{manifest[schema.MANIFEST_LABEL_RANGE]}",
        )
    if key_arrays:
        all_keys = np.concatenate(key_arrays)
        uniq, counts = np.unique(all_keys, return_counts=True)
        if uniq.size != all_keys.size:
            first_dup = int(np.argmax(counts > 1))
            dup, times = int(uniq[first_dup]), int(counts[first_dup])
            where = [
                manifest[schema.MANIFEST_SHARDS][i]["name"]
                for i, a in enumerate(key_arrays)
                if np.any(a == dup)
            ]
            raise TFRecordError(
                f"source key {dup} appears {times} times (in {', '.join(where)})",
                path=os.path.join(output_dir, where[0]),
                key=schema.SOURCE_KEY,
                expected="every source image exactly once",
            )
    return manifest
