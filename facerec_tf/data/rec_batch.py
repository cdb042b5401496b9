"""Vectorised checks of many ``.rec`` image records at once (the converter's fast path).

The converter spends most of its time on per-record Python work. For a batch of record
offsets, :func:`check_records` does with NumPy gathers what
:meth:`facerec_tf.data.convert._ImageReader.read_image` and
:func:`facerec_tf.data.convert.jpeg_info` do one record at a time:

* RecordIO frame: magic, ``cflag == 0`` (one frame), a length that fits in the file with its
  padding, an IRHeader whose label count fits in the payload, and a first label equal to the
  planned one;
* JPEG header: SOI, then plain ``ff marker length`` segments up to a SOF whose length matches
  its component count and whose size is not zero; then the converter's acceptance rules
  (baseline / extended / progressive, 8-bit, 1 or 3 components, at most ``max_side``, the
  expected size).

A record passes only if every check passes on the common shape of the data. Anything else --
split records, fill bytes between markers, a short file, a malformed or unsupported header --
is marked ``False`` and the caller sends that record through the careful per-record path,
which accepts it or raises the precise error. A ``True`` therefore never hides an error: the
per-record path would have accepted the same payload (tests compare the two).
"""

from __future__ import annotations

import numpy as np

MAGIC = 0xCED7230A
_LENGTH_MASK = (1 << 29) - 1
_MAX_SEGMENTS = 24  # plain segments before the SOF (typical JFIF: APP0, DQT x2 -> 3)

_SOF_SUPPORTED = (0xC0, 0xC1, 0xC2)
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)

_IS_SOF = np.zeros(256, dtype=bool)
_IS_SOF[list(_SOF_SUPPORTED + _SOF_OTHER)] = True
_IS_SUPPORTED = np.zeros(256, dtype=bool)
_IS_SUPPORTED[list(_SOF_SUPPORTED)] = True
# Markers that are not "ff, marker, 16-bit length, segment" (fill, stuffing, TEM, RSTn, SOI,
# EOI, SOS) or that end the walk (SOF).
_NOT_PLAIN = _IS_SOF.copy()
_NOT_PLAIN[[0xFF, 0x00, 0x01, *range(0xD0, 0xDB)]] = True


def check_records(
    data: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    *,
    limits: np.ndarray | None = None,
    expected_size: tuple[int, int] | None,
    max_side: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the image records starting at ``offsets`` of the ``.rec`` bytes ``data``.

    Args:
        data: ``uint8`` bytes holding the records: the whole ``.rec`` file, or records read
            one after the other into a buffer.
        offsets: int64 byte offsets of the records in ``data`` (4-byte aligned: RecordIO
            records are).
        labels: the label each record must carry (its first IRHeader label).
        limits: per record, the end of the bytes that belong to it in ``data`` (default: the
            end of ``data``); a record must fit before its limit.
        expected_size: ``(height, width)`` every image must have, or ``None`` for any.
        max_side: the largest height or width accepted.

    Returns:
        ``(ok, start, end)``: a bool array (record passed every check) and int64 arrays with
        the JPEG payload's byte range ``data[start:end]`` (meaningful where ``ok``).
    """
    size = int(data.size)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = offsets.size
    limits = np.full(n, size, np.int64) if limits is None else np.minimum(limits, size)
    ok = (offsets % 4 == 0) & (offsets >= 0) & (offsets + 32 <= limits)
    base = np.where(ok, offsets, 0)

    words = data[: size - size % 4].view("<u4")  # record fields are 4-byte aligned

    def u32(at):
        return words[at // 4]

    magic = u32(base)
    lrec = u32(base + 4).astype(np.int64)  # lrec <= mask <=> cflag 0: one frame
    ok &= (magic == MAGIC) & (lrec >= 24) & (lrec <= _LENGTH_MASK)
    ok &= base + 8 + ((lrec + 3) & ~3) <= limits
    flag = u32(base + 8).astype(np.int64)
    start = base + 32 + 4 * flag
    end = base + 8 + lrec
    ok &= start <= end
    label_at = np.where(flag > 0, base + 32, base + 12)
    label_at = np.where(ok, label_at, 0)
    value = u32(label_at).view(np.float32).astype(np.float64)
    ok &= value == np.asarray(labels, dtype=np.float64)

    # JPEG: SOI, then walk the plain segments of every record in lock step.
    start = np.where(ok, start, 0)
    end = np.where(ok, end, 0)
    ok &= end - start >= 4
    safe = np.where(ok, start, 0)
    ok &= (data[safe] == 0xFF) & (data[np.minimum(safe + 1, size - 1)] == 0xD8)
    pos = start + 2
    active = ok.copy()
    found = np.zeros(n, dtype=bool)
    height = np.zeros(n, dtype=np.int64)
    width = np.zeros(n, dtype=np.int64)
    comps = np.zeros(n, dtype=np.int64)
    precision = np.zeros(n, dtype=np.int64)
    marker = np.zeros(n, dtype=np.int64)
    for _ in range(_MAX_SEGMENTS):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        p, e = pos[idx], end[idx]
        fits = p + 4 <= e
        p4 = np.where(fits, p, 0)[:, None] + np.arange(4)
        head = data[p4].astype(np.int64)
        seg_len = (head[:, 2] << 8) | head[:, 3]
        plain = fits & (head[:, 0] == 0xFF) & (seg_len >= 2) & (p + 2 + seg_len <= e)
        mk = head[:, 1]
        stop = _NOT_PLAIN[mk]
        sof = plain & stop & _IS_SOF[mk] & (seg_len >= 8)
        # segment bytes 4..9: precision, height (2), width (2), components
        s_at = np.where(sof, p, 0)[:, None] + np.arange(4, 10)
        s = data[s_at].astype(np.int64)
        h = (s[:, 1] << 8) | s[:, 2]
        w = (s[:, 3] << 8) | s[:, 4]
        good_sof = sof & (seg_len == 8 + 3 * s[:, 5]) & (h > 0) & (w > 0)
        done = idx[good_sof]
        found[done] = True
        height[done], width[done] = h[good_sof], w[good_sof]
        comps[done], precision[done] = s[good_sof, 5], s[good_sof, 0]
        marker[done] = mk[good_sof]
        # plain segments move on; everything else leaves the walk (found, or not fast)
        go_on = plain & ~stop
        active[idx[~go_on]] = False
        pos[idx[go_on]] = p[go_on] + 2 + seg_len[go_on]
    ok &= found
    ok &= _IS_SUPPORTED[marker] & (precision == 8) & ((comps == 1) | (comps == 3))
    ok &= (height <= max_side) & (width <= max_side)
    if expected_size is not None:
        ok &= (height == int(expected_size[0])) & (width == int(expected_size[1]))
    return ok, start, end
