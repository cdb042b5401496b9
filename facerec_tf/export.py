"""Export of the embedding model: SavedModel (TF Serving), ``.keras`` and ONNX.

Every export computes the same thing as the Keras backbone; only the packaging differs.

**SavedModel** (:func:`export_saved_model`, :func:`export_for_serving`), two signatures:

========================  ===========================================  =======================
signature                 input                                        output
========================  ===========================================  =======================
``serving_default``       ``images``: float32 ``[N, H, W, 3]``, RGB     ``embedding``: float32
                          pixels in [0, 255] (normalised in the graph)  ``[N, D]``, L2-normalised
``serve_jpeg``            ``jpeg_bytes``: string ``[N]``, encoded JPEG  ``embedding`` (same)
                          files of exactly ``H x W`` pixels (grey or
                          colour), decoded in the graph
========================  ===========================================  =======================

The output key ``embedding`` (:data:`OUTPUT_KEY`) and the input names are a stable interface.
The SavedModel needs no XLA (grouped convolutions are exported as plain ``Conv2D`` ops), so
the stock ``tensorflow/serving`` image runs it.

**ONNX** (:func:`export_onnx`, needs the ``onnx`` extra: ``pip install -e ".[onnx]"``), opset
15, dynamic batch dimension ``N``:

* default: input ``images`` float32 ``[N, H, W, 3]`` RGB in [0, 255], output ``embedding``
  L2-normalised, exactly like ``serving_default``;
* ``insightface_interface=True``: the interface of insightface's model zoo, so its tooling
  (``insightface.model_zoo``) can load the file: input ``data`` float32 ``[N, 3, H, W]`` RGB
  already normalised as ``(x - 127.5) / 127.5``, output ``embedding`` = the raw
  (un-normalised) embedding. In the graph the input is transposed to NHWC and multiplied by
  ``127.5 / 128`` (our backbones' internal input is ``(x - 127.5) / 128``), then the backbone
  runs without its ``preprocess`` layer.

**.keras** (:func:`export_keras`): ``backbone.save``.

Every writer is atomic: the result is written beside the target under a hidden temporary
name and renamed into place, so a reader (or TF Serving polling a model folder) never sees a
half-written export, and a failed export leaves the previous one untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from facerec_tf._optional import require as _require
from facerec_tf.errors import FacerecError, MissingDependencyError

__all__ = [
    "FORMATS",
    "IMAGES_INPUT",
    "INSIGHTFACE_INPUT",
    "JPEG_INPUT",
    "JPEG_SIGNATURE",
    "ONNX_OPSET",
    "OUTPUT_KEY",
    "SERVING_SIGNATURE",
    "ExportError",
    "MissingDependencyError",
    "export_for_serving",
    "export_keras",
    "export_model",
    "export_onnx",
    "export_saved_model",
    "load_backbone",
    "resolve_model_path",
]

OUTPUT_KEY = "embedding"
SERVING_SIGNATURE = "serving_default"
JPEG_SIGNATURE = "serve_jpeg"
IMAGES_INPUT = "images"
JPEG_INPUT = "jpeg_bytes"
INSIGHTFACE_INPUT = "data"
ONNX_OPSET = 15
FORMATS = ("saved_model", "onnx", "keras")

# Our backbones see (x - 127.5) / 128; insightface feeds (x - 127.5) / 127.5.
INSIGHTFACE_TO_FACEREC = 127.5 / 128.0
_PIXEL_OFFSET = 127.5
_PIXEL_SCALE = 128.0
_ONNX_BATCH_DIM = "N"


class ExportError(FacerecError, ValueError):
    """An export cannot be made: unusable model, bad option or an existing target."""


# ----------------------------------------------------------------------------------------------
# Atomic writers
#
# Local paths use os renames (atomic). Any other ``tf.io.gfile`` file system (``gs://``,
# ``hdfs://``, ``ram://``...) goes through gfile: the result is written under the hidden
# temporary name too, then moved file by file (object stores rename no folders, and a
# folder rename there would not be atomic anyway).


def is_remote_path(path: str | os.PathLike) -> bool:
    """True for a ``scheme://`` path (a non-local ``tf.io.gfile`` file system)."""
    return "://" in os.fspath(path)


