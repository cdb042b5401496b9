"""The converter's optional C accelerator, and the switch that turns it off.

``facerec_tf.data._fastrec`` (``_fastrec.c``, built by ``pip install`` where a C compiler is
available) runs the per-record loops of the ``.rec`` -> TFRecord converter in C: the reads
at the records' offsets, the record-frame and JPEG-header checks of
:func:`facerec_tf.data.rec_batch.check_records`, and the ``tf.train.Example`` encoding with
TFRecord framing and CRC-32C (SSE4.2 instructions where the CPU has them). The protobuf layout still comes from
:mod:`facerec_tf.data.tfrecord`, which owns the schema; the C code only does the arithmetic,
the copies and the CRCs, and its output is byte-identical to the pure-Python path (tested).

Where the extension is missing (no compiler at install time, another platform) or
``FACEREC_TF_PURE_PYTHON=1`` is set, :func:`get` returns ``None`` and the converter runs its
pure-Python path, which writes the same bytes, only more slowly. The RecordIO reader itself
(:mod:`facerec_tf.data.recordio`) is pure Python either way.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

ENV_PURE_PYTHON = "FACEREC_TF_PURE_PYTHON"

__all__ = [
    "ENV_PURE_PYTHON",
    "available",
    "check_records",
    "frame_examples",
    "frame_examples_into",
    "get",
    "pread_records",
    "start_writeback",
]


def _load() -> ModuleType | None:
    try:
        from facerec_tf.data import _fastrec
    except ImportError:
        return None
    return _fastrec


_MODULE = _load()


def get() -> ModuleType | None:
    """The C module, or ``None`` when it is not built or ``FACEREC_TF_PURE_PYTHON`` is set."""
    if os.environ.get(ENV_PURE_PYTHON, "").strip() not in ("", "0"):
        return None
    return _MODULE


def available() -> bool:
    """Whether the converter will use the C accelerator."""
    return get() is not None


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def pread_records(fd: int, offsets, lengths, buf: np.ndarray, starts) -> np.ndarray:
    """Read ``lengths[i]`` bytes at file offset ``offsets[i]`` into ``buf[starts[i]:]`` for
    every ``i``; returns the bytes read per range (fewer at the end of the file)."""
    mod = get()
    if mod is None:
        raise RuntimeError("the C accelerator is not available (see facerec_tf.data.fastrec)")
    offsets, lengths, starts = _i64(offsets), _i64(lengths), _i64(starts)
    got = np.zeros(offsets.size, dtype=np.int64)
    mod.pread_records(fd, offsets, lengths, buf, starts, got)
    return got


def start_writeback(fd: int) -> bool:
    """Start writing ``fd``'s dirty pages to disk without waiting (Linux
    ``sync_file_range``), so that a later ``fsync`` has little left to wait for; ``False``
    where that is not available (no accelerator, another OS). Durability still comes from
    the ``fsync``."""
    mod = get()
    return bool(mod is not None and mod.start_writeback(fd))


def check_records(
    data: np.ndarray,
    offsets,
    labels,
    *,
    limits,
    expected_size: tuple[int, int] | None,
    max_side: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`facerec_tf.data.rec_batch.check_records` in C (same arguments and contract,
    ``limits`` required): ``(ok, start, end)``."""
    mod = get()
    if mod is None:
        raise RuntimeError("the C accelerator is not available (see facerec_tf.data.fastrec)")
    offsets = _i64(offsets)
    n = offsets.size
    ok = np.zeros(n, dtype=bool)
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    exp_h, exp_w = (-1, -1) if expected_size is None else map(int, expected_size)
    mod.check_records(
        data, offsets, _i64(labels), _i64(limits), ok, start, end, exp_h, exp_w, int(max_side)
    )
    return ok, start, end


def frame_examples_into(
    out, data, starts, ends, labels, keys, offset: int = 0
) -> tuple[np.ndarray, int]:
    """Frame the face Examples of images ``data[starts[i]:ends[i]]`` with ``labels[i]`` and
    ``keys[i]`` into ``out`` from byte ``offset`` on; returns ``(out, nbytes)``, ``out``
    replaced by a larger page-aligned buffer (:func:`facerec_tf.data.directio.aligned_buffer`)
    when too small. ``out[offset:offset + nbytes]`` equals ``b"".join`` of
    :func:`facerec_tf.data.tfrecord.frame_examples`' pieces for the same records; the bytes
    before ``offset`` are left alone."""
    from facerec_tf.data import directio, tfrecord

    mod = get()
    if mod is None:
        raise RuntimeError("the C accelerator is not available (see facerec_tf.data.fastrec)")
    args = (data, _i64(starts), _i64(ends), _i64(labels), _i64(keys), *tfrecord.example_layout())
    with memoryview(out) as view:
        n = mod.frame_examples(view[offset:], *args)
    if n < 0:
        out = directio.aligned_buffer(offset - n + (-n >> 3))  # room to spare for later
        with memoryview(out) as view:
            n = mod.frame_examples(view[offset:], *args)
    return out, n


def frame_examples(data, starts, ends, labels, keys) -> bytes:
    """:func:`frame_examples_into` a new buffer, as ``bytes``."""
    out, n = frame_examples_into(np.empty(0, dtype=np.uint8), data, starts, ends, labels, keys)
    return out[:n].tobytes()
