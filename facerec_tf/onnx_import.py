"""Import the weights of an insightface (arcface_torch) ONNX IResNet into :class:`IResNetBackbone`.

The files handled are those of arcface_torch's model zoo, as written by its ``torch2onnx.py``
(``torch.onnx.export`` of an eval-mode ``IResNet``): input ``[N, 3, H, W]`` RGB holding
``(x - 127.5) / 127.5``, output the raw embedding. In that export torch **folds every
BatchNorm that directly follows a convolution into the convolution's weight and bias** (the
stem BN, each unit's ``bn2`` and ``bn3``, the shortcut BN), while the BatchNorms that precede a
convolution (each unit's ``bn1``, the head's ``bn2``) and the ``features`` BatchNorm1d stay
``BatchNormalization`` nodes. PReLU slopes are ``[C, 1, 1]`` initialisers, and the head is
``Flatten`` (of NCHW, i.e. in C, H, W order) then ``Gemm``.

The importer also accepts the variations other exporters and simplifiers produce: a
``BatchNormalization`` node still after a convolution (unfolded), a convolution without bias,
``features`` folded into the ``Gemm`` (no final BatchNormalization), ``Reshape`` for
``Flatten``, ``MatMul`` (+ ``Add``) for ``Gemm``, ``Identity`` / ``Dropout`` nodes, and
constants given as ``Constant`` nodes instead of initialisers.

How weights map (exact linear algebra, no approximation):

* a convolution with folded BN becomes our conv kernel (``[O, I, kh, kw]`` transposed to
  ``[kh, kw, I, O]``) plus the following Keras BatchNormalization set to "identity plus bias":
  ``gamma = 1``, ``beta = bias``, ``moving_mean = 0``, ``moving_variance = 1 - eps`` so that
  ``sqrt(moving_variance + eps) = 1``. An unfolded conv + BN maps onto conv + BN directly
  (a conv bias moves into ``moving_mean``);
* the stem kernel is multiplied by ``128 / 127.5``: our backbone feeds the stem with
  ``(x - 127.5) / 128`` (its ``preprocess`` layer; it takes pixels in [0, 255]) where
  insightface feeds ``(x - 127.5) / 127.5``. Zero padding is 0 in both conventions, so this
  is exact at the borders too;
* the fc weight is permuted from torch's flatten order (C, H, W) to Keras' (H, W, C);
* a BN epsilon other than ours is absorbed into ``moving_variance``.

The graph is walked along the data flow from the input (a topological order), each node
matched to the next Keras layer; anything that is not an arcface_torch IResNet raises
:class:`OnnxImportError` naming the ONNX node. Every node must be used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facerec_tf.errors import DataFormatError

__all__ = ["OnnxImportError", "ParsedIResNet", "load_insightface_onnx", "parse_insightface_onnx"]

# insightface feeds the stem (x - 127.5) / 127.5; our preprocess layer gives (x - 127.5) / 128.
STEM_RESCALE = 128.0 / 127.5
STAGE_WIDTHS = (64, 128, 256, 512)


class OnnxImportError(DataFormatError):
    """The ONNX file is not an arcface_torch IResNet (names the node where the match failed).

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
    """One ONNX ``Conv`` (torch layout) and the BatchNormalization after it, if not folded."""

    weight: np.ndarray  # [O, I, kh, kw]
    bias: np.ndarray | None
    stride: int
    pad: int
    node: str
    bn: BatchNormParams | None = None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])


@dataclass
class UnitParams:
    """One ``IBasicBlock``."""

    bn1: BatchNormParams
    conv1: ConvParams
    prelu: np.ndarray
    conv2: ConvParams
    shortcut: ConvParams | None
    node: str  # the Add

    @property
    def stride(self) -> int:
        return self.conv2.stride


@dataclass
class ParsedIResNet:
    """An arcface_torch IResNet read from ONNX: weights in torch layout, in graph order."""

    input_size: tuple[int, int]
    stem: ConvParams
    stem_prelu: np.ndarray
    stages: list[list[UnitParams]] = field(default_factory=list)
    head_bn: BatchNormParams | None = None
    fc_weight: np.ndarray | None = None  # [in, out], rows in torch's C, H, W order
    fc_bias: np.ndarray | None = None
    fc_node: str = ""
    features: BatchNormParams | None = None

    @property
    def units_per_stage(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.stages)

    @property
    def embedding_size(self) -> int:
        return int(self.fc_weight.shape[1])

    @property
    def depth(self) -> int | None:
        from facerec_tf.models.iresnet import IRESNET_STAGES

        for depth, units in IRESNET_STAGES.items():
            if tuple(units) == self.units_per_stage:
                return depth
        return None


# ----------------------------------------------------------------------------------------------
# Graph access