def absolute_path(path: str | os.PathLike) -> str:
    """``os.path.abspath`` for local paths; a ``scheme://`` path is returned unchanged."""
    path = os.fspath(path)
    return path if is_remote_path(path) else os.path.abspath(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _move_tree(src: str, dst: str) -> None:
    """Move the files of folder ``src`` (recursively) to folder ``dst`` through gfile."""
    gfile = _gfile()
    for folder, _, files in list(gfile.walk(src)):
        rel = folder[len(src) :].lstrip("/")
        target = f"{dst}/{rel}" if rel else dst
        gfile.makedirs(target)
        for name in files:
            gfile.rename(f"{folder}/{name}", f"{target}/{name}", overwrite=True)
    gfile.rmtree(src)


def _swap_into_place(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path``, replacing an existing file or folder at ``path``."""
    if is_remote_path(path):
        gfile = _gfile()
        if not gfile.isdir(tmp):
            gfile.rename(tmp, path, overwrite=True)
            return
        _remove(path)
        _move_tree(tmp, path)
        return
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if os.path.isfile(path) and os.path.isfile(tmp):
        os.replace(tmp, path)
        return
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def _remove(path: str) -> None:
    """Remove a file or folder if it exists (any file system)."""
    if is_remote_path(path):
        gfile = _gfile()
        if gfile.isdir(path):
            gfile.rmtree(path)
        elif gfile.exists(path):
            gfile.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty hidden folder beside ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = absolute_path(path)
    parent = os.path.dirname(path)
    base = os.path.basename(path)
    if is_remote_path(path):
        tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex}"
        _gfile().makedirs(tmp)
    else:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        _swap_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` (same extension); on success it replaces
    ``path``. On an exception the temporary file is removed and ``path`` is left as it was."""
    path = absolute_path(path)
    parent = os.path.dirname(path)
    remote = is_remote_path(path)
    if remote:
        _gfile().makedirs(parent)
    else:
        os.makedirs(parent, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}{ext}")
    try:
        yield tmp
        if _gfile().isdir(path) if remote else os.path.isdir(path):
            raise ExportError(f"{path} is a folder; expected a file name ending in {ext!r}")
        if remote:
            _gfile().rename(tmp, path, overwrite=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# The inference graph shared by every export


def _image_shape(backbone) -> tuple[int, int]:
    """``(H, W)`` of the backbone's ``[N, H, W, 3]`` input."""
    shape = tuple(backbone.input_shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1] is None or shape[2] is None:
        raise ExportError(
            f"model {backbone.name!r} takes input of shape {shape}; "
            "expected a fixed-size RGB image batch [N, H, W, 3]"
        )
    return int(shape[1]), int(shape[2])


def _preprocess_layer(backbone):
    """The ``preprocess`` Rescaling layer mapping [0, 255] to (x - 127.5) / 128, or None."""
    import keras

    try:
        layer = backbone.get_layer("preprocess")
    except ValueError:
        return None
    if not isinstance(layer, keras.layers.Rescaling):
        return None
    return layer


def _has_preprocessing(backbone) -> bool:
    """Whether ``backbone`` takes pixels in [0, 255] (else it takes (x - 127.5) / 128)."""
    if _preprocess_layer(backbone) is not None:
        return True
    try:
        config = backbone.get_config()
    except Exception:
        config = {}
    # A backbone built with include_preprocessing=False takes normalised input; any other
    # model is assumed to take pixels like ours.
    return bool(config.get("include_preprocessing", True))


@functools.cache
def _plain_grouped_conv_class():
    """A layer computing a grouped ``Conv2D`` with a plain ``tf.nn.conv2d`` (no XLA).

    Keras' TensorFlow backend runs grouped convolutions in an XLA-compiled function, which
    neither tf2onnx nor an XLA-less TF Serving build can run. TensorFlow's own ``Conv2D`` op
    supports groups, and tf2onnx maps it to an ONNX ``Conv`` with ``group``.
    """
    import keras
    import tensorflow as tf

    class PlainGroupedConv2D(keras.layers.Layer):
        def __init__(self, conv, **kwargs):
            super().__init__(name=conv.name, dtype=conv.dtype_policy, **kwargs)
            self.conv = conv

        def call(self, x):
            c = self.conv
            y = tf.nn.conv2d(
                x,
                tf.cast(c.kernel, x.dtype),
                strides=list(c.strides),
                padding=c.padding.upper(),
                dilations=list(c.dilation_rate),
            )
            if c.use_bias:
                y = tf.nn.bias_add(y, tf.cast(c.bias, x.dtype))
            return c.activation(y) if c.activation is not None else y

        def compute_output_shape(self, input_shape):
            return self.conv.compute_output_shape(input_shape)

    return PlainGroupedConv2D


def _is_grouped_conv(layer) -> bool:
    import keras

    return (
        type(layer) is keras.layers.Conv2D
        and layer.groups > 1
        and layer.data_format == "channels_last"
    )


def _inference_graph(backbone, *, drop_preprocessing: bool = False):
    """A plain functional model sharing ``backbone``'s variables, ready to be traced.

    Grouped convolutions are swapped for :func:`_plain_grouped_conv_class` layers. With
    ``drop_preprocessing`` the graph starts after the ``preprocess`` layer (input
    ``(x - 127.5) / 128``).
    """
    import keras

    try:
        inputs, outputs = backbone.inputs, backbone.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        if drop_preprocessing:
            raise ExportError(
                f"model {backbone.name!r} is not a functional Keras model; the insightface "
                "interface needs the graph to remove its 'preprocess' layer"
            )
        return backbone
    if drop_preprocessing:
        pre = _preprocess_layer(backbone)
        if pre is not None:
            if pre.scale != 1.0 / _PIXEL_SCALE or pre.offset != -_PIXEL_OFFSET / _PIXEL_SCALE:
                raise ExportError(
                    f"model {backbone.name!r}: its 'preprocess' layer computes "
                    f"x * {pre.scale} + {pre.offset}; expected (x - 127.5) / 128"
                )
            inputs = [pre.output]
        elif _has_preprocessing(backbone):
            raise ExportError(
                f"model {backbone.name!r} has no 'preprocess' layer; the insightface "
                "interface needs a facerec_tf backbone"
            )
    view = keras.Model(inputs, outputs, name=f"{backbone.name}_inference")
    if not any(_is_grouped_conv(layer) for layer in view.layers):
        return view
    plain = _plain_grouped_conv_class()
    return keras.models.clone_model(
        view, clone_function=lambda layer: plain(layer) if _is_grouped_conv(layer) else layer
    )


def _normalised_embed(backbone, run):
    """``embed(images [N,H,W,3] float32 in [0,255]) -> L2-normalised float32 embedding`` of
    ``run`` (the backbone's graph), normalising the images first when the backbone has no
    preprocess layer."""
    import tensorflow as tf

    normalise_input = not _has_preprocessing(backbone)

    def embed(images):
        x = (images - _PIXEL_OFFSET) / _PIXEL_SCALE if normalise_input else images
        return tf.math.l2_normalize(tf.cast(run(x), tf.float32), axis=-1)

    return embed


def _embedding_fn(backbone):
    """``(graph, embed)``: the backbone's inference graph and its embedding function."""
    graph = _inference_graph(backbone)
    return graph, _normalised_embed(backbone, lambda x: graph(x, training=False))


def _serving_embedding_fn(backbone, precision: str):
    """Like :func:`_embedding_fn`, on the optimised graph of :mod:`facerec_tf.export_optimize`
    (BatchNorms folded, computing in ``precision``); a model it cannot rebuild is exported
    as it is in float32."""
    from facerec_tf.export_optimize import InferenceGraph, OptimizeError

    try:
        graph = InferenceGraph(backbone, precision=precision)
    except OptimizeError as e:  # an unknown precision too
        if precision != "float32":
            raise ExportError(str(e)) from e
        return _embedding_fn(backbone)
    return graph, _normalised_embed(backbone, graph)


# ----------------------------------------------------------------------------------------------
# SavedModel


def export_saved_model(backbone, path: str | os.PathLike, *, precision: str = "float32") -> str:
    """Write ``backbone`` as a SavedModel at exactly ``path`` (atomically; replaces ``path``).

    Signatures ``serving_default`` (float32 ``images [N, H, W, 3]`` RGB in [0, 255]; a batch
    of another image size is refused with a message naming both sizes) and ``serve_jpeg``
    (string ``jpeg_bytes [N]``, encoded ``H x W`` JPEG files); both return
    ``{"embedding": float32 [N, D]}`` L2-normalised. See the module docstring.

    The graph is inference-optimised (:mod:`facerec_tf.export_optimize`: BatchNorms folded
    into the convolutions and dense layers). ``precision="bfloat16"`` computes the backbone in
    bfloat16 (fast on CPUs with AVX512-BF16 or AMX), with the same float32 input and output.

    Returns:
        the absolute path written.
    """
    import tensorflow as tf

    height, width = _image_shape(backbone)
    graph, embed = _serving_embedding_fn(backbone, precision)

    def serve_images(images):
        size = tf.shape(images)[1:3]
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(size, tf.constant([height, width]))),
            [
                f"{SERVING_SIGNATURE}: images must be {height}x{width} pixels "
                f"([N, {height}, {width}, 3], the model input size), got height, width =",
                size,
            ],
            name="check_image_size",
        )
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        return {OUTPUT_KEY: embed(images)}

    def decode_one(data):
        img = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        size = tf.shape(img)[:2]
        ok = tf.reduce_all(tf.equal(size, tf.constant([height, width])))
        check = tf.debugging.Assert(
            ok,
            [
                f"{JPEG_SIGNATURE}: every JPEG must decode to {height}x{width} pixels "
                f"(the model input size; send aligned {height}x{width} face crops), got "
                "height, width =",
                size,
            ],
            name="check_jpeg_size",
        )
        with tf.control_dependencies([check]):
            img = tf.identity(img)
        img.set_shape([height, width, 3])  # static shape only: the Assert guards the value
        return tf.cast(img, tf.float32)

    def serve_jpeg(jpeg_bytes):
        images = tf.map_fn(
            decode_one,
            jpeg_bytes,
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
        )
        return {OUTPUT_KEY: embed(images)}

    # Each signature is traced once; tf.saved_model.save keeps these concrete functions.
    signatures = {
        SERVING_SIGNATURE: tf.function(serve_images, autograph=False).get_concrete_function(
            tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGES_INPUT)
        ),
        JPEG_SIGNATURE: tf.function(serve_jpeg, autograph=False).get_concrete_function(
            tf.TensorSpec([None], tf.string, name=JPEG_INPUT)
        ),
    }
    module = tf.Module(name="facerec_export")
    module.model_variables = list(graph.variables)  # tracked, so they are saved
    path = absolute_path(path)
    with _atomic_dir(path) as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
    return path


