"""Read and write insightface verification pair files (``lfw.bin``, ``cfp_fp.bin``, ...).

A ``.bin`` file is a pickle of ``(list_of_image_bytes, list_of_bool)``: pair ``i`` is images
``2 * i`` and ``2 * i + 1``, and ``issame[i]`` tells whether they show the same person. The
images are encoded files (JPEG in insightface's own files). Files written by Python 2 hold the
images as ``str``, so they are unpickled with ``encoding="bytes"``.

Pickles can run code when loaded, so :func:`load_bin` uses a restricted unpickler that
refuses every global except a short allow-list, and raises :class:`VerificationBinError`
before anything it refuses is called. Genuine insightface files need no global at all; the
allow-list only covers what harmless writers produce:

* ``_codecs.encode(text, "latin1")``: how Python 3 pickles ``bytes`` at protocol 2
  (accepted only with the ``latin1`` codec and a ``str`` argument);
* numpy bool scalars and bool arrays (``np.bool_`` in the ``issame`` list, or an ``issame``
  bool array), which some third-party packers write: ``numpy.dtype`` (bool only),
  ``numpy.ndarray`` and numpy's ``multiarray.scalar`` / ``multiarray._reconstruct``.

Decoding is separate (:func:`decode_pairs`) and imports TensorFlow lazily. It returns the
images unflipped; the evaluator flips them with :func:`flip_horizontal` when it wants the
flip-augmented embedding.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facerec_tf.errors import ImageError, VerificationBinError
from facerec_tf.safe_pickle import AllowListUnpickler, RefusedGlobal

__all__ = [
    "VerificationSet",
    "decode_pairs",
    "flip_horizontal",
    "load_bin",
    "write_bin",
    "write_bin_from_pairs",
]

PathLike = str | os.PathLike

_JPEG_SOI = b"\xff\xd8\xff"


@dataclass(frozen=True)
class VerificationSet:
    """The content of one verification ``.bin`` file.

    Attributes:
        name: the file stem (``"lfw"`` for ``lfw.bin``).
        path: the file it was read from.
        jpeg_bytes: ``2 * N`` encoded images; pair ``i`` is ``jpeg_bytes[2i]``, ``[2i + 1]``.
        issame: ``N`` booleans (``np.bool_`` array): whether pair ``i`` is one person.
    """

    name: str
    path: str
    jpeg_bytes: list[bytes]
    issame: np.ndarray

    def __len__(self) -> int:
        """Number of pairs."""
        return int(self.issame.shape[0])


# ----------------------------------------------------------------------------------------------
# Restricted unpickling


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` that only rebuilds protocol-2 ``bytes``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise RefusedGlobal("_codecs", f"encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


def _bool_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    """Stand-in for ``numpy.dtype`` that only builds the bool dtype."""
    if spec not in ("b1", b"b1", "?", b"?", "bool"):
        raise RefusedGlobal("numpy", f"dtype({spec!r})")
    return np.dtype(np.bool_)


_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
_NP_SCALAR = np.bool_(True).__reduce__()[0]  # numpy.(_)core.multiarray.scalar

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _bool_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
}


class _RestrictedUnpickler(AllowListUnpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``."""

    allowed = _ALLOWED_GLOBALS


def _unpickle(data: bytes, path: str) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedGlobal as e:
        raise VerificationBinError(
            f"refused to load the pickle: it asks for the global {e.module}.{e.name}, which a "
            "verification .bin never needs (a malicious or foreign pickle?)",
            path=path,
            expected="(list of image bytes, list of bool) with no globals",
        ) from None
    except Exception as e:  # any unpickling failure: truncated, not a pickle, bad opcodes...
        raise VerificationBinError(
            f"not a readable pickle ({type(e).__name__}: {e})",
            path=path,
            expected="a pickle of (list of image bytes, list of bool)",
        ) from None


# ----------------------------------------------------------------------------------------------
# Validation shared by reader and writer


