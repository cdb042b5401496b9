"""Import arcface_torch ``.pth`` checkpoints (IResNet, IR-SE, MobileFaceNet) without torch.

**Reading.** :func:`read_torch_checkpoint` reads torch's zip serialization (``torch.save``
since torch 1.6): an archive ``PREFIX/data.pkl`` (any top-level folder name) whose pickle
refers to raw tensor storages ``PREFIX/data/KEY`` through persistent ids, plus
``PREFIX/byteorder``. The pickle is read by a restricted unpickler whose ``find_class``
resolves only the globals a state dict needs, each mapped to a function of this module (none
of torch's code runs, and torch need not be installed):

* ``collections.OrderedDict``;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` (a view: storage, offset, size,
  stride; bounds checked), ``_rebuild_parameter`` / ``_rebuild_parameter_with_state``;
* the storage types ``torch.FloatStorage``, ``HalfStorage``, ``BFloat16Storage``,
  ``DoubleStorage``, ``LongStorage``, ``IntStorage``, ``ShortStorage``, ``CharStorage``,
  ``ByteStorage``, ``BoolStorage`` (and ``UntypedStorage`` as bytes), only as tags in a
  storage's persistent id; ``torch.Size`` (a tuple).

Any other global (``os.system``, ``builtins.eval``, ``copyreg._reconstructor``...) raises
:class:`TorchCheckpointError` naming the file and the global before anything is called, as the
``.bin`` loader does. Tensors come back as NumPy arrays in native byte order (bfloat16 widened
exactly to float32). A checkpoint that wraps the state dict (arcface_torch's
``checkpoint_gpu_N.pt`` with ``state_dict_backbone``, or ``state_dict`` / ``model``) is
unwrapped, and a DDP ``module.`` prefix on every key is removed. The legacy non-zip format
(``_use_new_zipfile_serialization=False``, torch < 1.6) is refused with a clear message.

**Mapping.** :func:`load_arcface_torch_pth` infers the architecture from the keys and shapes
(IResNet depth from the ``layerN.K`` counts, IR-SE from ``se_module`` keys, MobileFaceNet
blocks and width from ``layers.*``, the embedding size from the last layer), builds it with
:func:`facerec_tf.models.create_backbone` and copies every tensor exactly:

* conv ``[O, I, kh, kw]`` -> Keras ``[kh, kw, I, O]``; depthwise ``[C, 1, kh, kw]`` ->
  ``[kh, kw, C, 1]``; grouped ``[O, I/G, kh, kw]`` -> :class:`GroupedConv2D`'s
  ``[kh, kw, I, O/G]``;
* BatchNorm ``weight``, ``bias``, ``running_mean``, ``running_var`` -> ``gamma``, ``beta``,
  ``moving_mean``, ``moving_variance`` (same epsilon, 1e-5), so eval mode *and* train mode
  (batch statistics) match torch; ``num_batches_tracked`` is ignored;
* PReLU ``[C]`` -> ``alpha [1, 1, C]``;
* the IResNet fc ``[E, C*H*W]`` is permuted from torch's (C, H, W) flatten order to Keras'
  (H, W, C);
* the stem kernel is multiplied by ``128 / 127.5`` when the backbone normalises its own
  input (``include_preprocessing=True``, the default): it takes RGB pixels in [0, 255] and
  feeds ``(x - 127.5) / 128`` where arcface_torch feeds ``(x - 127.5) / 127.5``.

Every key of the state dict must be used and every Keras weight set; an unknown key, a
missing key or a wrong shape raises :class:`TorchCheckpointError` naming the key (and the
expected torch shape).

IR-SE key layout (arcface_torch has no IR-SE; this is the convention of ``tests/torch_twin.py``):
``layerN.K.se_module.fc1.weight`` ``[C/r, C, 1, 1]`` and ``.fc2.weight`` ``[C, C/r, 1, 1]``,
1x1 convolutions without bias (ReLU between, sigmoid after) applied after ``bn3``.
"""

from __future__ import annotations

import collections
import io
import math
import os
import re
import zipfile
from typing import Any

import numpy as np

from facerec_tf.errors import DataFormatError
from facerec_tf.onnx_import import STEM_RESCALE, torch_conv_kernel
from facerec_tf.safe_pickle import AllowListUnpickler, RefusedGlobal

__all__ = [
    "TorchCheckpointError",
    "keras_values",
    "load_arcface_torch_pth",
    "read_torch_checkpoint",
]