def export_for_serving(
    backbone,
    base_dir: str | os.PathLike,
    model_name: str = "facerec",
    version: int = 1,
    *,
    overwrite: bool = False,
    precision: str = "float32",
) -> str:
    """Write the SavedModel of :func:`export_saved_model` in TF Serving's layout,
    ``base_dir/model_name/version/`` (``saved_model.pb`` + ``variables/``).

    Serve it with ``--model_base_path=<base_dir>/<model_name> --model_name=<model_name>``.

    Args:
        backbone: the embedding model.
        base_dir: the model repository folder.
        model_name: TF Serving model name (a folder name, no path separator).
        version: non-negative integer version folder.
        overwrite: replace an existing version (TF Serving may already have loaded it).
        precision: ``"float32"`` or ``"bfloat16"`` (see :func:`export_saved_model`).

    Raises:
        ExportError: bad name or version, or the version exists and ``overwrite`` is False.
    """
    if not model_name or os.sep in model_name or model_name in (".", ".."):
        raise ExportError(f"model_name {model_name!r} must be a plain folder name")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ExportError(f"version {version!r} must be a non-negative integer")
    path = os.path.join(absolute_path(base_dir), model_name, str(version))
    if (_gfile().exists(path) if is_remote_path(path) else os.path.exists(path)) and not overwrite:
        raise ExportError(
            f"{path} already exists; export a new version number (TF Serving does not "
            "reload a version in place) or pass overwrite=True (--overwrite)"
        )
    return export_saved_model(backbone, path, precision=precision)


