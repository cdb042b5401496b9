"""Load any embedding model the project produces (or insightface ships) behind one interface.

:func:`load_embedding_model` accepts:

* a ``.keras`` backbone: input float RGB ``[N, H, W, 3]`` in 0..255 (normalisation inside the
  model), output the raw embedding;
* a SavedModel directory (``saved_model.pb``) whose ``serving_default`` signature takes float32
  ``[N, H, W, 3]`` in 0..255 and returns ``{"embedding": ...}`` (the single output is used
  when there is no ``embedding`` key);
* a training run directory: ``RUN/best/backbone.keras`` if present, else
  ``RUN/export/backbone.keras``;
* an ONNX file, run with onnxruntime, in one of two interfaces told apart by the input shape:
  ours (NHWC float 0..255, ``[N, H, W, 3]``) or insightface's (NCHW ``[N, 3, 112, 112]``,
  pixels normalised ``(x - 127.5) / 127.5``, raw embedding). Both take RGB.

Every model is called the same way: ``model(images)`` with uint8 or float RGB images
``[N, H, W, 3]`` in 0..255 returns float32 ``[N, D]``. Whether the output is L2-normalised
(``normalized_output``) is measured once at load time on two probe images, so it is right
whatever the exporter did. The evaluator normalises every embedding anyway; the flag only
tells how to read XNorm (1 for normalised outputs) and the flip sum (of unit vectors).

TensorFlow and onnxruntime are imported lazily, inside the loaders.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from facerec_tf.errors import DataFormatError, ImageError

__all__ = [
    "EmbeddingModel",
    "ModelInputError",
    "ModelLoadError",
    "load_embedding_model",
    "load_images",
    "read_image",
    "resolve_model_path",
]

PathLike = str | os.PathLike

_FORMATS = (
    "a .keras file, a SavedModel directory, a training run directory "
    "(best/backbone.keras or export/backbone.keras) or an .onnx file"
)


class ModelLoadError(DataFormatError):
    """A model path that does not exist, has an unknown format or cannot be loaded."""


class ModelInputError(DataFormatError):
    """Images that do not fit the model (wrong size, wrong number of channels)."""


@dataclasses.dataclass
class EmbeddingModel:
    """An embedding model behind a uniform call.

    Attributes:
        path: the file or directory it was loaded from.
        kind: ``"keras"``, ``"saved_model"``, ``"onnx"`` (our NHWC interface) or
            ``"onnx-insightface"`` (NCHW, normalised input).
        input_size: ``(height, width)`` the model needs, or None if it accepts any size.
        embedding_size: ``D``.
        normalized_output: whether the model returns L2-normalised embeddings (measured).
        description: one human-readable line.
    """

    path: str
    kind: str
    input_size: tuple[int, int] | None
    embedding_size: int
    normalized_output: bool
    description: str
    _run: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False)
    _max_batch: int | None = dataclasses.field(default=None, repr=False)

    def check_images(self, images: np.ndarray, source: str | None = None) -> None:
        """Raise :class:`ModelInputError` unless ``images`` is ``[N, H, W, 3]`` with
        ``(H, W) == input_size`` (naming both sizes and ``source``)."""
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[-1] != 3:
            raise ModelInputError(
                f"images have shape {shape}",
                path=source,
                expected="RGB images [N, H, W, 3]",
            )
        if self.input_size is not None and tuple(shape[1:3]) != tuple(self.input_size):
            h, w = self.input_size
            raise ModelInputError(
                f"the images are {shape[1]}x{shape[2]} but the model {self.path} expects "
                f"{h}x{w} input",
                path=source,
                expected=f"{h}x{w} images",
            )

    def __call__(self, images) -> np.ndarray:
        """Embeddings ``[N, D]`` (float32) of RGB images ``[N, H, W, 3]`` in 0..255."""
        images = np.asarray(images)
        self.check_images(images)
        x = images.astype(np.float32, copy=False)
        if len(x) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        step = self._max_batch or len(x)
        outs = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            if self._max_batch and len(chunk) < self._max_batch:  # fixed batch: pad
                pad = np.zeros((self._max_batch - len(chunk), *chunk.shape[1:]), np.float32)
                out = self._run(np.concatenate([chunk, pad]))[: len(chunk)]
            else:
                out = self._run(chunk)
            outs.append(np.asarray(out, np.float32))
        return np.concatenate(outs)


# ----------------------------------------------------------------------------------------------
# Loaders (each returns run_fn, input_size, kind, description, max_batch)


def _keras_loader(path: str):
    import keras
    import tensorflow as tf

    import facerec_tf.models  # noqa: F401  (registers the custom layers for deserialisation)

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the Keras model ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            path=path,
            expected="a .keras file written by model.save()",
        ) from None
    if len(model.inputs) != 1:
        raise ModelLoadError(
            f"the model has {len(model.inputs)} inputs",
            path=path,
            expected="one image input [N, H, W, 3]",
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ModelLoadError(
            f"the model input has shape {shape}", path=path, expected="[N, H, W, 3] RGB images"
        )
    size = None if shape[1] is None or shape[2] is None else (int(shape[1]), int(shape[2]))
    spec = tf.TensorSpec([None, shape[1], shape[2], 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return (lambda x: fn(x).numpy()), size, "keras", f"Keras model {model.name!r}", None


def _saved_model_loader(path: str):
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the SavedModel ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            path=path,
        ) from None
    if "serving_default" not in loaded.signatures:
        raise ModelLoadError(
            f"no serving_default signature (has: {sorted(loaded.signatures) or 'none'})",
            path=path,
            expected="a SavedModel with a serving_default signature",
        )
    sig = loaded.signatures["serving_default"]
    args, kwargs = sig.structured_input_signature
    specs = list(args) + list(kwargs.values())
    if len(specs) != 1:
        raise ModelLoadError(
            f"serving_default takes {len(specs)} inputs",
            path=path,
            expected="one input [N, H, W, 3]",
        )
    input_name = next(iter(kwargs)) if kwargs else None
    spec = specs[0]
    shape = tuple(spec.shape.as_list()) if spec.shape.rank is not None else ()
    if len(shape) != 4 or shape[-1] != 3:
        raise ModelLoadError(
            f"serving_default input has shape {shape}",
            path=path,
            expected="[N, H, W, 3] RGB images",
        )
    outputs = sig.structured_outputs
    if "embedding" in outputs:
        out_key = "embedding"
    elif len(outputs) == 1:
        out_key = next(iter(outputs))
    else:
        raise ModelLoadError(
            f"serving_default has outputs {sorted(outputs)} and none is 'embedding'",
            path=path,
            expected="an 'embedding' output",
        )
    dtype = spec.dtype

    def run(x: np.ndarray) -> np.ndarray:
        t = tf.cast(tf.constant(x), dtype)
        out = sig(**{input_name: t}) if input_name else sig(t)
        return out[out_key].numpy()

    size = None if shape[1] is None or shape[2] is None else (int(shape[1]), int(shape[2]))
    return run, size, "saved_model", f"SavedModel serving_default[{out_key!r}]", None


# onnxruntime's session log level (0 verbose .. 3 error, 4 fatal): errors only, so that a
# model whose graph declares other shapes than it computes (insightface's ONNX files) does not
# print a warning for every batch. evaluate.py --verbose lowers it to 2 (warnings).
ONNXRUNTIME_LOG_SEVERITY = 3


def _onnx_loader(path: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(
            "onnxruntime is not installed (pip install -e '.[onnx]')", path=path
        ) from None
    providers = [
        p
        for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if p in ort.get_available_providers()
    ]
    options = ort.SessionOptions()
    options.log_severity_level = ONNXRUNTIME_LOG_SEVERITY
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            path=path,
        ) from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(
            f"the ONNX model has {len(inputs)} inputs", path=path, expected="one image input"
        )
    inp = inputs[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelLoadError(
            f"the ONNX input has shape {shape}",
            path=path,
            expected="[N, 3, H, W] (insightface) or [N, H, W, 3] (ours)",
        )
    if inp.type != "tensor(float)":
        raise ModelLoadError(f"the ONNX input is a {inp.type}", path=path, expected="tensor(float)")
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    out_name = "embedding" if "embedding" in names else names[0]

    def dim(v) -> int | None:
        return v if isinstance(v, int) and v > 0 else None

    batch = dim(shape[0])
    if shape[1] == 3:  # insightface: NCHW, (x - 127.5) / 127.5
        size = (dim(shape[2]), dim(shape[3]))

        def run(x: np.ndarray) -> np.ndarray:
            blob = np.ascontiguousarray(((x - 127.5) / 127.5).transpose(0, 3, 1, 2))
            return session.run([out_name], {inp.name: blob.astype(np.float32)})[0]

        kind, what = "onnx-insightface", "ONNX, insightface interface (NCHW, (x-127.5)/127.5)"
    elif shape[3] == 3:  # ours: NHWC 0..255
        size = (dim(shape[1]), dim(shape[2]))

        def run(x: np.ndarray) -> np.ndarray:
            return session.run([out_name], {inp.name: np.ascontiguousarray(x)})[0]

        kind, what = "onnx", "ONNX, NHWC 0..255 interface"
    else:
        raise ModelLoadError(
            f"the ONNX input has shape {shape}: no dimension 1 or 3 of size 3",
            path=path,
            expected="[N, 3, H, W] (insightface) or [N, H, W, 3] (ours)",
        )
    if size[0] is None or size[1] is None:
        size = None
    return run, size, kind, f"{what} output {out_name!r}", batch


def resolve_model_path(path: PathLike) -> tuple[str, str]:
    """``(file_to_load, loader)`` for a user-given model path, without loading anything
    (``loader`` is ``"keras"``, ``"saved_model"`` or ``"onnx"``).

    Raises:
        ModelLoadError: the path does not exist or its format is unknown.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError("no such file or directory", path=path, expected=_FORMATS)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return path, "saved_model"
        for sub in ("best", "export"):
            candidate = os.path.join(path, sub, "backbone.keras")
            if os.path.isfile(candidate):
                return candidate, "keras"
        raise ModelLoadError(
            "the directory is neither a SavedModel (no saved_model.pb) nor a training run "
            "(no best/backbone.keras or export/backbone.keras)",
            path=path,
            expected=_FORMATS,
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".keras":
        return path, "keras"
    if suffix == ".onnx":
        return path, "onnx"
    raise ModelLoadError(
        f"unknown model format (file suffix {suffix or 'none'!r})", path=path, expected=_FORMATS
    )


def _probe_images(size: tuple[int, int] | None) -> np.ndarray:
    h, w = size or (112, 112)
    grey = np.full((h, w, 3), 128.0, np.float32)
    ramp = np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32)[None, :, None], (h, w, 3))
    return np.stack([grey, ramp])


