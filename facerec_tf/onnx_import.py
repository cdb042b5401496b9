"""Import insightface (arcface_torch) ONNX backbones into our Keras backbones.

Handled: every arcface_torch backbone that its ``torch2onnx.py`` writes and insightface's model
packs ship (``buffalo_*``' ``w600k_mbf.onnx``, the model zoo's ``*_r50/r100.onnx``):

* **IResNet** of any depth in :data:`~facerec_tf.models.iresnet.IRESNET_STAGES` (units per
  stage counted in the graph), embedding size from the fc -> :class:`IResNetBackbone`;
* **IR-SE**: the same with a squeeze-excitation block after each unit's ``bn3``
  (``GlobalAveragePool``, 1x1 conv without bias, ``Relu``, 1x1 conv without bias, ``Sigmoid``,
  ``Mul``), ratio read from the first 1x1 conv -> ``IResNetBackbone(se=True, se_ratio=r)``;
* **MobileFaceNet** (arcface_torch ``get_mbf(fp16, num_features, blocks, scale)``, so ``mbf``,
  ``mbf_large`` and the packs' ``w600k_mbf``): stem conv3x3/2; a conv3x3 in 64 groups when
  ``blocks[0] == 1``, else a first residual stage; the strided ``DepthWise`` units and their
  residual stages; ``conv_sep``; the GDC head (7x7 depthwise linear conv, flatten, linear
  without bias, BatchNorm1d). ``scale`` is the stem width / 64, ``blocks`` the residual units
  counted between the strided units, the embedding size the linear layer's width ->
  :class:`MobileFaceNetBackbone`.

The architecture is read from the graph alone: the stem convolution's stride tells IResNet
(1) from MobileFaceNet (2), then the graph is walked along the data flow from the input, each
node matched to the next Keras layer. A graph that cannot be mapped raises
:class:`OnnxImportError` naming the ONNX node; every node must be used.

Exporter variations accepted: BatchNorms folded into the convolutions (torch's eval-mode
export: conv with bias) or kept as ``BatchNormalization`` nodes; ``Flatten`` or ``Reshape``
(with a constant shape or one computed by ``Shape``/``Gather``/``Unsqueeze``/``Concat`` nodes,
as PyTorch writes ``x.view(x.size(0), -1)``); ``Gemm`` or ``MatMul`` (+ ``Add``); the features
BatchNorm folded into the fc; PReLU slopes ``[C, 1, 1]`` or ``[C]``; ``Identity`` / ``Dropout``
nodes; constants given as ``Constant`` nodes or computed from initialisers (``Unsqueeze``,
``Transpose``... of a weight, as an export without constant folding writes); any input name
(``data``, ``input.1``) and a dynamic or fixed batch.

**Input conventions.** arcface_torch exports expect the normalisation outside the graph: the
file is fed ``(rgb - 127.5) / 127.5``, NCHW. A graph may instead normalise its own input with
leading ``Sub``/``Mul``/``Div``/``Add`` nodes holding constants (scalar or per channel); the
file is then fed pixels and those nodes are folded into the stem convolution. What the
imported backbone takes:

* built with ``include_preprocessing=True`` (the default, and what
  :func:`load_insightface_onnx` builds): RGB pixels in [0, 255], NHWC, like every backbone
  here; its ``preprocess`` layer gives ``(x - 127.5) / 128``, so the stem kernel is multiplied
  per input channel by the factor that turns that into what the ONNX stem sees (``128 /
  127.5`` for an arcface_torch file). This is exact, borders included, when the normalisation
  maps pixel 127.5 to 0 (true for ``(x - 127.5) / 127.5``, ``(x - 127.5) / 128``,
  ``x / 127.5 - 1`` ...): the convolutions' zero padding is then the same value in both
  conventions. Another centre is refused, naming the normalisation node;
* built with ``include_preprocessing=False``: ``(x - 127.5) / 128``, NHWC, the input every
  facerec_tf backbone without its ``preprocess`` layer takes (and what the training pipeline,
  the trainer and the SavedModel export feed it); the stem kernel carries the same factor as
  above. It is *not* what an arcface_torch file is fed (``(rgb - 127.5) / 127.5``): feed such
  a backbone ``(x - 127.5) / 128``.

How weights map (exact linear algebra): a convolution with a folded BN becomes our kernel
(``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``; depthwise ``[C, 1, kh, kw]`` -> ``[kh, kw, C, 1]``;
grouped -> the :class:`~facerec_tf.models.blocks.GroupedConv2D` layout) plus the following
Keras BatchNormalization set to "identity plus bias" (``gamma = 1``, ``beta = bias``,
``moving_mean = 0``, ``moving_variance = 1 - eps``); an unfolded conv + BN maps onto conv + BN
(a conv bias moves into ``moving_mean``); the fc weight is permuted from torch's flatten order
(C, H, W) to Keras' (H, W, C); a BN epsilon other than ours is absorbed into
``moving_variance``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facerec_tf._optional import require
from facerec_tf.errors import DataFormatError

__all__ = [
    "InputNormalization",
    "OnnxImportError",
    "ParsedIResNet",
    "ParsedMobileFaceNet",
    "load_insightface_onnx",
    "parse_insightface_onnx",
]

# arcface_torch feeds the stem (x - 127.5) / 127.5; our preprocess layer gives (x - 127.5) / 128.
PIXEL_CENTRE = 127.5
PREPROCESS_SCALE = 128.0
INSIGHTFACE_STD = 127.5
STEM_RESCALE = PREPROCESS_SCALE / INSIGHTFACE_STD
STAGE_WIDTHS = (64, 128, 256, 512)
# arcface_torch MobileFaceNet after the stem: (Keras prefix, output width / scale, expansion,
# stride) of the units of each stage; "stage" rows hold the residual units.
MBF_LAYOUT = (
    ("stage1", 64, 128, 1),
    ("down2", 64, 128, 2),
    ("stage2", 64, 128, 1),
    ("down3", 128, 256, 2),
    ("stage3", 128, 256, 1),
    ("down4", 128, 512, 2),
    ("stage4", 128, 256, 1),
)
MBF_STEM_GROUPS = 64
MBF_SEP_WIDTH = 512


class OnnxImportError(DataFormatError):
    """The ONNX file is not a backbone this importer maps (names the node where it failed).

    Attributes:
        node: ``"'name' (OpType)"`` of the offending node, or ``None``.
    """

    def __init__(self, detail: str, *, path=None, node: str | None = None, expected=None):
        self.node = node
        super().__init__(
            f"node {node}: {detail}" if node is not None else detail,
            path=path,
            expected=expected,
        )


# ----------------------------------------------------------------------------------------------
# Parsed structure


@dataclass
class BatchNormParams:
    """One ONNX ``BatchNormalization`` node."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    node: str


@dataclass
class ConvParams:
    """One ONNX ``Conv`` (torch layout), the BatchNormalization after it if not folded, and
    the PReLU after that, if any."""

    weight: np.ndarray  # [O, I / group, kh, kw]
    bias: np.ndarray | None
    stride: int
    pad: int
    group: int
    node: str
    bn: BatchNormParams | None = None
    prelu: np.ndarray | None = None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])


@dataclass
class SEParams:
    """A squeeze-excitation block: 1x1 reduce and expand kernels (torch layout, no bias)."""

    reduce: np.ndarray  # [C / r, C, 1, 1]
    expand: np.ndarray  # [C, C / r, 1, 1]
    node: str  # the Mul

    @property
    def ratio(self) -> int:
        return int(self.expand.shape[0]) // int(self.reduce.shape[0])