# Keys under which training checkpoints keep the backbone's state dict.
WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class TorchCheckpointError(DataFormatError):
    """A ``.pth`` file that is not a readable torch state dict of a supported backbone, or a
    pickle asking for a global outside the allow-list (names the file and key or global)."""


# ----------------------------------------------------------------------------------------------
# Restricted unpickling


class _BadContent(Exception):
    """Well-formed pickle, content that is not a state dict of tensors."""


class _StorageType:
    """Stand-in for ``torch.<X>Storage``: only a dtype tag (cannot be called)."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = dtype  # numpy dtype string, or "bfloat16"

    def __call__(self, *args, **kwargs):
        raise RefusedGlobal("torch", f"{self.name} called")

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in (
        ("FloatStorage", "f4"),
        ("DoubleStorage", "f8"),
        ("HalfStorage", "f2"),
        ("BFloat16Storage", "bfloat16"),
        ("LongStorage", "i8"),
        ("IntStorage", "i4"),
        ("ShortStorage", "i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
        ("UntypedStorage", "u1"),
    )
}


class _Storage:
    """One storage read from ``data/KEY``: a flat array of ``numel`` elements."""

    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key = key
        self.array = array


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _BadContent(f"{what} is a {type(v).__name__} ({v!r:.40})")
    return v


def _int_tuple(v: object, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple):
        raise _BadContent(f"{what} is a {type(v).__name__}, not a tuple")
    return tuple(_int(x, what) for x in v)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """Our ``torch._utils._rebuild_tensor_v2``: a strided view of ``storage``, copied."""
    del requires_grad, metadata
    if backward_hooks:
        raise _BadContent("a tensor with backward hooks")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
        raise _BadContent(f"a tensor built on a {type(storage).__name__}, not a storage")
    offset = _int(storage_offset, "storage offset")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise _BadContent(f"size {size}, stride {stride}, offset {offset}")
    flat = storage.array
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise _BadContent(
            f"a view (offset {offset}, size {size}, stride {stride}) reaching element {last} "
            f"of storage data/{storage.key}, which holds {flat.size}"
        )
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    del requires_grad, state
    if backward_hooks:
        raise _BadContent("a parameter with backward hooks")
    if not isinstance(data, np.ndarray):
        raise _BadContent(f"a parameter holding a {type(data).__name__}")
    return data


def _size(*args):
    return tuple(_int(a, "torch.Size element") for a in (args[0] if args else ()))


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    **{("torch", name): t for name, t in _STORAGE_TYPES.items()},
    **{("torch.storage", name): t for name, t in _STORAGE_TYPES.items()},
}


class _TorchUnpickler(AllowListUnpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; storages come from the zip archive."""

    allowed = _ALLOWED_GLOBALS

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._byteorder = ">" if byteorder == "big" else "<"
        self._storages: dict[str, _Storage] = {}

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _BadContent(f"persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise _BadContent(f"persistent id {pid!r:.80}")
        numel = _int(numel, "storage size")
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(name)
        except KeyError:
            raise _BadContent(f"the archive has no storage {name!r}") from None
        if stype.dtype == "bfloat16":
            dtype = np.dtype(self._byteorder + "u2")
        else:
            dtype = np.dtype(stype.dtype).newbyteorder(self._byteorder)
        if len(raw) < numel * dtype.itemsize:
            raise _BadContent(
                f"storage {name!r} has {len(raw)} bytes for {numel} elements of {stype!r}"
            )
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        if stype.dtype == "bfloat16":  # exact: bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        self._storages[key] = storage = _Storage(key, array)
        return storage


# ----------------------------------------------------------------------------------------------
# Reading


def _open_archive(path: str) -> tuple[zipfile.ZipFile, str]:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise TorchCheckpointError(f"cannot read file: {e}", path=path) from e
    if not zipfile.is_zipfile(path):
        try:  # torch's legacy format starts with a pickled magic int (no global allowed)
            legacy = AllowListUnpickler(io.BytesIO(head)).load() == _LEGACY_MAGIC
        except Exception:
            legacy = False
        if legacy:
            raise TorchCheckpointError(
                "a legacy (non-zip) torch serialization, which this reader does not handle",
                path=path,
                expected="torch's zip format (torch.save default since torch 1.6); re-save with "
                "torch.save(torch.load(path), new_path)",
            )
        raise TorchCheckpointError(
            f"not a zip archive (starts with {head[:8]!r})",
            path=path,
            expected="a torch.save zip checkpoint (PREFIX/data.pkl + PREFIX/data/N)",
        )
    archive = zipfile.ZipFile(path)
    pkls = [
        n
        for n in archive.namelist()
        if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)
    ]
    if len(pkls) != 1:
        archive.close()
        raise TorchCheckpointError(
            f"the archive holds {len(pkls)} top-level data.pkl entries ({pkls[:4]})",
            path=path,
            expected="exactly one PREFIX/data.pkl",
        )
    return archive, pkls[0][: -len("data.pkl")]


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The state dict inside ``obj`` (a state dict or a training checkpoint holding one)."""
    if isinstance(obj, dict) and not all(isinstance(v, np.ndarray) for v in obj.values()):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        what = f"a {type(obj).__name__}" + (" (empty)" if isinstance(obj, dict) else "")
        raise TorchCheckpointError(
            f"the pickle holds {what}",
            path=path,
            expected=f"a state dict of tensors, or a dict holding one under {WRAPPER_KEYS}",
        )
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TorchCheckpointError(
                f"a key of type {type(key).__name__}", path=path, key=repr(key), expected="str"
            )
        if not isinstance(value, np.ndarray):
            hint = (
                ""
                if isinstance(obj, collections.OrderedDict)
                else f" (top-level keys {list(obj)[:6]})"
            )
            raise TorchCheckpointError(
                f"the value is a {type(value).__name__}, not a tensor{hint}",
                path=path,
                key=key,
                expected=f"a state dict of tensors, or a dict holding one under {WRAPPER_KEYS}",
            )
        state[key] = value
    if all(k.startswith("module.") for k in state):  # DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the state dict of a ``torch.save`` file as NumPy arrays, without torch.

    Args:
        path: a ``.pth`` / ``.pt`` written by ``torch.save`` (zip format): a state dict, or a
            training checkpoint holding one under ``state_dict_backbone`` (arcface_torch),
            ``state_dict``, ``model`` or ``backbone``. A ``module.`` prefix is removed.

    Returns:
        ``{key: array}`` in the file's order (float tensors in their own dtype, bfloat16 as
        float32, ``num_batches_tracked`` as int64).

    Raises:
        TorchCheckpointError: not a zip checkpoint, a refused global (a malicious or foreign
            pickle: nothing from it is called), a truncated storage, or no state dict inside.
    """
    path = os.fspath(path)
    archive, prefix = _open_archive(path)
    with archive:
        try:
            data = archive.read(prefix + "data.pkl")
            byteorder = "little"
            if prefix + "byteorder" in archive.namelist():
                byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
                if byteorder not in ("little", "big"):
                    raise _BadContent(f"byteorder {byteorder!r}")
            obj = _TorchUnpickler(data, archive, prefix, byteorder).load()
        except RefusedGlobal as e:
            raise TorchCheckpointError(
                f"refused to load the pickle: it asks for the global {e.module}.{e.name}, which a "
                "torch state dict never needs (a malicious or foreign pickle?)",
                path=path,
                expected="a state dict of tensors (OrderedDict, torch._utils._rebuild_*, "
                "torch.*Storage only)",
            ) from None
        except _BadContent as e:
            raise TorchCheckpointError(
                f"not a state dict of tensors: {e}", path=path, expected="a torch.save state dict"
            ) from None
        except Exception as e:  # truncated pickle, bad opcodes, zip CRC error...
            raise TorchCheckpointError(
                f"not a readable torch checkpoint ({type(e).__name__}: {e})", path=path
            ) from None
    return _unwrap(obj, path)