def load_embedding_model(path: PathLike) -> EmbeddingModel:
    """Load a ``.keras`` file, a SavedModel, a training run directory or an ONNX file.

    Raises:
        ModelLoadError: the path does not exist, its format is unknown, or it cannot be
            loaded (the message names the path and what was expected).
    """
    given = os.fspath(path)
    file, loader = resolve_model_path(given)
    run, size, kind, what, max_batch = {
        "keras": _keras_loader,
        "saved_model": _saved_model_loader,
        "onnx": _onnx_loader,
    }[loader](file)
    probe = EmbeddingModel(file, kind, size, 0, False, what, run, max_batch)
    try:
        out = probe(_probe_images(size))
    except Exception as e:
        raise ModelLoadError(
            f"the model fails on two probe images ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})",
            path=file,
        ) from None
    if out.ndim != 2:
        raise ModelLoadError(
            f"the model returns shape {out.shape}", path=file, expected="embeddings [N, D]"
        )
    normalized = bool(np.all(np.abs(np.linalg.norm(out, axis=1) - 1.0) < 1e-3))
    size_text = "any size" if size is None else f"{size[0]}x{size[1]}"
    norm_text = "L2-normalised" if normalized else "raw"
    description = (
        f"{what} from {file} (input {size_text} RGB 0..255, {out.shape[1]}-d {norm_text} embedding)"
    )
    return EmbeddingModel(
        path=file,
        kind=kind,
        input_size=size,
        embedding_size=int(out.shape[1]),
        normalized_output=normalized,
        description=description,
        _run=run,
        _max_batch=max_batch,
    )