def _check_content(images: object, issame: object, path: str) -> tuple[list[bytes], np.ndarray]:
    """Check ``(images, issame)`` and return them as ``list[bytes]`` and a bool array."""
    if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
        raise VerificationBinError(
            f"the images are a {type(images).__name__}",
            path=path,
            expected="a list of encoded image bytes",
        )
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise VerificationBinError(
                f"issame is an array of dtype {issame.dtype} and shape {issame.shape}",
                path=path,
                expected="a 1-D bool array or a list of bool",
            )
        flags = issame.copy()
    elif isinstance(issame, (list, tuple)):
        for i, v in enumerate(issame):
            if not isinstance(v, (bool, np.bool_)):
                raise VerificationBinError(
                    f"issame[{i}] is a {type(v).__name__} ({v!r:.40})",
                    path=path,
                    key=i,
                    expected="bool",
                )
        flags = np.array(issame, dtype=np.bool_)
    else:
        raise VerificationBinError(
            f"issame is a {type(issame).__name__}", path=path, expected="a list of bool"
        )
    if flags.size == 0:
        raise VerificationBinError("the pairs list is empty", path=path, expected="at least 1 pair")
    if len(images) != 2 * flags.size:
        raise VerificationBinError(
            f"{len(images)} images for {flags.size} pairs",
            path=path,
            expected=f"{2 * flags.size} images (2 per pair)",
        )
    out = []
    for i, b in enumerate(images):
        if not isinstance(b, bytes):
            raise VerificationBinError(
                f"image {i} is a {type(b).__name__}, not bytes",
                path=path,
                key=i,
                expected="encoded image bytes",
            )
        if not b:
            raise VerificationBinError(
                f"image {i} is empty", path=path, key=i, expected="encoded image bytes"
            )
        out.append(bytes(b))
    return out, flags


# ----------------------------------------------------------------------------------------------
# Public API


def load_bin(path: PathLike) -> VerificationSet:
    """Load an insightface verification ``.bin`` file safely.

    Works for Python 2 (protocol 2, ``str`` images) and Python 3 pickles alike.

    Raises:
        VerificationBinError: unreadable or truncated pickle, a refused global, or content
            that is not ``(list of 2N non-empty bytes, list of N bools)`` with ``N >= 1``.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise VerificationBinError(f"cannot read file: {e}", path=path) from e
    obj = _unpickle(data, path)
    if not isinstance(obj, tuple) or len(obj) != 2:
        what = f"a {len(obj)}-tuple" if isinstance(obj, tuple) else f"a {type(obj).__name__}"
        raise VerificationBinError(
            f"the pickle holds {what}", path=path, expected="a 2-tuple (images, issame)"
        )
    images, flags = _check_content(obj[0], obj[1], path)
    name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name=name, path=path, jpeg_bytes=images, issame=flags)


def decode_pairs(vset: VerificationSet, image_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Decode every image of ``vset`` to RGB ``uint8`` (no flip, no normalisation).

    JPEG headers are checked with ``tf.io.extract_jpeg_shape`` before decoding; other formats
    (PNG, ...) are decoded then checked. Grey images are expanded to 3 channels.

    Args:
        vset: a loaded verification set.
        image_size: expected ``(height, width)`` of every image.

    Returns:
        ``uint8`` array ``[2N, H, W, 3]`` in file order.

    Raises:
        ImageError: an image cannot be decoded or is not ``H x W`` (names file and index).
    """
    import tensorflow as tf  # lazy: keep this module importable without TensorFlow

    height, width = int(image_size[0]), int(image_size[1])
    out = np.empty((len(vset.jpeg_bytes), height, width, 3), dtype=np.uint8)
    expected = f"{height}x{width}"
    for i, data in enumerate(vset.jpeg_bytes):
        try:
            if data.startswith(_JPEG_SOI):
                h, w = (int(v) for v in tf.io.extract_jpeg_shape(data).numpy()[:2])
                if (h, w) != (height, width):
                    raise ImageError(
                        f"image {i} is {h}x{w}", path=vset.path, key=i, expected=expected
                    )
                # ISLOW DCT, like OpenCV / MXNet's imdecode in insightface's evaluation.
                img = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
            else:
                img = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        except tf.errors.OpError as e:
            raise ImageError(
                f"image {i} cannot be decoded ({e.message.splitlines()[0][:120]})",
                path=vset.path,
                key=i,
                expected="a JPEG (or PNG/BMP/GIF) image",
            ) from None
        if img.shape[:2] != (height, width):
            raise ImageError(
                f"image {i} is {img.shape[0]}x{img.shape[1]}",
                path=vset.path,
                key=i,
                expected=expected,
            )
        out[i] = img
    return out