def _describe(node) -> str:
    name = node.name or (f"producing {node.output[0]!r}" if node.output else "<unnamed>")
    return f"{name!r} ({node.op_type})"


class _Graph:
    """Constants, producers and consumers of an ONNX graph, with Identity/Dropout skipped."""

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
        for node in g.node:
            if node.op_type == "Constant":
                attr = {a.name: a for a in node.attribute}
                if "value" not in attr:
                    raise OnnxImportError(
                        "Constant without a tensor 'value'", path=path, node=_describe(node)
                    )
                self.consts[node.output[0]] = numpy_helper.to_array(attr["value"].t)
            elif node.op_type in ("Identity", "Dropout"):
                self.alias[node.output[0]] = node.input[0]
            else:
                self.nodes.append(node)
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

    def const(self, node, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            raise self.error(f"has no input {index}", node, expected=what)
        name = self.resolve(node.input[index])
        if name not in self.consts:
            raise self.error(f"input {index} ({name!r}) is not a constant", node, expected=what)
        return np.asarray(self.consts[name], dtype=np.float32)

    def data_input(self, node, index: int = 0) -> str:
        return self.resolve(node.input[index])


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


def _conv(g: _Graph, node, *, kernel: int, stride: int | None, what: str):
    """Match a ``Conv`` (+ an unfolded ``BatchNormalization``); returns (params, output)."""
    g.visit(node)
    weight = g.const(node, 1, f"{what} weight")
    bias = g.const(node, 2, f"{what} bias") if len(node.input) > 2 and node.input[2] else None
    if weight.ndim != 4 or weight.shape[2:] != (kernel, kernel):
        raise g.error(
            f"weight of shape {weight.shape}", node, expected=f"{what}: a {kernel}x{kernel} kernel"
        )
    if int(g.attr(node, "group", 1)) != 1 or any(
        int(d) != 1 for d in g.attr(node, "dilations", [1, 1])
    ):
        raise g.error("is grouped or dilated", node, expected=f"{what}: a plain convolution")
    auto_pad = g.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = [int(p) for p in g.attr(node, "pads", [0, 0, 0, 0])]
    strides = [int(s) for s in g.attr(node, "strides", [1, 1])]
    pad = kernel // 2
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
    params = ConvParams(weight, bias, strides[0], pad, _describe(node))
    out = node.output[0]
    cons = g.consumers(out)
    if len(cons) == 1 and cons[0].op_type == "BatchNormalization":
        params.bn = _batch_norm(g, cons[0])
        out = cons[0].output[0]
    return params, g.resolve(out)


def _prelu(g: _Graph, node, channels: int) -> np.ndarray:
    g.visit(node)
    slope = g.const(node, 1, "PReLU slopes").reshape(-1)
    if slope.size == 1:
        slope = np.full(channels, slope[0], np.float32)
    if slope.size != channels:
        raise g.error(
            f"{slope.size} slopes for {channels} channels", node, expected="[C, 1, 1] slopes"
        )
    return slope


def _unit(g: _Graph, x: str, bn1_node) -> tuple[UnitParams, str]:
    bn1 = _batch_norm(g, bn1_node)
    conv1_node = g.next_node(bn1_node.output[0], ("Conv",), bn1_node, "the unit's conv1")
    conv1, y = _conv(g, conv1_node, kernel=3, stride=1, what="the unit's conv1 (3x3, stride 1)")
    prelu_node = g.next_node(y, ("PRelu",), conv1_node, "the unit's PReLU")
    prelu = _prelu(g, prelu_node, conv1.out_channels)
    conv2_node = g.next_node(prelu_node.output[0], ("Conv",), prelu_node, "the unit's conv2")
    conv2, y = _conv(g, conv2_node, kernel=3, stride=None, what="the unit's conv2 (3x3)")
    cons = g.consumers(y)
    if len(cons) == 1 and cons[0].op_type in ("GlobalAveragePool", "ReduceMean"):
        raise g.error(
            "starts a squeeze-excitation block",
            cons[0],
            expected="a plain IResNet unit (IR-SE models are not supported by this importer)",
        )
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
    unit = UnitParams(bn1, conv1, prelu, conv2, shortcut, _describe(add))
    return unit, g.resolve(add.output[0])


def _head(g: _Graph, bn_node, flat_node, channels: int, parsed: ParsedIResNet) -> None:
    parsed.head_bn = _batch_norm(g, bn_node)
    g.visit(flat_node)
    if flat_node.op_type == "Flatten" and int(g.attr(flat_node, "axis", 1)) != 1:
        raise g.error("flattens at another axis", flat_node, expected="axis=1")
    if flat_node.op_type == "Reshape":
        shape = g.const(flat_node, 1, "the target shape").astype(np.int64).reshape(-1)
        if shape.size != 2:
            raise g.error(f"reshapes to {shape.tolist()}", flat_node, expected="[N, C*H*W]")
    fc_node = g.next_node(flat_node.output[0], ("Gemm", "MatMul"), flat_node, "the fc layer")
    g.visit(fc_node)
    parsed.fc_node = _describe(fc_node)
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
    parsed.fc_weight, parsed.fc_bias = w, b
    cons = g.consumers(out)
    if cons:
        if len(cons) != 1 or cons[0].op_type != "BatchNormalization":
            raise g.error(
                f"its output feeds {', '.join(_describe(n) for n in cons)}",
                fc_node,
                expected="the features BatchNormalization or the graph output",
            )
        parsed.features = _batch_norm(g, cons[0])
        out = g.resolve(cons[0].output[0])
    if g.outputs != [out]:
        raise g.error(
            f"the graph outputs are {g.outputs}, the embedding is {out!r}",
            fc_node,
            expected="a single graph output: the embedding",
        )


def parse_insightface_onnx(path: str | os.PathLike) -> ParsedIResNet:
    """Read an arcface_torch ONNX IResNet and return its weights, unit by unit.

    Raises:
        OnnxImportError: the file is not an arcface_torch IResNet (names the ONNX node).
        FileNotFoundError: no file at ``path``.
    """
    from facerec_tf.export import _require

    (onnx,) = _require(("onnx",), "importing an insightface ONNX model")
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
    x = value.name
    cons = g.consumers(x)
    if len(cons) != 1 or cons[0].op_type != "Conv":
        found = ", ".join(_describe(n) for n in cons) or "nothing"
        raise OnnxImportError(
            f"the input {x!r} feeds {found}",
            path=path,
            node=_describe(cons[0]) if cons else None,
            expected="the stem Conv directly (input normalised outside the graph, "
            "as arcface_torch's torch2onnx.py exports)",
        )
    stem, x = _conv(g, cons[0], kernel=3, stride=1, what="the stem conv (3x3, stride 1)")
    if stem.weight.shape[1] != 3:
        raise g.error(f"weight of shape {stem.weight.shape}", cons[0], expected="3 input channels")
    prelu_node = g.next_node(x, ("PRelu",), cons[0], "the stem PReLU")
    parsed = ParsedIResNet(
        input_size=(dims[2] or 0, dims[3] or 0),
        stem=stem,
        stem_prelu=_prelu(g, prelu_node, stem.out_channels),
    )
    x = g.resolve(prelu_node.output[0])
    channels = stem.out_channels
    while True:
        cons = g.consumers(x)
        bns = [n for n in cons if n.op_type == "BatchNormalization"]
        if len(bns) != 1:
            found = ", ".join(_describe(n) for n in cons) or "nothing"
            raise OnnxImportError(
                f"tensor {x!r} feeds {found}",
                path=path,
                expected="one BatchNormalization (a unit's bn1 or the head's bn2)",
            )
        after = g.consumers(bns[0].output[0])
        if len(after) == 1 and after[0].op_type in ("Flatten", "Reshape"):
            if len(cons) != 1:
                raise g.error("reads the last unit's output", cons[0], expected="only head bn2")
            _head(g, bns[0], after[0], channels, parsed)
            break
        unit, x = _unit(g, x, bns[0])
        if unit.shortcut is not None or not parsed.stages:
            parsed.stages.append([])
        parsed.stages[-1].append(unit)
        channels = unit.conv2.out_channels
    for node in g.nodes:
        if id(node) not in g.visited:
            raise g.error(
                "is not part of the matched IResNet", node, expected="an arcface_torch IResNet"
            )
    _check_layout(parsed, path)
    return parsed


def _check_layout(p: ParsedIResNet, path: str) -> None:
    """Stage widths, strides and depth of an IResNet."""
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
    if p.depth is None:
        from facerec_tf.models.iresnet import IRESNET_STAGES

        known = ", ".join(f"{d}: {u}" for d, u in IRESNET_STAGES.items())
        raise OnnxImportError(
            f"units per stage {p.units_per_stage} match no IResNet depth",
            path=path,
            expected=f"one of {known}",
        )
    if p.input_size == (0, 0):  # dynamic input size: infer a square input from the fc
        side = math.isqrt(p.fc_weight.shape[0] // STAGE_WIDTHS[-1])
        p.input_size = (side * 16, side * 16)


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


def _set_conv_bn(model, prefix_conv: str, prefix_bn: str, conv: ConvParams, path: str, scale=1.0):
    layer = _layer(model, prefix_conv, conv.node, path)
    _assign(layer.kernel, conv.weight.transpose(2, 3, 1, 0) * scale, conv.node, path)
    bn_layer = _layer(model, prefix_bn, conv.node, path)
    if conv.bn is None:
        _set_bias_bn(bn_layer, conv.bias, conv.out_channels, conv.node, path)
    else:
        _set_bn(bn_layer, conv.bn, path, mean_shift=conv.bias)


def _set_prelu(model, name: str, slope: np.ndarray, where: str, path: str) -> None:
    layer = _layer(model, name, where, path)
    _assign(layer.alpha, slope.reshape(tuple(layer.alpha.shape)), where, path)


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


def load_insightface_onnx(path: str | os.PathLike, backbone=None):
    """Build (or fill) an :class:`IResNetBackbone` with the weights of an insightface ONNX.

    Args:
        path: an arcface_torch ``.onnx`` IResNet (``torch2onnx.py`` output).
        backbone: an existing IResNet backbone of the same depth, embedding size and input
            size to load into; by default one is built (``include_preprocessing=True``: it
            takes RGB pixels in [0, 255], NHWC).

    Returns:
        the backbone; ``backbone(x)`` on pixels equals the ONNX model's raw output on
        ``(x - 127.5) / 127.5`` (NCHW) up to float rounding.

    Raises:
        OnnxImportError: not an arcface_torch IResNet, or ``backbone`` does not match it.
        MissingDependencyError: the ``onnx`` package is not installed.
    """
    path = os.fspath(path)
    p = parse_insightface_onnx(path)
    if backbone is None:
        from facerec_tf.models.iresnet import IResNetBackbone

        backbone = IResNetBackbone(
            depth=p.depth,
            embedding_size=p.embedding_size,
            input_shape=(*p.input_size, 3),
            include_preprocessing=True,
        )
    for s, units in enumerate(p.stages, 1):
        if _has_layer(backbone, f"stage{s}_unit{len(units) + 1}_bn1"):
            raise OnnxImportError(
                f"stage {s} has {len(units)} units but the Keras model {backbone.name!r} has more",
                path=path,
                expected=f"an iresnet{p.depth} backbone",
            )
        if _has_layer(backbone, f"stage{s}_unit1_se_reduce"):
            raise OnnxImportError(
                f"Keras model {backbone.name!r} is an IR-SE model",
                path=path,
                expected=f"a plain iresnet{p.depth}",
            )
    _set_conv_bn(backbone, "stem_conv", "stem_bn", p.stem, path, scale=STEM_RESCALE)
    _set_prelu(backbone, "stem_prelu", p.stem_prelu, p.stem.node, path)
    for s, units in enumerate(p.stages, 1):
        for u, unit in enumerate(units, 1):
            name = f"stage{s}_unit{u}"
            _set_bn(_layer(backbone, f"{name}_bn1", unit.bn1.node, path), unit.bn1, path)
            _set_conv_bn(backbone, f"{name}_conv1", f"{name}_bn2", unit.conv1, path)
            _set_prelu(backbone, f"{name}_prelu", unit.prelu, unit.conv1.node, path)
            _set_conv_bn(backbone, f"{name}_conv2", f"{name}_bn3", unit.conv2, path)
            if unit.shortcut is not None:
                _set_conv_bn(
                    backbone, f"{name}_shortcut_conv", f"{name}_shortcut_bn", unit.shortcut, path
                )
    _set_bn(_layer(backbone, "head_bn", p.head_bn.node, path), p.head_bn, path)
    flat = _layer(backbone, "head_flatten", p.fc_node, path)
    h, w, c = (int(d) for d in flat.input.shape[1:])
    if p.fc_weight.shape[0] != c * h * w:
        raise OnnxImportError(
            f"takes {p.fc_weight.shape[0]} features, the Keras head {c}x{h}x{w}",
            path=path,
            node=p.fc_node,
            expected=f"{c * h * w} (input size {backbone.input_shape[1:3]})",
        )
    d = p.embedding_size
    kernel = p.fc_weight.reshape(c, h, w, d).transpose(1, 2, 0, 3).reshape(h * w * c, d)
    fc = _layer(backbone, "head_fc", p.fc_node, path)
    _assign(fc.kernel, kernel, p.fc_node, path)
    bias = p.fc_bias if p.fc_bias is not None else np.zeros(d, np.float32)
    if fc.bias is not None:
        _assign(fc.bias, bias, p.fc_node, path)
    features = _layer(backbone, "features", p.fc_node, path)
    if p.features is not None:
        _set_bn(features, p.features, path, mean_shift=None if fc.bias is not None else bias)
    else:  # features folded into the fc by a graph simplifier
        _set_bias_bn(features, None if fc.bias is not None else bias, d, p.fc_node, path)
    return backbone