# ----------------------------------------------------------------------------------------------
# Architecture inference


def _count(state: dict, pattern: str) -> int:
    """Number of distinct integers ``K`` in keys matching ``pattern`` (with one ``(\\d+)``)."""
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        return -1
    return len(found)


def _shape(state: dict, key: str, path: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise TorchCheckpointError("missing", path=path, key=key, expected="this key")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise TorchCheckpointError(f"has shape {shape}", path=path, key=key, expected=f"{ndim}-D")
    return shape


def _infer(state: dict, path: str) -> tuple[str, dict]:
    """(registry name, create_backbone kwargs) for the architecture of ``state``."""
    from facerec_tf.models.iresnet import IRESNET_STAGES

    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        units = tuple(_count(state, rf"layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
        depth = next((d for d, u in IRESNET_STAGES.items() if tuple(u) == units), None)
        if depth is None:
            known = ", ".join(f"{d}: {u}" for d, u in IRESNET_STAGES.items())
            raise TorchCheckpointError(
                f"an IResNet with {units} units per stage (layer1..layer4)",
                path=path,
                expected=f"one of {known}",
            )
        out, flat = _shape(state, "fc.weight", path, 2)
        side = math.isqrt(flat // 512)
        if side * side * 512 != flat:
            raise TorchCheckpointError(
                f"has shape {(out, flat)}", path=path, key="fc.weight", expected="[E, 512*H*W]"
            )
        kwargs = {"depth": depth, "embedding_size": out, "input_shape": (16 * side, 16 * side, 3)}
        se_key = "layer1.0.se_module.fc1.weight"
        if se_key in state:
            reduced = _shape(state, se_key, path, 4)[0]
            if reduced < 1 or 64 % reduced:
                raise TorchCheckpointError(
                    f"has {reduced} channels", path=path, key=se_key, expected="64 / ratio"
                )
            kwargs.update(se=True, se_ratio=64 // reduced)
            return f"ir_se{depth}", kwargs
        return f"iresnet{depth}", kwargs
    if "layers.0.layers.0.weight" in state and "conv_sep.layers.0.weight" in state:
        c64 = _shape(state, "layers.0.layers.0.weight", path, 4)[0]
        if c64 % 64:
            raise TorchCheckpointError(
                f"has {c64} output channels",
                path=path,
                key="layers.0.layers.0.weight",
                expected="64 * scale",
            )
        first = (
            1
            if "layers.1.layers.0.weight" in state
            else _count(state, r"layers\.1\.layers\.(\d+)\.")
        )
        blocks = (first, *(_count(state, rf"layers\.{i}\.layers\.(\d+)\.") for i in (3, 5, 7)))
        if min(blocks) < 1:
            raise TorchCheckpointError(
                f"a MobileFaceNet with blocks {blocks} (layers.1/3/5/7)",
                path=path,
                expected="consecutive residual units, at least one per stage",
            )
        emb = _shape(state, "features.layers.2.weight", path, 2)[0]
        kwargs = {"embedding_size": emb, "stage_units": blocks, "width_scale": c64 // 64}
        return "mobilefacenet", kwargs
    raise TorchCheckpointError(
        f"no known backbone layout (first keys {list(state)[:4]})",
        path=path,
        expected="an arcface_torch iresnet (conv1, layer1.0..., fc, features) or mobilefacenet "
        "(layers.0..., conv_sep, features)",
    )


# ----------------------------------------------------------------------------------------------
# Weight mapping


class _Plan:
    """Collects (torch key -> Keras variable) assignments and checks them all."""

    def __init__(self, state: dict, model, path: str, stem_scale: float, assign: bool) -> None:
        self.state = state
        self.model = model
        self.path = path
        self.stem_scale = stem_scale
        self.assign = assign
        self.used: set[str] = set()
        self.assigned: set[int] = set()
        self.values: dict[str, np.ndarray] = {}  # Keras variable path -> value

    def layer(self, name: str, key: str):
        try:
            return self.model.get_layer(name)
        except ValueError:
            raise TorchCheckpointError(
                f"has no Keras layer {name!r} in model {self.model.name!r} to go to",
                path=self.path,
                key=key,
                expected="a backbone with the checkpoint's structure",
            ) from None

    def take(self, key: str, expected: tuple[int, ...]) -> np.ndarray:
        if key not in self.state:
            raise TorchCheckpointError(
                "missing from the state dict", path=self.path, key=key, expected=f"shape {expected}"
            )
        value = self.state[key]
        if tuple(value.shape) != tuple(expected):
            raise TorchCheckpointError(
                f"has shape {tuple(value.shape)}",
                path=self.path,
                key=key,
                expected=f"shape {expected}",
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise TorchCheckpointError(
                f"has dtype {value.dtype}", path=self.path, key=key, expected="a float tensor"
            )
        self.used.add(key)
        return value.astype(np.float32)

    def set(self, variable, value: np.ndarray) -> None:
        value = value.reshape(tuple(variable.shape))
        if self.assign:
            variable.assign(value)
        else:
            self.values[variable.path] = value
        self.assigned.add(id(variable))

    def conv(self, key: str, name: str, scale: float = 1.0) -> None:
        from facerec_tf.models.blocks import GroupedConv2D

        layer = self.layer(name, key + ".weight")
        kh, kw, a, b = (int(d) for d in layer.kernel.shape)
        cls = type(layer).__name__
        if isinstance(layer, GroupedConv2D):
            groups = layer.groups
            w = self.take(key + ".weight", (groups * b, a // groups, kh, kw))
        elif cls == "DepthwiseConv2D":
            groups = a
            w = self.take(key + ".weight", (a * b, 1, kh, kw))
        else:
            groups = 1
            w = self.take(key + ".weight", (b, a, kh, kw))
        self.set(layer.kernel, torch_conv_kernel(w, groups) * np.float32(scale))

    def bn(self, key: str, name: str) -> None:
        layer = self.layer(name, key + ".weight")
        c = int(layer.beta.shape[0])
        if layer.gamma is not None:
            self.set(layer.gamma, self.take(key + ".weight", (c,)))
        self.set(layer.beta, self.take(key + ".bias", (c,)))
        self.set(layer.moving_mean, self.take(key + ".running_mean", (c,)))
        var = self.take(key + ".running_var", (c,))
        if layer.epsilon != 1e-5:  # a user-supplied backbone with another epsilon
            var = var + np.float32(1e-5 - layer.epsilon)
        self.set(layer.moving_variance, var)
        self.used.add(key + ".num_batches_tracked")

    def prelu(self, key: str, name: str) -> None:
        layer = self.layer(name, key + ".weight")
        c = int(np.prod(layer.alpha.shape))
        self.set(layer.alpha, self.take(key + ".weight", (c,)))

    def dense(self, key: str, name: str, chw: tuple[int, int, int] | None = None) -> None:
        layer = self.layer(name, key + ".weight")
        n_in, n_out = (int(d) for d in layer.kernel.shape)
        w = self.take(key + ".weight", (n_out, n_in))
        if chw is not None:  # torch flattens (C, H, W), Keras (H, W, C)
            c, h, ww = chw
            w = w.reshape(n_out, c, h, ww).transpose(0, 2, 3, 1).reshape(n_out, n_in)
        self.set(layer.kernel, w.T)
        if layer.bias is not None:
            self.set(layer.bias, self.take(key + ".bias", (n_out,)))

    def finish(self) -> None:
        unknown = [k for k in self.state if k not in self.used]
        if unknown:
            raise TorchCheckpointError(
                f"is not used by {self.model.name!r} ({len(unknown)} unused keys)",
                path=self.path,
                key=unknown[0],
                expected="only the keys of an arcface_torch backbone of this architecture",
            )
        unset = [v.path for v in self.model.weights if id(v) not in self.assigned]
        if unset:
            raise TorchCheckpointError(
                f"the checkpoint sets no value for the Keras weight {unset[0]!r}",
                path=self.path,
                expected=f"a checkpoint of a backbone like {self.model.name!r}",
            )


def _map_iresnet(p: _Plan, units: tuple[int, ...], se: bool) -> None:
    p.conv("conv1", "stem_conv", scale=p.stem_scale)
    p.bn("bn1", "stem_bn")
    p.prelu("prelu", "stem_prelu")
    for s, n in enumerate(units, 1):
        for k in range(n):
            t, name = f"layer{s}.{k}", f"stage{s}_unit{k + 1}"
            p.bn(f"{t}.bn1", f"{name}_bn1")
            p.conv(f"{t}.conv1", f"{name}_conv1")
            p.bn(f"{t}.bn2", f"{name}_bn2")
            p.prelu(f"{t}.prelu", f"{name}_prelu")
            p.conv(f"{t}.conv2", f"{name}_conv2")
            p.bn(f"{t}.bn3", f"{name}_bn3")
            if se:
                p.conv(f"{t}.se_module.fc1", f"{name}_se_reduce")
                p.conv(f"{t}.se_module.fc2", f"{name}_se_expand")
            if k == 0:
                p.conv(f"{t}.downsample.0", f"{name}_shortcut_conv")
                p.bn(f"{t}.downsample.1", f"{name}_shortcut_bn")
    p.bn("bn2", "head_bn")
    h, w, c = (int(d) for d in p.layer("head_flatten", "fc.weight").input.shape[1:])
    p.dense("fc", "head_fc", chw=(c, h, w))
    p.bn("features", "features")


def _map_mobilefacenet(p: _Plan, blocks: tuple[int, ...]) -> None:
    def block(t: str, name: str, linear: bool = False, scale: float = 1.0) -> None:
        p.conv(f"{t}.layers.0", f"{name}_conv", scale=scale)
        p.bn(f"{t}.layers.1", f"{name}_bn")
        if not linear:
            p.prelu(f"{t}.layers.2", f"{name}_prelu")

    def unit(t: str, name: str) -> None:
        block(f"{t}.layers.0", f"{name}_expand")
        block(f"{t}.layers.1", f"{name}_dw")
        block(f"{t}.layers.2", f"{name}_project", linear=True)

    block("layers.0", "stem", scale=p.stem_scale)
    if blocks[0] == 1:
        block("layers.1", "stem_dw")
    else:
        for k in range(blocks[0]):
            unit(f"layers.1.layers.{k}", f"stage1_unit{k + 1}")
    for i, stage in ((2, 2), (4, 3), (6, 4)):
        unit(f"layers.{i}", f"down{stage}")
        for k in range(blocks[stage - 1]):
            unit(f"layers.{i + 1}.layers.{k}", f"stage{stage}_unit{k + 1}")
    block("conv_sep", "conv_sep")
    block("features.layers.0", "gdc", linear=True)
    p.dense("features.layers.2", "gdc_fc")
    p.bn("features.layers.3", "features")


def load_arcface_torch_pth(path: str | os.PathLike, backbone=None, *, stem_scale=None):
    """Build (or fill) a backbone with the weights of an arcface_torch ``.pth``.

    Args:
        path: ``torch.save(backbone.state_dict())`` of an arcface_torch ``iresnet*`` or
            ``mbf`` / ``get_mbf(...)`` (or a training checkpoint holding it, see
            :func:`read_torch_checkpoint`); IR-SE in the key layout of the module docstring.
        backbone: an existing backbone of the same architecture to load into; by default one
            is built with :func:`facerec_tf.models.create_backbone` (``include_preprocessing=True``:
            RGB pixels in [0, 255], NHWC).

    Returns:
        the backbone: ``backbone(x)`` (and ``backbone(x, training=True)``) on pixels equals
        the torch network on ``(x - 127.5) / 127.5`` (NCHW) in eval (train) mode up to float
        rounding. A backbone without preprocessing takes ``(x - 127.5) / 128`` (NHWC), like
        every backbone built that way here, so the stem carries ``128 / 127.5`` in both cases;
        ``stem_scale=1.0`` copies it unscaled instead (that backbone then takes torch's
        ``(x - 127.5) / 127.5`` itself: the parametrisation of a torch-exact SGD comparison).

    Raises:
        TorchCheckpointError: unreadable or refused file, unknown architecture, or a key that
            is unknown, missing or of the wrong shape (named).
    """
    path = os.fspath(path)
    state = read_torch_checkpoint(path)
    name, kwargs = _infer(state, path)
    if backbone is None:
        from facerec_tf.models import IResNetBackbone, create_backbone, list_backbones

        if name in list_backbones():
            backbone = create_backbone(name, include_preprocessing=True, **kwargs)
        else:  # an IR-SE depth without a registry row (ir_se10, ir_se18...)
            backbone = IResNetBackbone(name=name, include_preprocessing=True, **kwargs)
    _run_plan(state, backbone, path, stem_scale, assign=True, architecture=(name, kwargs))
    return backbone


def _run_plan(
    state, backbone, path, stem_scale, assign, architecture=None
) -> dict[str, np.ndarray]:
    """Maps ``state`` onto ``backbone``; ``architecture`` is ``_infer``'s answer if known."""
    from facerec_tf.models.iresnet import IRESNET_STAGES

    name, kwargs = architecture or _infer(state, path)
    if stem_scale is None:  # with or without the preprocess layer: (x - 127.5) / 128 in
        stem_scale = STEM_RESCALE
    plan = _Plan(state, backbone, path, stem_scale, assign)
    if name.startswith(("iresnet", "ir_se")):
        _map_iresnet(plan, tuple(IRESNET_STAGES[kwargs["depth"]]), se=bool(kwargs.get("se")))
    else:
        _map_mobilefacenet(plan, kwargs["stage_units"])
    plan.finish()
    return plan.values


def keras_values(
    state: dict[str, np.ndarray], backbone, stem_scale: float | None = None
) -> dict[str, np.ndarray]:
    """The values :func:`load_arcface_torch_pth` would give ``backbone``'s variables, by
    Keras variable path, without assigning them (same checks and errors).

    Also maps anything laid out like a state dict, e.g. torch's gradients (fill the keys that
    have none with zeros). ``stem_scale`` overrides the stem factor (``128 / 127.5`` by
    default); a gradient scales by its inverse.
    """
    return _run_plan(state, backbone, "<state dict>", stem_scale, assign=False)