def flip_horizontal(images: np.ndarray) -> np.ndarray:
    """Mirror ``[..., H, W, C]`` images left-right (a view; the evaluator's flip TTA)."""
    return images[..., ::-1, :]


def write_bin(
    path: PathLike,
    jpeg_bytes: Sequence[bytes],
    issame: Sequence[bool] | np.ndarray,
    protocol: int = 4,
) -> None:
    """Write a verification ``.bin`` file atomically (temp file in the same folder, then
    ``os.replace``), after the same checks :func:`load_bin` makes.

    Args:
        path: destination.
        jpeg_bytes: ``2 * N`` encoded images.
        issame: ``N`` booleans.
        protocol: pickle protocol, 2 to 5 (``load_bin`` reads all of them).

    Raises:
        VerificationBinError: invalid content (naming ``path``); nothing is written.
    """
    path = os.fspath(path)
    if not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(f"protocol must be 2..{pickle.HIGHEST_PROTOCOL}, got {protocol}")
    images, flags = _check_content(
        list(jpeg_bytes), issame if isinstance(issame, np.ndarray) else list(issame), path
    )
    payload = (images, [bool(v) for v in flags])
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bin_from_pairs(
    path: PathLike,
    pairs: Iterable[tuple[PathLike, PathLike, bool]],
    *,
    protocol: int = 4,
    jpeg_quality: int = 95,
) -> int:
    """Write a ``.bin`` from ``(image_a, image_b, issame)`` file pairs.

    JPEG files are stored byte for byte; other formats TensorFlow can decode (PNG, BMP, GIF)
    are decoded to RGB and re-encoded with ``tf.io.encode_jpeg`` at ``jpeg_quality``. Images
    are not resized: give it aligned crops of the evaluation size.

    Returns:
        The number of pairs written.

    Raises:
        ImageError: an input file cannot be read or decoded (naming it).
        VerificationBinError: see :func:`write_bin`.
    """
    cache: dict[str, bytes] = {}

    def encoded(p: PathLike) -> bytes:
        p = os.fspath(p)
        if p not in cache:
            try:
                with open(p, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageError(f"cannot read image: {e}", path=p) from e
            if not data.startswith(_JPEG_SOI):
                data = _reencode_jpeg(data, p, jpeg_quality)
            cache[p] = data
        return cache[p]

    images: list[bytes] = []
    flags: list[bool] = []
    for a, b, same in pairs:
        images += [encoded(a), encoded(b)]
        flags.append(bool(same))
    write_bin(path, images, flags, protocol=protocol)
    return len(flags)


def _reencode_jpeg(data: bytes, path: str, quality: int) -> bytes:
    import tensorflow as tf  # lazy

    try:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        return bytes(tf.io.encode_jpeg(img, quality=quality).numpy())
    except tf.errors.OpError as e:
        raise ImageError(
            f"cannot decode image to re-encode it as JPEG ({e.message.splitlines()[0][:120]})",
            path=path,
            expected="a JPEG, PNG, BMP or GIF file",
        ) from None