@dataclass
class UnitParams:
    """One ``IBasicBlock`` (optionally with squeeze-excitation)."""

    bn1: BatchNormParams
    conv1: ConvParams
    prelu: np.ndarray
    conv2: ConvParams
    shortcut: ConvParams | None
    node: str  # the Add
    se: SEParams | None = None

    @property
    def stride(self) -> int:
        return self.conv2.stride


@dataclass
class FcParams:
    """The embedding layer: fc (weight ``[in, out]``, rows in torch's C, H, W order) and the
    features BatchNorm1d (``None`` when a simplifier folded it into the fc)."""

    weight: np.ndarray
    bias: np.ndarray | None
    node: str
    features: BatchNormParams | None = None

    @property
    def embedding_size(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class InputNormalization:
    """Normalisation nodes at the graph input: the stem sees ``scale * x + shift`` per
    channel, ``x`` being what the file is fed."""

    scale: np.ndarray  # [3]
    shift: np.ndarray  # [3]
    nodes: list[str]


@dataclass
class ParsedIResNet:
    """An arcface_torch IResNet / IR-SE read from ONNX: weights in torch layout."""

    input_size: tuple[int, int]
    stem: ConvParams
    stem_prelu: np.ndarray
    stages: list[list[UnitParams]] = field(default_factory=list)
    head_bn: BatchNormParams | None = None
    fc: FcParams | None = None
    normalization: InputNormalization | None = None

    family = "iresnet"

    @property
    def units_per_stage(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.stages)

    @property
    def embedding_size(self) -> int:
        return self.fc.embedding_size

    @property
    def se_ratio(self) -> int:
        """The squeeze-excitation ratio, 0 for a plain IResNet."""
        first = self.stages[0][0].se if self.stages and self.stages[0] else None
        return first.ratio if first is not None else 0

    @property
    def depth(self) -> int | None:
        from facerec_tf.models.iresnet import IRESNET_STAGES

        for depth, units in IRESNET_STAGES.items():
            if tuple(units) == self.units_per_stage:
                return depth
        return None


@dataclass
class MbfUnitParams:
    """One arcface_torch ``DepthWise`` unit: 1x1 expand + PReLU, 3x3 depthwise + PReLU,
    1x1 linear projection, plus the input when ``residual``."""

    expand: ConvParams
    dw: ConvParams
    project: ConvParams
    residual: bool
    node: str  # the Add, or the projection conv

    @property
    def stride(self) -> int:
        return self.dw.stride

    @property
    def expansion(self) -> int:
        return self.expand.out_channels


@dataclass
class ParsedMobileFaceNet:
    """An arcface_torch MobileFaceNet read from ONNX: weights in torch layout."""

    input_size: tuple[int, int]
    stem: ConvParams
    stem_dw: ConvParams | None
    units: list[MbfUnitParams]
    conv_sep: ConvParams
    gdc: ConvParams
    fc: FcParams
    normalization: InputNormalization | None = None
    stages: list[list[MbfUnitParams]] = field(default_factory=list)  # [stage1, down2, ...]

    family = "mobilefacenet"

    @property
    def width_scale(self) -> int:
        return self.stem.out_channels // 64

    @property
    def stage_units(self) -> tuple[int, ...]:
        """arcface_torch's ``blocks``: residual units of the four stages (1 = the grouped
        conv of the ``blocks[0] == 1`` layout)."""
        units = [len(s) for s in self.stages[2::2]]
        first = 1 if self.stem_dw is not None else len(self.stages[0])
        return (first, *units)

    @property
    def embedding_size(self) -> int:
        return self.fc.embedding_size


# ----------------------------------------------------------------------------------------------
# Graph access


def _describe(node) -> str:
    name = node.name or (f"producing {node.output[0]!r}" if node.output else "<unnamed>")
    return f"{name!r} ({node.op_type})"


def _fold(op: str, attrs: dict, args: list[np.ndarray]) -> np.ndarray | None:
    """NumPy value of a node whose inputs are all constants, or None if not foldable."""
    if op == "Unsqueeze":
        axes = attrs.get("axes", args[1] if len(args) > 1 else None)
        out = args[0]
        rank = out.ndim + len(axes)
        for axis in sorted(int(a) % rank for a in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Squeeze":
        axes = attrs.get("axes", args[1] if len(args) > 1 else None)
        if axes is None:
            return np.squeeze(args[0])
        return np.squeeze(args[0], axis=tuple(int(a) for a in axes))
    if op == "Transpose":
        return np.transpose(args[0], attrs.get("perm"))
    if op == "Reshape":
        shape = [int(d) for d in args[1]]
        shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return np.reshape(args[0], shape)
    if op == "Concat":
        return np.concatenate(args, axis=int(attrs.get("axis", 0)))
    if op == "Gather":
        return np.take(args[0], args[1], axis=int(attrs.get("axis", 0)))
    if op == "Cast":
        from onnx import helper

        return args[0].astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    if op == "Shape":
        return np.asarray(args[0].shape, np.int64)
    if op in ("Mul", "Add", "Sub", "Div") and len(args) == 2:
        fn = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
        return fn(args[0], args[1])
    return None


class _Graph:
    """Constants, producers and consumers of an ONNX graph; Identity/Dropout skipped and
    constant subexpressions folded."""

    def __init__(self, model, path: str):
        from onnx import helper, numpy_helper

        self.path = path
        self._helper = helper
        g = model.graph
        self.consts: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in g.initializer
        }
        self.alias: dict[str, str] = {}
        self.nodes = []
        self.producer: dict[str, Any] = {}
        for node in g.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                if "value" not in attrs:
                    raise OnnxImportError(
                        "Constant without a tensor 'value'", path=path, node=_describe(node)
                    )
                self.consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
                continue
            if node.op_type in ("Identity", "Dropout"):
                self.alias[node.output[0]] = node.input[0]
                continue
            inputs = [self.resolve(n) for n in node.input if n]
            if inputs and all(n in self.consts for n in inputs) and len(node.output) == 1:
                try:
                    value = _fold(node.op_type, attrs, [self.consts[n] for n in inputs])
                except Exception:
                    value = None
                if value is not None:
                    self.consts[node.output[0]] = np.asarray(value)
                    continue
            self.nodes.append(node)
            for out in node.output:
                self.producer[out] = node
        self.consumers_of: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers_of.setdefault(self.resolve(name), []).append(node)
        self.inputs = [v for v in g.input if v.name not in self.consts]
        self.outputs = [self.resolve(v.name) for v in g.output]
        self.visited: set[int] = set()

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def error(self, detail: str, node=None, expected: str | None = None) -> OnnxImportError:
        return OnnxImportError(
            detail,
            path=self.path,
            node=_describe(node) if node is not None else None,
            expected=expected,
        )

    def consumers(self, tensor: str) -> list:
        return list(self.consumers_of.get(self.resolve(tensor), []))

    def visit(self, node) -> None:
        self.visited.add(id(node))

    def next_node(self, tensor: str, ops: tuple[str, ...], producer, what: str):
        """The single consumer of ``tensor``, which must be one of ``ops``."""
        cons = self.consumers(tensor)
        if len(cons) != 1 or cons[0].op_type not in ops:
            found = ", ".join(_describe(n) for n in cons) or "nothing"
            raise self.error(
                f"its output feeds {found}",
                producer,
                expected=f"{what}: a single {' or '.join(ops)} node",
            )
        return cons[0]

    def attr(self, node, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return self._helper.get_attribute_value(a)
        return default

    def is_const(self, name: str) -> bool:
        return bool(name) and self.resolve(name) in self.consts

    def const(self, node, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            raise self.error(f"has no input {index}", node, expected=what)
        name = self.resolve(node.input[index])
        if name not in self.consts:
            raise self.error(f"input {index} ({name!r}) is not a constant", node, expected=what)
        return np.asarray(self.consts[name], dtype=np.float32)

    def shape_value(self, name: str, data: str, data_shape: list[int], user) -> np.ndarray:
        """Evaluate a shape computation (``Shape`` of ``data`` and integer ops on it) with
        ``data`` of shape ``data_shape``; marks its nodes as used."""
        name = self.resolve(name)
        if name in self.consts:
            return np.asarray(self.consts[name])
        node = self.producer.get(name)
        if node is None:
            raise self.error(f"its input {name!r} is not computed from constants", user)
        if node.op_type == "Shape":
            if self.resolve(node.input[0]) != data:
                raise self.error("takes the shape of another tensor", node, expected="Shape(x)")
            self.visit(node)
            return np.asarray(data_shape, np.int64)
        args = [self.shape_value(n, data, data_shape, node) for n in node.input if n]
        attrs = {a.name: self._helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Slice":  # of a 1-D shape: opset 10+ inputs, or attributes
            bounds = args[1:3] if len(args) >= 3 else (attrs["starts"], attrs["ends"])
            start, end = (int(np.reshape(b, -1)[0]) for b in bounds)
            value = args[0][start:end]
        else:
            value = _fold(node.op_type, attrs, args)
        if value is None:
            raise self.error(
                "is not a shape computation", node, expected="Shape, Gather, Unsqueeze, Concat"
            )
        self.visit(node)
        return np.asarray(value)


# ----------------------------------------------------------------------------------------------
# Pattern matching


def _batch_norm(g: _Graph, node) -> BatchNormParams:
    g.visit(node)
    if g.attr(node, "training_mode", 0):
        raise g.error("is in training mode", node, expected="an eval-mode export")
    if len(node.output) > 1 and any(node.output[1:]):
        raise g.error("outputs running statistics", node, expected="an eval-mode export")
    scale, bias, mean, var = (g.const(node, i, "BatchNorm parameters") for i in (1, 2, 3, 4))
    if not scale.shape == bias.shape == mean.shape == var.shape or scale.ndim != 1:
        raise g.error(
            f"parameter shapes {scale.shape}, {bias.shape}, {mean.shape}, {var.shape}",
            node,
            expected="four [C] vectors",
        )
    return BatchNormParams(
        scale, bias, mean, var, float(g.attr(node, "epsilon", 1e-5)), _describe(node)
    )


def _conv(
    g: _Graph,
    node,
    *,
    kernel: int | None,
    stride: int | None,
    what: str,
    groups: str = "plain",
    pad: int | None = None,
    prelu: bool | None = None,
):
    """Match a ``Conv`` (+ an unfolded ``BatchNormalization``) (+ ``PRelu``).

    ``groups``: ``"plain"`` (group 1), ``"depthwise"`` (group = channels) or ``"any"``.
    ``prelu``: True requires one, False forbids one, None takes one if present.
    Returns ``(params, output tensor)``.
    """
    g.visit(node)
    weight = g.const(node, 1, f"{what} weight")
    bias = g.const(node, 2, f"{what} bias") if len(node.input) > 2 and node.input[2] else None
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise g.error(f"weight of shape {weight.shape}", node, expected=f"{what}: a square kernel")
    k = int(weight.shape[2])
    if kernel is not None and k != kernel:
        raise g.error(
            f"weight of shape {weight.shape}", node, expected=f"{what}: a {kernel}x{kernel} kernel"
        )
    group = int(g.attr(node, "group", 1))
    if any(int(d) != 1 for d in g.attr(node, "dilations", [1, 1])):
        raise g.error("is dilated", node, expected=f"{what}: no dilation")
    channels = int(weight.shape[1]) * group
    if groups == "plain" and group != 1:
        raise g.error(f"has group={group}", node, expected=f"{what}: a plain convolution")
    if groups == "depthwise" and not (group == channels == weight.shape[0]):
        raise g.error(
            f"has group={group} for {channels} -> {weight.shape[0]} channels",
            node,
            expected=f"{what}: a depthwise convolution (group = channels)",
        )
    auto_pad = g.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = [int(p) for p in g.attr(node, "pads", [0, 0, 0, 0])]
    strides = [int(s) for s in g.attr(node, "strides", [1, 1])]
    pad = k // 2 if pad is None else pad
    if auto_pad != "NOTSET" or pads != [pad] * 4:
        raise g.error(
            f"pads {pads} (auto_pad {auto_pad})",
            node,
            expected=f"{what}: symmetric padding {pad} (pads={[pad] * 4})",
        )
    if len(set(strides)) != 1 or (stride is not None and strides[0] != stride):
        raise g.error(
            f"strides {strides}", node, expected=f"{what}: stride {stride if stride else '1 or 2'}"
        )
    params = ConvParams(weight, bias, strides[0], pad, group, _describe(node))
    out = node.output[0]
    cons = g.consumers(out)
    last = node
    if len(cons) == 1 and cons[0].op_type == "BatchNormalization":
        params.bn = _batch_norm(g, cons[0])
        last = cons[0]
        out = cons[0].output[0]
        cons = g.consumers(out)
    if prelu is not False and len(cons) == 1 and cons[0].op_type == "PRelu":
        params.prelu = _prelu(g, cons[0], params.out_channels)
        out = cons[0].output[0]
    elif prelu:
        found = ", ".join(_describe(n) for n in cons) or "nothing"
        raise g.error(
            f"its output feeds {found}", last, expected=f"{what}: followed by a single PRelu"
        )
    return params, g.resolve(out)


def _prelu(g: _Graph, node, channels: int) -> np.ndarray:
    g.visit(node)
    slope = g.const(node, 1, "PReLU slopes")
    if slope.size == 1:
        return np.full(channels, slope.reshape(-1)[0], np.float32)
    if slope.size != channels or slope.shape not in ((channels,), (channels, 1, 1)):
        raise g.error(
            f"slopes of shape {slope.shape} for {channels} channels",
            node,
            expected="[C, 1, 1] or [C] slopes",
        )
    return slope.reshape(-1)


def _input_normalization(g: _Graph, x: str) -> tuple[InputNormalization | None, str]:
    """Leading ``Sub``/``Mul``/``Div``/``Add`` nodes with constant operands on the input."""
    scale, shift, nodes = np.ones(3), np.zeros(3), []
    while True:
        cons = g.consumers(x)
        if len(cons) != 1 or cons[0].op_type not in ("Sub", "Mul", "Div", "Add"):
            break
        node = cons[0]
        data = [i for i, n in enumerate(node.input) if g.resolve(n) == x]
        if len(node.input) != 2 or len(data) != 1 or not g.is_const(node.input[1 - data[0]]):
            raise g.error(
                "does not combine the input with one constant",
                node,
                expected="input normalisation nodes x - c, x * c, x / c or x + c",
            )
        if data[0] == 1 and node.op_type in ("Sub", "Div"):
            raise g.error(
                "has the input as its second operand",
                node,
                expected="input normalisation nodes x - c, x * c, x / c or x + c",
            )
        c = np.asarray(g.consts[g.resolve(node.input[1 - data[0]])], np.float64)
        if c.size == 1:
            c = np.full(3, c.reshape(-1)[0])
        elif c.size == 3 and c.ndim >= 3 and c.shape[-3:] == (3, 1, 1):
            c = c.reshape(3)
        else:
            raise g.error(
                f"has a constant of shape {c.shape}",
                node,
                expected="a scalar or per-channel [1, 3, 1, 1] constant",
            )
        if node.op_type == "Sub":
            shift = shift - c
        elif node.op_type == "Add":
            shift = shift + c
        elif node.op_type == "Mul":
            scale, shift = scale * c, shift * c
        else:
            scale, shift = scale / c, shift / c
        g.visit(node)
        nodes.append(_describe(node))
        x = g.resolve(node.output[0])
    if not nodes:
        return None, x
    return InputNormalization(scale, shift, nodes), x


def _squeeze_excite(g: _Graph, y: str, pool) -> tuple[SEParams, str]:
    """``pool`` (GlobalAveragePool or ReduceMean over H, W) ... ``Mul(y, sigmoid)``."""
    g.visit(pool)
    if pool.op_type == "ReduceMean":
        axes = g.attr(pool, "axes", None)
        if axes is None and len(pool.input) > 1:
            axes = g.const(pool, 1, "the reduced axes").astype(np.int64).tolist()
        if sorted(int(a) % 4 for a in axes or ()) != [2, 3] or not g.attr(pool, "keepdims", 1):
            raise g.error(f"reduces axes {axes}", pool, expected="a mean over H, W, keepdims")
    convs = []
    x, act_node = pool.output[0], pool
    for act in ("Relu", "Sigmoid"):
        node = g.next_node(x, ("Conv",), act_node, "the SE 1x1 conv")
        conv, x = _conv(g, node, kernel=1, stride=1, what="the SE 1x1 conv", prelu=False)
        if conv.bn is not None or (conv.bias is not None and np.any(conv.bias != 0)):
            raise g.error(
                "has a bias or BatchNorm", node, expected="a squeeze-excitation conv without bias"
            )
        convs.append(conv)
        act_node = g.next_node(x, (act,), node, f"the SE {act}")
        g.visit(act_node)
        x = g.resolve(act_node.output[0])
    mul = g.next_node(x, ("Mul",), act_node, "the SE rescaling Mul")
    g.visit(mul)
    if sorted(g.resolve(n) for n in mul.input) != sorted([y, x]):
        raise g.error("does not rescale the unit's output", mul, expected="Mul(bn3, sigmoid)")
    reduce, expand = convs[0].weight, convs[1].weight
    c = int(reduce.shape[1])
    if expand.shape[0] != c or reduce.shape[0] != expand.shape[1] or c % reduce.shape[0]:
        raise g.error(
            f"SE kernels of shapes {reduce.shape} and {expand.shape}",
            mul,
            expected="C -> C/r -> C",
        )
    return SEParams(reduce, expand, _describe(mul)), g.resolve(mul.output[0])


def _unit(g: _Graph, x: str, bn1_node) -> tuple[UnitParams, str]:
    bn1 = _batch_norm(g, bn1_node)
    conv1_node = g.next_node(bn1_node.output[0], ("Conv",), bn1_node, "the unit's conv1")
    conv1, y = _conv(
        g, conv1_node, kernel=3, stride=1, what="the unit's conv1 (3x3, stride 1)", prelu=True
    )
    conv2_node = g.next_node(y, ("Conv",), conv1_node, "the unit's conv2")
    conv2, y = _conv(g, conv2_node, kernel=3, stride=None, what="the unit's conv2", prelu=False)
    se = None
    cons = g.consumers(y)
    pools = [n for n in cons if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    if len(cons) == 2 and len(pools) == 1:
        se, y = _squeeze_excite(g, y, pools[0])
    add = g.next_node(y, ("Add",), conv2_node, "the residual Add")
    g.visit(add)
    if len(add.input) != 2:
        raise g.error(f"has {len(add.input)} inputs", add, expected="2 inputs")
    other = g.resolve(add.input[1] if g.resolve(add.input[0]) == y else add.input[0])
    shortcut = None
    if other != x:
        producers = [n for n in g.consumers(x) if n.op_type == "Conv" and id(n) not in g.visited]
        if len(producers) != 1:
            raise g.error(
                "its shortcut input is neither the unit input nor a Conv of it",
                add,
                expected="an identity or 1x1 Conv(+BN) shortcut",
            )
        shortcut, sc_out = _conv(
            g,
            producers[0],
            kernel=1,
            stride=conv2.stride,
            what=f"the shortcut (1x1, stride {conv2.stride})",
            prelu=False,
        )
        if sc_out != other:
            raise g.error(
                "is not the shortcut of this unit", producers[0], expected="Conv(+BN) -> Add"
            )
    for node in g.consumers(x):
        if id(node) not in g.visited:
            raise g.error(
                "reads a unit input", node, expected="only the unit's BN, shortcut and Add"
            )
    unit = UnitParams(bn1, conv1, conv1.prelu, conv2, shortcut, _describe(add), se)
    return unit, g.resolve(add.output[0])


def _flatten_node(g: _Graph, x: str):
    """The ``Flatten`` / ``Reshape`` reading ``x`` (``Shape`` nodes of ``x`` aside), or None."""
    cons = [n for n in g.consumers(x) if n.op_type != "Shape"]
    if len(cons) == 1 and cons[0].op_type in ("Flatten", "Reshape"):
        return cons[0]
    return None


def _flatten_and_fc(g: _Graph, flat_node, x: str, channels: int) -> FcParams:
    """``Flatten``/``Reshape`` of ``x`` (NCHW, ``channels``), then ``Gemm``/``MatMul`` (+
    ``Add``), then the features ``BatchNormalization`` (or not), which must be the output."""
    g.visit(flat_node)
    if flat_node.op_type == "Flatten" and int(g.attr(flat_node, "axis", 1)) != 1:
        raise g.error("flattens at another axis", flat_node, expected="axis=1")
    fc_node = g.next_node(flat_node.output[0], ("Gemm", "MatMul"), flat_node, "the fc layer")
    g.visit(fc_node)
    if fc_node.op_type == "Gemm":
        if g.attr(fc_node, "transA", 0):
            raise g.error("has transA=1", fc_node, expected="transA=0")
        w = g.const(fc_node, 1, "the fc weight")
        w = w.T if g.attr(fc_node, "transB", 0) else w
        w = w * float(g.attr(fc_node, "alpha", 1.0))
        b = None
        if len(fc_node.input) > 2 and fc_node.input[2]:
            b = g.const(fc_node, 2, "the fc bias").reshape(-1) * float(g.attr(fc_node, "beta", 1.0))
        out = g.resolve(fc_node.output[0])
    else:
        w, b = g.const(fc_node, 1, "the fc weight"), None
        out = g.resolve(fc_node.output[0])
        cons = g.consumers(out)
        if len(cons) == 1 and cons[0].op_type == "Add":
            add = cons[0]
            g.visit(add)
            idx = 1 if g.resolve(add.input[0]) == out else 0
            b = g.const(add, idx, "the fc bias").reshape(-1)
            out = g.resolve(add.output[0])
    if w.ndim != 2 or w.shape[0] % channels:
        raise g.error(f"weight of shape {w.shape}", fc_node, expected=f"[{channels}*H*W, D]")
    if b is not None and b.shape != (w.shape[1],):
        raise g.error(f"bias of shape {b.shape}", fc_node, expected=f"[{w.shape[1]}]")
    if flat_node.op_type == "Reshape":  # evaluated for one image: must give [1, C*H*W]
        features = int(w.shape[0])
        side = math.isqrt(features // channels)
        target = g.shape_value(flat_node.input[1], x, [1, channels, side, side], flat_node)
        shape = [1 if (i == 0 and d == 0) else int(d) for i, d in enumerate(target.reshape(-1))]
        if len(shape) == 2 and shape.count(-1) == 1:
            known = -int(np.prod(shape))
            shape = [features // known if d == -1 else d for d in shape]
        if shape != [1, features]:
            raise g.error(
                f"reshapes a [1, {channels}, H, W] tensor to {target.reshape(-1).tolist()}",
                flat_node,
                expected=f"[N, {features}] (a flatten)",
            )
    fc = FcParams(w, b, _describe(fc_node))
    cons = g.consumers(out)
    if cons:
        if len(cons) != 1 or cons[0].op_type != "BatchNormalization":
            raise g.error(
                f"its output feeds {', '.join(_describe(n) for n in cons)}",
                fc_node,
                expected="the features BatchNormalization or the graph output",
            )
        fc.features = _batch_norm(g, cons[0])
        out = g.resolve(cons[0].output[0])
    if g.outputs != [out]:
        raise g.error(
            f"the graph outputs are {g.outputs}, the embedding is {out!r}",
            fc_node,
            expected="a single graph output: the embedding",
        )
    return fc


def _parse_iresnet(g: _Graph, stem: ConvParams, stem_node, x: str, parsed_input) -> ParsedIResNet:
    if stem.prelu is None:
        raise g.error("is not followed by a PReLU", stem_node, expected="the IResNet stem PReLU")
    parsed = ParsedIResNet(input_size=parsed_input, stem=stem, stem_prelu=stem.prelu)
    channels = stem.out_channels
    while True:
        cons = g.consumers(x)
        bns = [n for n in cons if n.op_type == "BatchNormalization"]
        if len(bns) != 1:
            found = ", ".join(_describe(n) for n in cons) or "nothing"
            raise OnnxImportError(
                f"tensor {x!r} feeds {found}",
                path=g.path,
                node=_describe(cons[0]) if len(cons) == 1 else None,
                expected="one BatchNormalization (a unit's bn1 or the head's bn2)",
            )
        flat = _flatten_node(g, bns[0].output[0])
        if flat is not None:
            if len(cons) != 1:
                raise g.error("reads the last unit's output", cons[0], expected="only head bn2")
            parsed.head_bn = _batch_norm(g, bns[0])
            parsed.fc = _flatten_and_fc(g, flat, g.resolve(bns[0].output[0]), channels)
            break
        unit, x = _unit(g, x, bns[0])
        if unit.shortcut is not None or not parsed.stages:
            parsed.stages.append([])
        parsed.stages[-1].append(unit)
        channels = unit.conv2.out_channels
    _check_iresnet(parsed, g.path)
    return parsed


def _check_iresnet(p: ParsedIResNet, path: str) -> None:
    """Stage widths, strides, depth and SE ratio of an IResNet."""
    if p.stem.out_channels != STAGE_WIDTHS[0]:
        raise OnnxImportError(
            f"the stem has {p.stem.out_channels} channels",
            path=path,
            node=p.stem.node,
            expected=f"{STAGE_WIDTHS[0]}",
        )
    if len(p.stages) != len(STAGE_WIDTHS):
        raise OnnxImportError(
            f"{len(p.stages)} stages (units per stage {p.units_per_stage})",
            path=path,
            expected="4 stages",
        )
    ratio = p.se_ratio
    for s, (units, width) in enumerate(zip(p.stages, STAGE_WIDTHS), 1):
        for u, unit in enumerate(units, 1):
            stride = 2 if u == 1 else 1
            if unit.conv1.out_channels != width or unit.conv2.out_channels != width:
                raise OnnxImportError(
                    f"stage {s} unit {u} has {unit.conv2.out_channels} channels",
                    path=path,
                    node=unit.conv2.node,
                    expected=f"{width}",
                )
            if unit.stride != stride or (u == 1) != (unit.shortcut is not None):
                raise OnnxImportError(
                    f"stage {s} unit {u} has stride {unit.stride} and "
                    f"{'a' if unit.shortcut else 'no'} shortcut conv",
                    path=path,
                    node=unit.node,
                    expected="stride 2 and a 1x1 shortcut in the first unit of a stage only",
                )
            unit_ratio = unit.se.ratio if unit.se is not None else 0
            if unit_ratio != ratio:
                raise OnnxImportError(
                    f"stage {s} unit {u} has "
                    + (f"squeeze-excitation ratio {unit_ratio}" if unit_ratio else "no SE block"),
                    path=path,
                    node=unit.se.node if unit.se is not None else unit.node,
                    expected=f"SE ratio {ratio} in every unit" if ratio else "no SE in any unit",
                )
    if p.depth is None:
        from facerec_tf.models.iresnet import IRESNET_STAGES

        known = ", ".join(f"{d}: {u}" for d, u in IRESNET_STAGES.items())
        raise OnnxImportError(
            f"units per stage {p.units_per_stage} match no IResNet depth",
            path=path,
            expected=f"one of {known}",
        )
    if p.input_size == (0, 0):  # dynamic input size: infer a square input from the fc
        side = math.isqrt(p.fc.weight.shape[0] // STAGE_WIDTHS[-1])
        p.input_size = (side * 16, side * 16)


def _mbf_unit(g: _Graph, x: str, node, label: str) -> tuple[MbfUnitParams, str]:
    """A ``DepthWise`` unit from its expand conv ``node``."""
    expand, y = _conv(g, node, kernel=1, stride=1, what=f"{label}: the 1x1 expand conv", prelu=True)
    dw_node = g.next_node(y, ("Conv",), node, f"{label}: the depthwise conv")
    dw, y = _conv(
        g,
        dw_node,
        kernel=3,
        stride=None,
        what=f"{label}: the 3x3 depthwise conv",
        groups="depthwise",
        prelu=True,
    )
    proj_node = g.next_node(y, ("Conv",), dw_node, f"{label}: the 1x1 projection conv")
    project, y = _conv(
        g, proj_node, kernel=1, stride=1, what=f"{label}: the 1x1 projection conv", prelu=False
    )
    cons = g.consumers(y)
    adds = [n for n in cons if n.op_type == "Add" and x in [g.resolve(i) for i in n.input]]
    if len(cons) == 1 and len(adds) == 1:
        add = adds[0]
        g.visit(add)
        if sorted(g.resolve(i) for i in add.input) != sorted([x, y]):
            raise g.error("adds something else", add, expected=f"{label}: unit input + output")
        return MbfUnitParams(expand, dw, project, True, _describe(add)), g.resolve(add.output[0])
    return MbfUnitParams(expand, dw, project, False, project.node), y


def _parse_mobilefacenet(
    g: _Graph, stem: ConvParams, stem_node, x: str, input_size
) -> ParsedMobileFaceNet:
    if stem.prelu is None:
        raise g.error(
            "is not followed by a PReLU", stem_node, expected="the MobileFaceNet stem PReLU"
        )
    stem_dw = None
    units: list[MbfUnitParams] = []
    while True:
        cons = g.consumers(x)
        convs = [n for n in cons if n.op_type == "Conv"]
        if len(convs) != 1 or any(n.op_type not in ("Conv", "Add") for n in cons):
            found = ", ".join(_describe(n) for n in cons) or "nothing"
            raise OnnxImportError(
                f"tensor {x!r} feeds {found}",
                path=g.path,
                node=_describe(cons[0]) if len(cons) == 1 else None,
                expected="one Conv (the next MobileFaceNet unit or conv_sep)",
            )
        node = convs[0]
        weight = g.const(node, 1, "a convolution weight")
        if weight.shape[2:] == (3, 3) and not units and stem_dw is None:
            # blocks[0] == 1: ConvBlock(64 s, 64 s, 3x3, groups=64)
            stem_dw, x = _conv(
                g,
                node,
                kernel=3,
                stride=1,
                what="the grouped conv after the stem",
                groups="any",
                prelu=True,
            )
            continue
        after = g.consumers(node.output[0])
        while len(after) == 1 and after[0].op_type in ("BatchNormalization", "PRelu"):
            after = g.consumers(after[0].output[0])
        nxt = after[0] if len(after) == 1 and after[0].op_type == "Conv" else None
        if nxt is not None and list(g.attr(nxt, "pads", [0, 0, 0, 0])) == [0, 0, 0, 0]:
            break  # conv_sep, then the GDC conv (no padding)
        unit, x = _mbf_unit(g, x, node, f"MobileFaceNet unit {len(units) + 1}")
        units.append(unit)
    conv_sep, x = _conv(g, node, kernel=1, stride=1, what="conv_sep (1x1)", prelu=True)
    gdc_node = g.next_node(x, ("Conv",), node, "the GDC depthwise conv")
    gdc, x = _conv(
        g,
        gdc_node,
        kernel=None,
        stride=1,
        pad=0,
        what="the GDC depthwise conv (no padding)",
        groups="depthwise",
        prelu=False,
    )
    flat = _flatten_node(g, x)
    if flat is None:
        found = ", ".join(_describe(n) for n in g.consumers(x)) or "nothing"
        raise g.error(f"its output feeds {found}", gdc_node, expected="a single Flatten or Reshape")
    fc = _flatten_and_fc(g, flat, x, gdc.out_channels)
    parsed = ParsedMobileFaceNet(input_size, stem, stem_dw, units, conv_sep, gdc, fc)
    _check_mobilefacenet(parsed, g.path)
    return parsed


def _check_mobilefacenet(p: ParsedMobileFaceNet, path: str) -> None:
    """Group the units into stages and check the arcface_torch layout (widths, strides,
    expansions) that :class:`MobileFaceNetBackbone` builds."""

    def fail(detail, node, expected):
        raise OnnxImportError(detail, path=path, node=node, expected=expected)

    c64 = p.stem.out_channels
    if c64 % 64 or p.stem.stride != 2:
        fail(f"the stem has {c64} channels", p.stem.node, "64 x scale channels, stride 2")
    scale = c64 // 64
    if p.stem_dw is not None:
        dw = p.stem_dw
        if (dw.group, dw.out_channels, dw.in_channels) != (MBF_STEM_GROUPS, c64, c64):
            fail(
                f"group {dw.group}, {dw.in_channels} -> {dw.out_channels} channels",
                dw.node,
                f"the grouped conv of blocks[0] == 1: {c64} -> {c64} channels in 64 groups",
            )
    stages: list[list[MbfUnitParams]] = [[]]
    for unit in p.units:
        if unit.residual:
            stages[-1].append(unit)
        else:
            stages.append([unit])
            stages.append([])
    if len(stages) != 7:
        fail(
            f"{len(stages) // 2} stride-2 DepthWise units",
            p.units[-1].node if p.units else p.conv_sep.node,
            "3 (arcface_torch MobileFaceNet)",
        )
    if p.stem_dw is not None and stages[0]:
        fail("residual units after the grouped conv", stages[0][0].node, "none (blocks[0] == 1)")
    if p.stem_dw is None and len(stages[0]) == 1:
        fail(
            "one residual unit in the first stage",
            stages[0][0].node,
            "blocks[0] == 1 is the grouped conv; a residual first stage has 0 or >= 2 units",
        )
    for units, (_, width, expansion, stride) in zip(stages, MBF_LAYOUT):
        width *= scale
        for unit in units:
            got = (unit.project.out_channels, unit.expansion, unit.stride)
            if got != (width, expansion, stride):
                fail(
                    f"a DepthWise unit with {got[0]} output channels, expansion {got[1]}, "
                    f"stride {got[2]}",
                    unit.node,
                    f"{width} channels, expansion {expansion}, stride {stride} (arcface_torch "
                    f"MobileFaceNet, scale {scale})",
                )
    if p.conv_sep.out_channels != MBF_SEP_WIDTH:
        fail(f"{p.conv_sep.out_channels} channels", p.conv_sep.node, f"{MBF_SEP_WIDTH}")
    k = p.gdc.kernel
    if p.input_size == (0, 0):
        p.input_size = (k * 16, k * 16)
    elif p.input_size != (k * 16, k * 16):
        fail(
            f"a {k}x{k} kernel for a {p.input_size} input",
            p.gdc.node,
            "a kernel covering the whole feature map (input / 16)",
        )
    p.stages = stages


def parse_insightface_onnx(path: str | os.PathLike) -> ParsedIResNet | ParsedMobileFaceNet:
    """Read an arcface_torch ONNX backbone; returns its weights, layer by layer.

    Raises:
        OnnxImportError: the graph is not a backbone this importer maps (names the node).
        FileNotFoundError: no file at ``path``.
        MissingDependencyError: the ``onnx`` package is not installed.
    """
    (onnx,) = require(("onnx",), "importing an insightface ONNX model")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as e:
        raise OnnxImportError(f"cannot read the ONNX file ({e})", path=path) from None
    g = _Graph(model, path)
    if len(g.inputs) != 1:
        raise OnnxImportError(
            f"the graph has {len(g.inputs)} inputs", path=path, expected="one image input"
        )
    value = g.inputs[0]
    dims = [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise OnnxImportError(
            f"input {value.name!r} has shape {dims}", path=path, expected="[N, 3, H, W]"
        )
    norm, x = _input_normalization(g, value.name)
    cons = g.consumers(x)
    if len(cons) != 1 or cons[0].op_type != "Conv":
        found = ", ".join(_describe(n) for n in cons) or "nothing"
        raise OnnxImportError(
            f"the input {x!r} feeds {found}",
            path=path,
            node=_describe(cons[0]) if cons else None,
            expected="the stem Conv (after optional Sub/Mul/Div/Add normalisation nodes)",
        )
    stem_node = cons[0]
    stem, x = _conv(
        g,
        stem_node,
        kernel=3,
        stride=None,
        what="the stem conv (3x3; stride 1: IResNet, stride 2: MobileFaceNet)",
    )
    if stem.weight.shape[1] != 3:
        raise g.error(
            f"weight of shape {stem.weight.shape}", stem_node, expected="3 input channels"
        )
    input_size = (dims[2] or 0, dims[3] or 0)
    if stem.stride == 1:
        parsed = _parse_iresnet(g, stem, stem_node, x, input_size)
    elif stem.stride == 2:
        parsed = _parse_mobilefacenet(g, stem, stem_node, x, input_size)
    else:
        raise g.error(
            f"stride {stem.stride}",
            stem_node,
            expected="the stem conv: stride 1 (IResNet) or 2 (MobileFaceNet)",
        )
    parsed.normalization = norm
    for node in g.nodes:
        if id(node) not in g.visited:
            raise g.error(
                f"is not part of the matched {parsed.family}",
                node,
                expected="an arcface_torch IResNet, IR-SE or MobileFaceNet",
            )
    return parsed


# ----------------------------------------------------------------------------------------------
# Assignment


def _assign(variable, value: np.ndarray, where: str, path: str) -> None:
    if tuple(variable.shape) != tuple(value.shape):
        raise OnnxImportError(
            f"gives a tensor of shape {tuple(value.shape)} for {variable.path}",
            path=path,
            node=where,
            expected=f"shape {tuple(variable.shape)}",
        )
    variable.assign(np.asarray(value, dtype=np.float32))


def _set_bn(layer, bn: BatchNormParams, path: str, mean_shift: np.ndarray | None = None) -> None:
    var = bn.var + bn.epsilon - layer.epsilon
    if np.any(var < 0):
        raise OnnxImportError(
            "running variance below the epsilon difference",
            path=path,
            node=bn.node,
            expected=f"epsilon {layer.epsilon} or larger variances",
        )
    mean = bn.mean if mean_shift is None else bn.mean - mean_shift
    if layer.gamma is not None:
        _assign(layer.gamma, bn.scale, bn.node, path)
    elif not np.allclose(bn.scale, 1.0):
        raise OnnxImportError(
            f"has a scale but Keras layer {layer.name!r} has none", path=path, node=bn.node
        )
    _assign(layer.beta, bn.bias, bn.node, path)
    _assign(layer.moving_mean, mean, bn.node, path)
    _assign(layer.moving_variance, var, bn.node, path)


def _set_bias_bn(layer, bias: np.ndarray | None, channels: int, where: str, path: str) -> None:
    """Set a Keras BN to ``x + bias`` (identity plus bias)."""
    ones = np.ones(channels, np.float32)
    bias = np.zeros(channels, np.float32) if bias is None else bias
    _set_bn(
        layer,
        BatchNormParams(ones, bias, 0 * ones, 1.0 - layer.epsilon * ones, layer.epsilon, where),
        path,
    )


def torch_conv_kernel(weight: np.ndarray, groups: int) -> np.ndarray:
    """A torch ``Conv2d`` weight ``[O, I / G, kh, kw]`` as our layer's kernel: ``Conv2D``
    ``[kh, kw, I, O]`` (``groups`` 1), else ``GroupedConv2D`` ``[kh, kw, I, O / G]``, which
    is also ``DepthwiseConv2D``'s ``[kh, kw, C, multiplier]`` when ``groups`` = C. Used by the
    ONNX and the ``.pth`` importers."""
    if groups == 1:
        return weight.transpose(2, 3, 1, 0)
    o, cin, kh, kw = weight.shape
    cout = o // groups  # kernel[:, :, g*cin + k, j] = weight[g*cout + j, k]
    w = weight.reshape(groups, cout, cin, kh, kw).transpose(3, 4, 0, 2, 1)
    return w.reshape(kh, kw, groups * cin, cout)


def _keras_kernel(conv: ConvParams) -> np.ndarray:
    return torch_conv_kernel(conv.weight, conv.group)


def _set_conv(model, conv_name: str, conv: ConvParams, path: str, in_scale=None) -> None:
    """Kernel of ``conv_name``; ``in_scale`` multiplies each input channel (the stem)."""
    layer = _layer(model, conv_name, conv.node, path)
    weight = conv.weight
    if in_scale is not None:
        weight = weight * np.asarray(in_scale, np.float32).reshape(1, -1, 1, 1)
    kernel = _keras_kernel(
        ConvParams(weight, conv.bias, conv.stride, conv.pad, conv.group, conv.node)
    )
    _assign(layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel,
            kernel, conv.node, path)  # fmt: skip


def _set_conv_bn(model, conv_name: str, bn_name: str, conv: ConvParams, path: str, in_scale=None):
    _set_conv(model, conv_name, conv, path, in_scale)
    bn_layer = _layer(model, bn_name, conv.node, path)
    if conv.bn is None:
        _set_bias_bn(bn_layer, conv.bias, conv.out_channels, conv.node, path)
    else:
        _set_bn(bn_layer, conv.bn, path, mean_shift=conv.bias)


def _set_prelu(model, name: str, slope: np.ndarray, where: str, path: str) -> None:
    layer = _layer(model, name, where, path)
    _assign(layer.alpha, slope.reshape(tuple(layer.alpha.shape)), where, path)


def _set_block(model, prefix: str, conv: ConvParams, path: str, in_scale=None) -> None:
    """A MobileFaceNet ``conv_block``: ``{prefix}_conv``, ``_bn`` (and ``_prelu``)."""
    _set_conv_bn(model, f"{prefix}_conv", f"{prefix}_bn", conv, path, in_scale)
    if conv.prelu is not None:
        _set_prelu(model, f"{prefix}_prelu", conv.prelu, conv.node, path)
    elif _has_layer(model, f"{prefix}_prelu"):
        raise OnnxImportError(
            f"has no PReLU but Keras layer '{prefix}_prelu' exists", path=path, node=conv.node
        )


def _layer(model, name: str, where: str, path: str):
    try:
        return model.get_layer(name)
    except ValueError:
        raise OnnxImportError(
            f"has no Keras layer {name!r} in model {model.name!r} to go to",
            path=path,
            node=where,
            expected="a backbone with the ONNX graph's structure",
        ) from None


def _has_layer(model, name: str) -> bool:
    try:
        model.get_layer(name)
    except ValueError:
        return False
    return True


def _stem_scale(backbone, parsed, path: str) -> np.ndarray:
    """Per-input-channel factor on the stem kernel for what ``backbone`` is fed (see the
    module docstring: pixels with our preprocess layer, else the ONNX stem's input)."""
    import keras

    try:
        pre = backbone.get_layer("preprocess")
    except ValueError:
        pre = None
    if pre is None:
        if backbone.get_config().get("include_preprocessing", False):
            raise OnnxImportError(
                f"Keras model {backbone.name!r} takes pixels but has no 'preprocess' layer",
                path=path,
                expected="a facerec_tf backbone",
            )
    elif (
        not isinstance(pre, keras.layers.Rescaling)
        or not np.isclose(float(np.mean(pre.scale)), 1.0 / PREPROCESS_SCALE)
        or not np.isclose(float(np.mean(pre.offset)), -PIXEL_CENTRE / PREPROCESS_SCALE)
    ):
        raise OnnxImportError(
            f"Keras model {backbone.name!r}: its 'preprocess' layer is not (x - 127.5) / 128",
            path=path,
            expected="a facerec_tf backbone",
        )
    norm = parsed.normalization
    if norm is None:  # arcface_torch: the file is fed (x - 127.5) / 127.5
        return np.full(3, STEM_RESCALE)
    # the stem sees scale * x + shift = 128 scale * u + (127.5 scale + shift), u = our input
    centre = PIXEL_CENTRE * norm.scale + norm.shift
    if np.any(np.abs(centre) > 1e-5 * 255.0 * np.abs(norm.scale)):
        raise OnnxImportError(
            f"the input normalisation maps pixel 127.5 to {np.round(centre, 6).tolist()}, not 0, "
            "so it does not fold exactly into a zero-padded stem behind our (x - 127.5) / 128",
            path=path,
            node=norm.nodes[0],
            expected="a normalisation centred on 127.5",
        )
    return PREPROCESS_SCALE * norm.scale


def _set_fc(model, flatten_name: str, fc_name: str, fc: FcParams, path: str) -> None:
    h, w, c = (int(d) for d in _layer(model, flatten_name, fc.node, path).input.shape[1:])
    fc_layer = _layer(model, fc_name, fc.node, path)
    d = fc.embedding_size
    if fc.weight.shape[0] != c * h * w:
        raise OnnxImportError(
            f"takes {fc.weight.shape[0]} features, the Keras head {c}x{h}x{w}",
            path=path,
            node=fc.node,
            expected=f"{c * h * w} (input size {model.input_shape[1:3]})",
        )
    # torch flattens C, H, W; Keras H, W, C
    kernel = fc.weight.reshape(c, h, w, d).transpose(1, 2, 0, 3).reshape(h * w * c, d)
    _assign(fc_layer.kernel, kernel, fc.node, path)
    bias = fc.bias if fc.bias is not None else np.zeros(d, np.float32)
    if fc_layer.bias is not None:
        _assign(fc_layer.bias, bias, fc.node, path)
    features = _layer(model, "features", fc.node, path)
    if fc.features is not None:
        _set_bn(features, fc.features, path, mean_shift=None if fc_layer.bias is not None else bias)
    else:  # features folded into the fc by a graph simplifier
        _set_bias_bn(features, None if fc_layer.bias is not None else bias, d, fc.node, path)


def _check_structure(backbone, parsed, path: str) -> None:
    """Refuse a given ``backbone`` whose family or layout differs from the graph's."""
    config = backbone.get_config()
    if parsed.family == "iresnet":
        want = {"depth": parsed.depth, "se": bool(parsed.se_ratio)}
        got = {"depth": config.get("depth"), "se": bool(config.get("se", False))}
        if parsed.se_ratio:
            want["se_ratio"], got["se_ratio"] = parsed.se_ratio, config.get("se_ratio")
        expected = (
            f"an ir_se{parsed.depth} with se_ratio={parsed.se_ratio}"
            if parsed.se_ratio
            else f"a plain iresnet{parsed.depth}"
        )
    else:
        want = {"stage_units": parsed.stage_units, "width_scale": parsed.width_scale}
        units = config.get("stage_units")
        got = {
            "stage_units": tuple(units) if units is not None else None,
            "width_scale": config.get("width_scale"),
        }
        expected = (
            f"a MobileFaceNetBackbone with stage_units={parsed.stage_units}, "
            f"width_scale={parsed.width_scale}"
        )
    if got != want:
        raise OnnxImportError(
            f"Keras model {backbone.name!r} has {got}, the graph {want}",
            path=path,
            expected=expected,
        )


def _build(parsed):
    if parsed.family == "iresnet":
        from facerec_tf.models.iresnet import IResNetBackbone

        return IResNetBackbone(
            depth=parsed.depth,
            se=bool(parsed.se_ratio),
            se_ratio=parsed.se_ratio or 16,
            embedding_size=parsed.embedding_size,
            input_shape=(*parsed.input_size, 3),
            include_preprocessing=True,
        )
    from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
    from facerec_tf.models.registry import BACKBONES

    args = {"stage_units": parsed.stage_units, "width_scale": parsed.width_scale}
    name = "mobilefacenet"  # a registry name when the layout is a registry row's
    for key, (cls, preset) in BACKBONES.items():
        row = (tuple(preset.get("stage_units", (1, 4, 6, 2))), preset.get("width_scale", 2))
        if cls is MobileFaceNetBackbone and row == (parsed.stage_units, parsed.width_scale):
            name = key
    return MobileFaceNetBackbone(
        embedding_size=parsed.embedding_size,
        input_shape=(*parsed.input_size, 3),
        include_preprocessing=True,
        name=name,
        **args,
    )


def _load_iresnet(backbone, p: ParsedIResNet, path: str, stem_scale) -> None:
    _set_conv_bn(backbone, "stem_conv", "stem_bn", p.stem, path, in_scale=stem_scale)
    _set_prelu(backbone, "stem_prelu", p.stem_prelu, p.stem.node, path)
    for s, units in enumerate(p.stages, 1):
        for u, unit in enumerate(units, 1):
            name = f"stage{s}_unit{u}"
            _set_bn(_layer(backbone, f"{name}_bn1", unit.bn1.node, path), unit.bn1, path)
            _set_conv_bn(backbone, f"{name}_conv1", f"{name}_bn2", unit.conv1, path)
            _set_prelu(backbone, f"{name}_prelu", unit.prelu, unit.conv1.node, path)
            _set_conv_bn(backbone, f"{name}_conv2", f"{name}_bn3", unit.conv2, path)
            if unit.se is not None:
                for part, weight in (("reduce", unit.se.reduce), ("expand", unit.se.expand)):
                    layer = _layer(backbone, f"{name}_se_{part}", unit.se.node, path)
                    _assign(layer.kernel, weight.transpose(2, 3, 1, 0), unit.se.node, path)
            if unit.shortcut is not None:
                _set_conv_bn(
                    backbone, f"{name}_shortcut_conv", f"{name}_shortcut_bn", unit.shortcut, path
                )
    _set_bn(_layer(backbone, "head_bn", p.head_bn.node, path), p.head_bn, path)
    _set_fc(backbone, "head_flatten", "head_fc", p.fc, path)


def _load_mobilefacenet(backbone, p: ParsedMobileFaceNet, path: str, stem_scale) -> None:
    _set_block(backbone, "stem", p.stem, path, in_scale=stem_scale)
    if p.stem_dw is not None:
        _set_block(backbone, "stem_dw", p.stem_dw, path)
    for units, (prefix, *_) in zip(p.stages, MBF_LAYOUT):
        for i, unit in enumerate(units, 1):
            name = prefix if prefix.startswith("down") else f"{prefix}_unit{i}"
            _set_block(backbone, f"{name}_expand", unit.expand, path)
            _set_block(backbone, f"{name}_dw", unit.dw, path)
            _set_block(backbone, f"{name}_project", unit.project, path)
    _set_block(backbone, "conv_sep", p.conv_sep, path)
    _set_block(backbone, "gdc", p.gdc, path)
    _set_fc(backbone, "gdc_flatten", "gdc_fc", p.fc, path)


def load_insightface_onnx(path: str | os.PathLike, backbone=None):
    """Build (or fill) a backbone with the weights of an arcface_torch ONNX file.

    Args:
        path: an arcface_torch ``.onnx`` IResNet, IR-SE or MobileFaceNet (``torch2onnx.py``
            output, or an insightface model pack's recognition model).
        backbone: an existing backbone of the graph's family and layout (depth / SE ratio,
            or stage units and width scale), embedding size and input size to load into. By
            default one is built with ``include_preprocessing=True``.

    Returns:
        the backbone. With ``include_preprocessing=True`` it takes RGB pixels in [0, 255]
        (NHWC) and ``backbone(x)`` equals the ONNX model's raw output on ``(x - 127.5) /
        127.5`` (NCHW), or on ``x`` itself for a graph that normalises its own input. With
        ``include_preprocessing=False`` it takes (NHWC) ``(x - 127.5) / 128``, the project's
        normalisation, like every backbone built that way. Equal up to float rounding.

    Raises:
        OnnxImportError: not a backbone this importer maps (names the node), a normalisation
            that cannot be folded exactly, or ``backbone`` does not match the graph.
        MissingDependencyError: the ``onnx`` package is not installed.
    """
    path = os.fspath(path)
    p = parse_insightface_onnx(path)
    if backbone is None:
        backbone = _build(p)
    else:
        _check_structure(backbone, p, path)
    stem_scale = _stem_scale(backbone, p, path)
    if p.family == "iresnet":
        _load_iresnet(backbone, p, path, stem_scale)
    else:
        _load_mobilefacenet(backbone, p, path, stem_scale)
    return backbone