# ----------------------------------------------------------------------------------------------
# .keras


def export_keras(backbone, path: str | os.PathLike) -> str:
    """``backbone.save(path)`` atomically; ``path`` must end in ``.keras``."""
    path = absolute_path(path)
    if not path.endswith(".keras"):
        raise ExportError(f"{path}: a Keras model file name must end in '.keras'")
    with _atomic_file(path) as tmp:
        backbone.save(tmp)
    return path


# ----------------------------------------------------------------------------------------------
# ONNX


def export_onnx(
    backbone,
    path: str | os.PathLike,
    *,
    insightface_interface: bool = False,
    opset: int = ONNX_OPSET,
) -> str:
    """Convert ``backbone`` to ONNX with tf2onnx and write it atomically to ``path``.

    Args:
        backbone: the embedding model.
        path: the ``.onnx`` file to write.
        insightface_interface: False (default): input ``images`` float32 ``[N, H, W, 3]`` RGB
            in [0, 255], output ``embedding`` L2-normalised (as the SavedModel). True:
            insightface's model-zoo interface, input ``data`` float32 ``[N, 3, H, W]`` holding
            ``(x - 127.5) / 127.5``, output ``embedding`` raw (not normalised).
        opset: ONNX opset (15 by default).

    Raises:
        MissingDependencyError: tf2onnx / onnx are not installed (the ``onnx`` extra).
        ExportError: the model cannot be exported with the requested interface.
    """
    tf2onnx, onnx = _require(("tf2onnx", "onnx"), "ONNX export")
    import tensorflow as tf

    height, width = _image_shape(backbone)
    if insightface_interface:
        graph = _inference_graph(backbone, drop_preprocessing=True)
        spec = tf.TensorSpec([None, 3, height, width], tf.float32, name=INSIGHTFACE_INPUT)

        def fn(data):
            x = tf.transpose(data, [0, 2, 3, 1])
            x = tf.multiply(x, tf.constant(INSIGHTFACE_TO_FACEREC, tf.float32), name="to_facerec")
            return {OUTPUT_KEY: tf.cast(graph(x, training=False), tf.float32)}

    else:
        _, embed = _embedding_fn(backbone)
        spec = tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGES_INPUT)

        def fn(images):
            return {OUTPUT_KEY: embed(images)}

    function = tf.function(fn, input_signature=[spec])
    model_proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)
    for value in [*model_proto.graph.input, *model_proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = _ONNX_BATCH_DIM
    interface = "insightface" if insightface_interface else "facerec"
    model_proto.doc_string = f"facerec_tf {backbone.name}: " + (
        f"input {INSIGHTFACE_INPUT} [N,3,{height},{width}] = (rgb - 127.5) / 127.5, "
        f"output {OUTPUT_KEY} raw"
        if insightface_interface
        else f"input {IMAGES_INPUT} [N,{height},{width},3] RGB 0..255, "
        f"output {OUTPUT_KEY} L2-normalised"
    )
    for key, value in (("facerec_tf.interface", interface), ("facerec_tf.model", backbone.name)):
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(model_proto)
    except onnx.checker.ValidationError as e:  # e.g. an op tf2onnx left unconverted
        raise ExportError(
            f"tf2onnx produced an invalid ONNX graph for model {backbone.name!r}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    path = os.path.abspath(os.fspath(path))
    with _atomic_file(path) as tmp:
        onnx.save(model_proto, tmp)
    return path


# ----------------------------------------------------------------------------------------------
# Loading models and the generic entry point used by tools/export.py


def resolve_model_path(path: str | os.PathLike) -> str:
    """The model file that ``path`` names.

    ``path`` is a ``.keras`` or ``.onnx`` file, or a training run folder, in which case
    ``RUN/best/backbone.keras`` is used if present, else ``RUN/export/backbone.keras``.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without either backbone file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for candidate in ("best", "export"):
            file = os.path.join(path, candidate, "backbone.keras")
            if os.path.isfile(file):
                return file
        raise FileNotFoundError(
            f"model not found: {path} is a folder but holds neither best/backbone.keras nor "
            "export/backbone.keras (expected a training run folder or a .keras/.onnx file)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model not found: {path} does not exist")
    return path


def load_backbone(path: str | os.PathLike, *, from_insightface_onnx: bool = False):
    """Load an embedding model: a ``.keras`` file, a training run folder, an arcface_torch
    ``.pth``/``.pt`` checkpoint (read without torch, see :mod:`facerec_tf.torch_import`), or
    (with ``from_insightface_onnx``, implied in training's ``model.pretrained``) an insightface
    ONNX file (IResNet, IR-SE, MobileFaceNet) whose weights are imported
    (:mod:`facerec_tf.onnx_import`).

    Raises:
        FileNotFoundError: see :func:`resolve_model_path`.
        ExportError: the file is not a model this function can load.
    """
    file = resolve_model_path(path)
    if from_insightface_onnx:
        from facerec_tf.onnx_import import load_insightface_onnx

        return load_insightface_onnx(file)
    if file.endswith(".onnx"):
        raise ExportError(
            f"{file} is an ONNX file; pass from_insightface_onnx=True "
            "(--from-insightface-onnx) to import an arcface_torch IResNet, IR-SE or MobileFaceNet"
        )
    if file.endswith((".pth", ".pt")):
        from facerec_tf.torch_import import load_arcface_torch_pth

        return load_arcface_torch_pth(file)
    if not file.endswith(".keras"):
        raise ExportError(
            f"{file}: expected a .keras model, a training run folder, an arcface_torch .pth "
            "checkpoint or an insightface .onnx file"
        )
    import keras

    import facerec_tf.models  # noqa: F401  (registers the backbone classes)

    return keras.saving.load_model(file, compile=False)


_OPTIONS = {
    "saved_model": {"model_name", "version", "overwrite", "precision"},
    "onnx": {"insightface_interface", "opset", "model_name"},
    "keras": {"model_name"},
}


def _file_target(output: str, ext: str, model_name: str | None) -> str:
    """``output`` if it ends in ``ext``, else ``output/<model_name or backbone><ext>``."""
    if output.endswith(ext):
        return output
    return os.path.join(output, f"{model_name or 'backbone'}{ext}")


def export_model(
    model_or_path: Any,
    output: str | os.PathLike,
    format: str = "saved_model",
    *,
    from_insightface_onnx: bool = False,
    **options: Any,
) -> str:
    """Export a model (a Keras model or anything :func:`load_backbone` reads) to ``output``.

    Formats and their options:

    * ``"saved_model"``: ``output`` is the SavedModel folder. With ``model_name`` and/or
      ``version`` it is instead a TF Serving repository and the model goes to
      ``output/model_name/version/`` (defaults ``facerec`` and 1; ``overwrite`` to replace).
      ``precision``: ``"float32"`` (default) or ``"bfloat16"``.
    * ``"onnx"``: ``insightface_interface`` (bool), ``opset``. ``output`` is the ``.onnx``
      file, or a folder that receives ``<model_name or backbone>.onnx``.
    * ``"keras"``: ``output`` is the ``.keras`` file, or a folder that receives
      ``<model_name or backbone>.keras``.

    Returns:
        the path written (the file, or the SavedModel folder).

    Raises:
        ExportError: unknown format or option, or an unusable model.
        FileNotFoundError: ``model_or_path`` is a path with no model.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; valid formats: {', '.join(FORMATS)}")
    unknown = sorted(set(options) - _OPTIONS[format])
    if unknown:
        raise ExportError(
            f"option(s) {', '.join(unknown)} do not apply to format {format!r}; valid: "
            f"{', '.join(sorted(_OPTIONS[format]))}"
        )
    output = os.fspath(output)
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_backbone(model_or_path, from_insightface_onnx=from_insightface_onnx)
    else:
        model = model_or_path
    model_name = options.get("model_name")
    if format == "saved_model":
        precision = options.get("precision", "float32")
        if model_name is None and options.get("version") is None:
            return export_saved_model(model, output, precision=precision)
        return export_for_serving(
            model,
            output,
            model_name=model_name or "facerec",
            version=1 if options.get("version") is None else options["version"],
            overwrite=bool(options.get("overwrite", False)),
            precision=precision,
        )
    if format == "onnx":
        return export_onnx(
            model,
            _file_target(output, ".onnx", model_name),
            insightface_interface=bool(options.get("insightface_interface", False)),
            opset=int(options.get("opset", ONNX_OPSET)),
        )
    return export_keras(model, _file_target(output, ".keras", model_name))