# ----------------------------------------------------------------------------------------------
# Image files -> model input


def read_image(path: PathLike, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to RGB ``uint8 [H, W, 3]`` (grey is expanded; JPEG with the
    ISLOW DCT like the ``.bin`` decoder). Images are not resized: give aligned crops.

    Raises:
        ImageError: unreadable or undecodable file, or not ``image_size`` (naming both sizes).
    """
    import tensorflow as tf

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot read image: {e.strerror or e}", path=path) from None
    try:
        if data.startswith(b"\xff\xd8\xff"):
            img = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
        else:
            img = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    except tf.errors.OpError as e:
        raise ImageError(
            f"cannot decode image ({e.message.splitlines()[0][:120]})",
            path=path,
            expected="a JPEG, PNG, BMP or GIF file",
        ) from None
    if image_size is not None and img.shape[:2] != tuple(image_size):
        h, w = image_size
        raise ImageError(
            f"the image is {img.shape[0]}x{img.shape[1]} but the model expects {h}x{w}",
            path=path,
            expected=f"aligned {h}x{w} face crops",
        )
    return img


def load_images(
    paths: Sequence[PathLike], image_size: tuple[int, int] | None = None, progress: bool = False
) -> np.ndarray:
    """:func:`read_image` over ``paths`` into one ``uint8 [N, H, W, 3]`` array (each file is
    read once even if listed several times)."""
    cache: dict[str, np.ndarray] = {}
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="reading images", unit="img", leave=False)
    out = []
    for p in it:
        key = os.fspath(p)
        if key not in cache:
            cache[key] = read_image(key, image_size)
            if image_size is None:
                image_size = cache[key].shape[:2]
        out.append(cache[key])
    if not out:
        h, w = image_size or (0, 0)
        return np.zeros((0, h, w, 3), np.uint8)
    return np.stack(out)


def load_pfe_model(path: PathLike) -> EmbeddingModel:
    """A PFE model (``images -> [embedding, log sigma^2]``, what ``train.py`` writes to
    ``OUTPUT/export/pfe.keras`` with ``loss.pfe``): a ``.keras`` file or a run directory.

    The returned model's call gives ``[N, 2 D]``: the raw embedding, then the log variance;
    ``embedding_size`` is ``D``.
    """
    import keras
    import tensorflow as tf

    import facerec_tf.losses
    import facerec_tf.models  # noqa: F401

    given = os.fspath(path)
    candidates = [given]
    if os.path.isdir(given):
        candidates = [os.path.join(given, "export", "pfe.keras"), os.path.join(given, "pfe.keras")]
    file = next((c for c in candidates if os.path.isfile(c)), None)
    if file is None:
        raise ModelLoadError(
            "no PFE model here",
            path=given,
            expected="a .keras PFE model or a run directory "
            "with export/pfe.keras (train.py with loss.pfe=true)",
        )
    try:
        model = keras.models.load_model(file, compile=False)
    except Exception as e:
        raise ModelLoadError(f"cannot load: {str(e).splitlines()[0][:200]}", path=file) from None
    if len(model.outputs) != 2:
        raise ModelLoadError(
            f"the model has {len(model.outputs)} outputs",
            path=file,
            expected="a PFE model with two outputs [embedding, log variance]",
        )
    dim = int(model.outputs[0].shape[-1])
    fn = tf.function(lambda x: tf.concat(model(x, training=False), axis=1))
    shape = model.inputs[0].shape
    size = (int(shape[1]), int(shape[2])) if shape[1] and shape[2] else None
    description = f"PFE Keras model from {file} ({dim}-d embedding + log variance)"
    return EmbeddingModel(
        path=file,
        kind="keras-pfe",
        input_size=size,
        embedding_size=dim,
        normalized_output=False,
        description=description,
        _run=lambda x: fn(tf.constant(x)).numpy(),
    )
