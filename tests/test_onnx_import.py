"""The insightface / arcface_torch ONNX importer (``facerec_tf.onnx_import``).

Real files: arcface_torch's own MobileFaceNets in ``../shared/data/arcface_torch`` (``mbf``,
and ``mbf_s1_b2231_e128``: scale 1, blocks (2, 2, 3, 1), 128-d), compared on its real probe
faces with onnxruntime and with the stored torch embeddings; ``mbf.onnx`` also goes through
``tools/export.py --from-insightface-onnx`` to ``.keras`` and SavedModel, and ``evaluate.py``
on the imported ``.keras`` is checked against a separate flip-sum / L2 / 10-fold computation
on onnxruntime's embeddings of the Yale pairs. ``mbf_large``, IR-SE and IResNet files are
written by ``tests/torch_twin.py`` (torch twins of arcface_torch's networks, run in a
subprocess with the Python named by ``FACEREC_TORCH_PYTHON``, default this one; skipped when
it has no torch). Graph variants (PyTorch 1.8-era names and layouts, in-graph input
normalisation, broken graphs) are edits of those files with ``onnx.helper``; an IResNet-18 is
also written node by node as ``torch2onnx.py`` exports one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPORT_CLI = ROOT / "tools" / "export.py"
EVALUATE_CLI = ROOT / "evaluate.py"
TWIN = ROOT / "tests" / "torch_twin.py"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

COS_MIN = 0.9999
REL_MAX = 1e-4

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


# ----------------------------------------------------------------------------------------------
# Helpers


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3)).astype(np.float32)


def _to_insightface(pixels: np.ndarray) -> np.ndarray:
    """NHWC pixels -> arcface_torch's NCHW (x - 127.5) / 127.5."""
    return np.ascontiguousarray(((np.float32(pixels) - 127.5) / 127.5).transpose(0, 3, 1, 2))


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_embed(path, nchw: np.ndarray) -> np.ndarray:
    sess = _ort(path)
    (inp,) = sess.get_inputs()
    return sess.run(None, {inp.name: np.ascontiguousarray(nchw, np.float32)})[0]


def _parity(out: np.ndarray, ref: np.ndarray, what: str) -> tuple[float, float]:
    """Worst cosine and worst relative L2 error over the rows; asserts the thresholds."""
    cos = float(np.min(np.sum(_l2(out) * _l2(ref), axis=1)))
    rel = float(np.max(np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)))
    print(f"{what}: min cosine {cos:.9f}, max relative error {rel:.2e}")
    assert cos >= COS_MIN and rel <= REL_MAX, (what, cos, rel)
    return cos, rel


def _count_parameters(model) -> int:
    """torch-style count: BatchNorm running statistics excluded."""
    return sum(int(np.prod(v.shape)) for v in model.weights if "moving_" not in v.path)


def _load_script(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _edit(src, dst, fn):
    """Load ``src``, let ``fn`` edit the ModelProto, check and save it as ``dst``."""
    import onnx

    model = onnx.load(str(src))
    fn(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


# ----------------------------------------------------------------------------------------------
# An insightface-format ONNX IResNet, written like torch.onnx.export of arcface_torch's IResNet


def make_insightface_iresnet_onnx(
    path,
    layers=(2, 2, 2, 2),
    embedding_size=512,
    seed=0,
    *,
    fold_features=False,
    unfolded=False,
    matmul=False,
):
    """Write an arcface_torch-style ONNX IResNet with random weights to ``path``.

    Default: what ``torch2onnx.py`` writes (opset 11, eval mode): each BN after a conv is
    folded into the conv's weight and bias; unit ``bn1``, head ``bn2`` and ``features`` are
    ``BatchNormalization`` nodes; ``PRelu`` slopes ``[C, 1, 1]``; ``Flatten`` + ``Gemm``
    (``transB=1``); input ``data`` ``[None, 3, 112, 112]``.

    Variants seen from other exporters / simplifiers: ``fold_features`` folds the features BN
    into the Gemm; ``unfolded`` keeps Conv -> BatchNormalization pairs (convs without bias) and
    adds Identity nodes; ``matmul`` uses Reshape + MatMul + Add instead of Flatten + Gemm.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    eps = 1e-5
    nodes, inits = [], []
    counter = iter(range(10**6))

    def tensor():
        return str(next(counter))

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(op, inputs, **attrs):
        out = tensor()
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(nodes)}", **attrs))
        return out

    def bn_params(c):
        return (
            rng.uniform(0.5, 1.0, c),  # weight
            rng.normal(0, 0.1, c),  # bias
            rng.normal(0, 0.1, c),  # running_mean
            rng.uniform(0.5, 1.5, c),  # running_var
        )

    def batch_norm(x, c, name, params=None):
        w, b, m, v = bn_params(c) if params is None else params
        names = [
            const(f"{name}.{k}", a) for k, a in zip(("weight", "bias", "mean", "var"), (w, b, m, v))
        ]
        return node("BatchNormalization", [x, *names], epsilon=eps, momentum=0.9)

    def conv_bn(x, cin, cout, k, stride, name):
        w = rng.normal(0, np.sqrt(2.0 / (k * k * cout)), (cout, cin, k, k))
        g, b, m, v = bn_params(cout)
        attrs = dict(
            dilations=[1, 1], group=1, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2
        )
        if unfolded:
            y = node("Conv", [x, const(f"{name}.weight", w)], **attrs)
            y = node("Identity", [y])
            return batch_norm(y, cout, f"{name}.bn", (g, b, m, v))
        scale = g / np.sqrt(v + eps)  # torch's eval-mode Conv+BN fusion
        wf = w * scale[:, None, None, None]
        bf = b - m * scale
        return node(
            "Conv",
            [x, const(f"onnx::Conv_{name}.w", wf), const(f"onnx::Conv_{name}.b", bf)],
            **attrs,
        )

    def prelu(x, c, name):
        return node("PRelu", [x, const(f"{name}.weight", rng.uniform(0.1, 0.4, (c, 1, 1)))])

    x = conv_bn("data", 3, 64, 3, 1, "conv1")
    x = prelu(x, 64, "prelu")
    cin = 64
    for s, (n, width) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
        for u in range(n):
            stride = 2 if u == 0 else 1
            name = f"layer{s}.{u}"
            y = batch_norm(x, cin, f"{name}.bn1")
            y = conv_bn(y, cin, width, 3, 1, f"{name}.conv1")
            y = prelu(y, width, f"{name}.prelu")
            y = conv_bn(y, width, width, 3, stride, f"{name}.conv2")
            shortcut = x
            if stride != 1 or cin != width:
                shortcut = conv_bn(x, cin, width, 1, stride, f"{name}.downsample")
            x = node("Add", [y, shortcut])
            cin = width
    x = batch_norm(x, 512, "bn2")
    fc_w = rng.normal(0, np.sqrt(1.0 / (512 * 49)), (embedding_size, 512 * 49))
    fc_b = rng.normal(0, 0.01, embedding_size)
    _, f_b, f_m, f_v = bn_params(embedding_size)
    f_w = np.ones(embedding_size)  # arcface_torch: features.weight fixed at 1.0
    if fold_features:
        scale = f_w / np.sqrt(f_v + eps)
        fc_w, fc_b = fc_w * scale[:, None], (fc_b - f_m) * scale + f_b
    if matmul:
        x = node("Reshape", [x, "flat_shape"])
        inits.append(numpy_helper.from_array(np.array([-1, 512 * 49], np.int64), "flat_shape"))
        x = node("MatMul", [x, const("fc.weight_t", fc_w.T)])
        x = node("Add", [const("fc.bias", fc_b), x])
    else:
        x = node("Flatten", [x], axis=1)
        x = node(
            "Gemm",
            [x, const("fc.weight", fc_w), const("fc.bias", fc_b)],
            alpha=1.0,
            beta=1.0,
            transB=1,
        )
    if not fold_features:
        x = batch_norm(x, embedding_size, "features", (f_w, f_b, f_m, f_v))
    graph = helper.make_graph(
        nodes,
        "iresnet",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["None", embedding_size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def probe(arcface_torch_dir) -> np.ndarray:
    """8 real ORL faces, float32 RGB 0..255 [8, 112, 112, 3]."""
    return np.load(arcface_torch_dir / "probe_faces.npy").astype(np.float32)


@pytest.fixture(scope="module")
def imported_mbf(arcface_torch_dir):
    from facerec_tf.onnx_import import load_insightface_onnx

    return load_insightface_onnx(arcface_torch_dir / "mbf.onnx")


@pytest.fixture(scope="module")
def insightface_r18(tmp_path_factory):
    path = tmp_path_factory.mktemp("insightface") / "r18.onnx"
    return make_insightface_iresnet_onnx(path, seed=1)


@pytest.fixture(scope="module")
def imported_r18(insightface_r18):
    from facerec_tf.onnx_import import load_insightface_onnx

    return load_insightface_onnx(insightface_r18)


TWIN_ARCHS = ("mbf_large", "ir_se10")


@pytest.fixture(scope="module")
def twins(tmp_path_factory, arcface_torch_dir):
    """``tests/torch_twin.py`` files for :data:`TWIN_ARCHS` (one torch process for all)."""
    from conftest import require_torch_python

    python = require_torch_python()
    out = tmp_path_factory.mktemp("twins")
    faces = arcface_torch_dir / "probe_faces.npy"
    calls = "; ".join(
        f"torch_twin.main(['--arch', {a!r}, '--out', {str(out)!r}, '--faces', {str(faces)!r}, "
        "'--steps', '1'])"
        for a in TWIN_ARCHS
    )
    code = f"import sys; sys.path.insert(0, {str(TWIN.parent)!r}); import torch_twin; {calls}"
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cli_exports(arcface_torch_dir, tmp_path_factory):
    """``tools/export.py --from-insightface-onnx`` of ``mbf.onnx`` to .keras and SavedModel."""
    out = tmp_path_factory.mktemp("cli")
    cli = _load_script(EXPORT_CLI, "facerec_export_cli_onnx_import")
    model = str(arcface_torch_dir / "mbf.onnx")
    common = ["--model", model, "--from-insightface-onnx"]
    assert cli.main([*common, "--output", str(out / "mbf.keras"), "--format", "keras"]) == 0
    assert cli.main([*common, "--output", str(out / "sm"), "--format", "saved_model"]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# Real arcface_torch files


@pytest.mark.parametrize(
    "name, layout",
    [("mbf", ((1, 4, 6, 2), 2, 512)), ("mbf_s1_b2231_e128", ((2, 2, 3, 1), 1, 128))],
)
def test_arcface_torch_mobilefacenet_matches_onnxruntime_and_torch(
    name, layout, arcface_torch_dir, probe
):
    from facerec_tf.onnx_import import load_insightface_onnx

    manifest = json.loads((arcface_torch_dir / "manifest.json").read_text())["models"][name]
    model = load_insightface_onnx(arcface_torch_dir / f"{name}.onnx")
    config = model.get_config()
    assert (tuple(config["stage_units"]), config["width_scale"], config["embedding_size"]) == (
        layout
    )
    assert config["include_preprocessing"] is True
    assert _count_parameters(model) == manifest["params"]  # arcface_torch's count
    out = model(probe, training=False).numpy()
    _parity(
        out,
        _ort_embed(arcface_torch_dir / f"{name}.onnx", _to_insightface(probe)),
        f"{name} vs ORT",
    )
    ref = np.load(arcface_torch_dir / f"{name}_eval_embeddings.npy")
    _parity(out, ref, f"{name} vs torch")


def test_include_preprocessing_false_takes_the_project_normalisation(arcface_torch_dir, probe):
    """A backbone without its preprocess layer takes (x - 127.5) / 128, like every such
    backbone here (the pipeline, trainer and export feed it that): the stem carries 128/127.5."""
    import onnx
    from onnx import numpy_helper

    from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
    from facerec_tf.onnx_import import STEM_RESCALE, load_insightface_onnx

    path = arcface_torch_dir / "mbf_s1_b2231_e128.onnx"
    layout = dict(embedding_size=128, stage_units=(2, 2, 3, 1), width_scale=1)
    raw = MobileFaceNetBackbone(include_preprocessing=False, **layout)
    assert load_insightface_onnx(path, backbone=raw) is raw
    normalised = (probe - 127.5) / 128.0
    _parity(raw(normalised, training=False).numpy(), _ort_embed(path, _to_insightface(probe)),
            "include_preprocessing=False vs ORT")  # fmt: skip
    graph = onnx.load(str(path)).graph
    stem = next(n for n in graph.node if n.op_type == "Conv")
    weight = next(numpy_helper.to_array(i) for i in graph.initializer if i.name == stem.input[1])
    kernel = weight.transpose(2, 3, 1, 0)
    np.testing.assert_allclose(
        raw.get_layer("stem_conv").kernel.numpy(), kernel * STEM_RESCALE, rtol=1e-6
    )
    default = load_insightface_onnx(path)  # pixels in: the same stem, preprocess layer before
    np.testing.assert_array_equal(
        default.get_layer("stem_conv").kernel.numpy(), raw.get_layer("stem_conv").kernel.numpy()
    )


def test_a_backbone_of_another_layout_is_refused(arcface_torch_dir):
    from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
    from facerec_tf.onnx_import import OnnxImportError, load_insightface_onnx

    with pytest.raises(OnnxImportError, match=r"stage_units=\(2, 2, 3, 1\), width_scale=1"):
        load_insightface_onnx(arcface_torch_dir / "mbf_s1_b2231_e128.onnx", MobileFaceNetBackbone())


def _pytorch18_style(model) -> None:
    """What a PyTorch 1.8 export looks like: input ``input.1`` with a fixed batch of 1, nodes
    named ``Conv_0`` ..., ``Flatten`` + ``Gemm`` head, ``Identity`` nodes, constants as
    ``Constant`` nodes, and BatchNorms left after their convs (no Conv+BN folding)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    old = g.input[0].name
    g.input[0].name = "input.1"
    g.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    nodes = []
    for node in g.node:
        node.input[:] = ["input.1" if n == old else n for n in node.input]
        if node.op_type == "Conv" and len(node.input) == 3:  # unfold: conv, then BN(+bias)
            bias = inits[node.input[2]]
            out, mid = node.output[0], node.output[0] + "_unfolded"
            del node.input[2]
            node.output[0] = mid
            c = bias.shape[0]
            for key, value in (("s", np.ones(c)), ("m", np.zeros(c)), ("v", np.full(c, 0.99))):
                g.initializer.append(
                    numpy_helper.from_array(value.astype(np.float32), f"{out}_{key}")
                )
            g.initializer.append(
                numpy_helper.from_array(np.float32(bias * np.sqrt(0.99 + 1e-5)), out + "_b")
            )
            bn = helper.make_node(
                "BatchNormalization",
                [mid, f"{out}_s", out + "_b", f"{out}_m", f"{out}_v"],
                [out],
                epsilon=1e-5,
            )
            nodes += [node, bn]
            continue
        nodes.append(node)
    # Shape/Gather/Unsqueeze/Concat/Reshape -> Flatten; MatMul -> Gemm(transB=1)
    reshape = next(n for n in nodes if n.op_type == "Reshape")
    flat = helper.make_node("Flatten", [reshape.input[0]], [reshape.output[0]], axis=1)
    drop = {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Constant"}
    nodes = [flat if n is reshape else n for n in nodes if n is reshape or n.op_type not in drop]
    matmul = next(n for n in nodes if n.op_type == "MatMul")
    weight = inits[matmul.input[1]]
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), "fc.weight"))
    gemm = helper.make_node("Gemm", [matmul.input[0], "fc.weight"], matmul.output, transB=1)
    nodes = [gemm if n is matmul else n for n in nodes]
    # an Identity after the stem and the stem's PReLU slopes as a Constant node
    prelu = next(n for n in nodes if n.op_type == "PRelu")
    slope = next(i for i in g.initializer if i.name == prelu.input[1])
    const = helper.make_node("Constant", [], ["stem_slope"], value=slope)
    prelu.input[1] = "stem_slope"
    ident = helper.make_node("Identity", [prelu.input[0]], ["stem_identity"])
    prelu.input[0] = "stem_identity"
    at = nodes.index(prelu)
    nodes[at:at] = [const, ident]
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type}_{i}"
    del g.node[:]
    g.node.extend(nodes)


def test_pytorch18_style_graph(arcface_torch_dir, probe, tmp_path):
    from facerec_tf.onnx_import import load_insightface_onnx

    path = _edit(
        arcface_torch_dir / "mbf_s1_b2231_e128.onnx", tmp_path / "v18.onnx", _pytorch18_style
    )
    model = load_insightface_onnx(path)
    assert tuple(model.get_config()["stage_units"]) == (2, 2, 3, 1)
    ref = np.concatenate([_ort_embed(path, _to_insightface(probe[i : i + 1])) for i in range(8)])
    _parity(model(probe, training=False).numpy(), ref, "PyTorch 1.8-style graph vs ORT")


def test_prelu_slopes_given_as_vectors(arcface_torch_dir, tmp_path):
    """``[C]`` slopes (as some simplifiers write them) parse to the same values as
    ``[C, 1, 1]`` (parse only: onnxruntime would broadcast ``[C]`` over W)."""
    import onnx
    from onnx import numpy_helper

    from facerec_tf.onnx_import import parse_insightface_onnx

    src = arcface_torch_dir / "mbf_s1_b2231_e128.onnx"

    def flatten_slopes(model):
        for i, init in enumerate(model.graph.initializer):
            value = numpy_helper.to_array(init)
            if value.ndim == 3 and value.shape[1:] == (1, 1):
                model.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(value.reshape(-1), init.name)
                )

    model = onnx.load(str(src))
    flatten_slopes(model)
    path = tmp_path / "vector_slopes.onnx"
    onnx.save(model, str(path))
    got, want = parse_insightface_onnx(path), parse_insightface_onnx(src)
    for a, b in [(got.stem, want.stem), (got.conv_sep, want.conv_sep)] + [
        (u.dw, v.dw) for u, v in zip(got.units, want.units)
    ]:
        np.testing.assert_array_equal(a.prelu, b.prelu)
        assert a.prelu.shape == (a.out_channels,)


def _normalise_in_graph(ops) -> callable:
    """An edit that feeds the input through ``ops`` = [(op_type, constant), ...] first."""
    from onnx import helper, numpy_helper

    def edit(model):
        g = model.graph
        old = g.input[0].name
        x = "input.1"
        new = []
        for i, (op, value) in enumerate(ops):
            g.initializer.append(numpy_helper.from_array(np.float32(value), f"norm_{i}"))
            out = old if i == len(ops) - 1 else f"norm_out_{i}"
            new.append(helper.make_node(op, [x, f"norm_{i}"], [out], name=f"{op}_norm{i}"))
            x = out
        g.input[0].name = "input.1"
        nodes = [*new, *g.node]
        del g.node[:]
        g.node.extend(nodes)

    return edit


def test_in_graph_normalisation_is_folded_into_the_stem(arcface_torch_dir, probe, tmp_path):
    """Sub 127.5 then a per-channel Mul: fed pixels, folded exactly (centred on 127.5)."""
    from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
    from facerec_tf.onnx_import import load_insightface_onnx

    scale = np.array([1 / 127.5, 1 / 128, 1 / 100], np.float32).reshape(1, 3, 1, 1)
    edit = _normalise_in_graph([("Sub", 127.5), ("Mul", scale)])
    path = _edit(arcface_torch_dir / "mbf_s1_b2231_e128.onnx", tmp_path / "norm.onnx", edit)
    ref = _ort_embed(path, np.ascontiguousarray(probe.transpose(0, 3, 1, 2)))  # pixels in
    model = load_insightface_onnx(path)
    _parity(model(probe, training=False).numpy(), ref, "in-graph normalisation vs ORT")
    raw = MobileFaceNetBackbone(
        embedding_size=128, stage_units=(2, 2, 3, 1), width_scale=1, include_preprocessing=False
    )
    load_insightface_onnx(path, backbone=raw)  # fed (x - 127.5) / 128
    normalised = (probe - 127.5) / 128.0
    _parity(raw(normalised, training=False).numpy(), ref, "include_preprocessing=False, in-graph")


def test_off_centre_normalisation_is_refused_naming_the_node(arcface_torch_dir, probe, tmp_path):
    """ImageNet means: zero padding differs between the conventions, so no exact fold behind
    our (x - 127.5) / 128, with or without the preprocess layer."""
    from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
    from facerec_tf.onnx_import import OnnxImportError, load_insightface_onnx

    mean = np.array([123.675, 116.28, 103.53], np.float32).reshape(1, 3, 1, 1)
    edit = _normalise_in_graph([("Sub", mean), ("Div", 58.0)])
    path = _edit(arcface_torch_dir / "mbf_s1_b2231_e128.onnx", tmp_path / "imagenet.onnx", edit)
    with pytest.raises(OnnxImportError) as info:
        load_insightface_onnx(path)
    assert "node 'Sub_norm0' (Sub): the input normalisation maps pixel 127.5 to" in str(info.value)
    raw = MobileFaceNetBackbone(
        embedding_size=128, stage_units=(2, 2, 3, 1), width_scale=1, include_preprocessing=False
    )
    with pytest.raises(OnnxImportError, match=r"maps pixel 127\.5 to"):
        load_insightface_onnx(path, backbone=raw)


def _break(model, op_type, index, new_op):
    node = [n for n in model.graph.node if n.op_type == op_type][index]
    node.op_type = new_op
    del node.input[1:]
    return node.name


def test_unmappable_graph_is_refused_naming_the_node(arcface_torch_dir, tmp_path):
    from facerec_tf.onnx_import import OnnxImportError, parse_insightface_onnx

    names = {}
    path = _edit(
        arcface_torch_dir / "mbf.onnx",
        tmp_path / "relu.onnx",
        lambda m: names.update(victim=_break(m, "PRelu", 5, "Relu")),
    )
    with pytest.raises(OnnxImportError) as info:
        parse_insightface_onnx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: node ")
    assert (
        "(expected MobileFaceNet unit 2: the 3x3 depthwise conv: followed by a single PRelu)"
        in (message)
    )
    assert f"its output feeds '{names['victim']}' (Relu)" in message

    def stride3(model):
        conv = model.graph.node[0]
        next(a for a in conv.attribute if a.name == "strides").ints[:] = [3, 3]

    path = _edit(arcface_torch_dir / "mbf.onnx", tmp_path / "stride3.onnx", stride3)
    with pytest.raises(OnnxImportError, match=r"node '/layers.0/layers/layers.0/Conv' \(Conv\): "
                       r"stride 3 \(expected the stem conv: stride 1 \(IResNet\) or 2"):  # fmt: skip
        parse_insightface_onnx(path)


def test_cli_refuses_an_unmappable_graph_with_exit_2(arcface_torch_dir, tmp_path):
    path = _edit(
        arcface_torch_dir / "mbf.onnx",
        tmp_path / "relu.onnx",
        lambda m: _break(m, "PRelu", 5, "Relu"),
    )
    out = tmp_path / "out.keras"
    run = subprocess.run(
        [sys.executable, str(EXPORT_CLI), "--model", str(path), "--from-insightface-onnx",
         "--output", str(out), "--format", "keras"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "node '/layers.3/layers/layers.0/layers/layers.1" in lines[0]
    assert "(Relu)" in lines[0] and "Traceback" not in run.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["relu.onnx"]


# ----------------------------------------------------------------------------------------------
# tools/export.py and evaluate.py on an imported arcface_torch MobileFaceNet


def test_cli_keras_import_matches_onnxruntime(cli_exports, arcface_torch_dir, probe):
    import keras

    import facerec_tf.models  # noqa: F401  (registers the classes)

    model = keras.saving.load_model(cli_exports / "mbf.keras", compile=False)
    assert model.name == "mobilefacenet"
    ref = _ort_embed(arcface_torch_dir / "mbf.onnx", _to_insightface(probe))
    _parity(model(probe, training=False).numpy(), ref, "tools/export.py .keras vs ORT")


def test_cli_saved_model_gives_the_same_embeddings(cli_exports, arcface_torch_dir, probe):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(cli_exports / "sm"))
    out = loaded.signatures["serving_default"](images=tf.constant(probe))["embedding"].numpy()
    ref = _l2(_ort_embed(arcface_torch_dir / "mbf.onnx", _to_insightface(probe)))
    _parity(out, ref, "SavedModel of the import vs ORT (L2-normalised)")


def _ten_fold_accuracy(emb: np.ndarray, issame: np.ndarray):
    """insightface's protocol written out: squared L2 distance of the normalised flip-sum
    embeddings, 10 consecutive folds, best threshold of arange(0, 4, 0.01) on the other 9."""
    dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
    thresholds = np.arange(0, 4, 0.01)
    folds = np.array_split(np.arange(len(issame)), 10)
    accs, best = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(issame)), test)
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < t) == issame[test]))
        best.append(t)
    return float(np.mean(accs)), float(np.std(accs)), float(np.mean(best))


@pytest.mark.slow
def test_evaluate_on_the_import_scores_like_onnxruntime(arcface_torch_dir, rec_dir, tmp_path):
    """evaluate.py on the .keras that tools/export.py imports (the scale-1 MobileFaceNet, for
    speed) against onnxruntime on the ONNX file, on the 300 Yale pairs."""
    from facerec_tf.data.verification_bin import decode_pairs, load_bin

    onnx_path = arcface_torch_dir / "mbf_s1_b2231_e128.onnx"
    keras_path = tmp_path / "mbf_s1.keras"
    cli = _load_script(EXPORT_CLI, "facerec_export_cli_onnx_evaluate")
    args = ["--model", str(onnx_path), "--from-insightface-onnx", "--output", str(keras_path)]
    assert cli.main([*args, "--format", "keras"]) == 0
    pairs = rec_dir / "yale_pairs_py2.bin"
    report = tmp_path / "report.json"
    evaluate = _load_script(EVALUATE_CLI, "facerec_evaluate_cli_onnx_import")
    args = ["--model", str(keras_path), "--bin", str(pairs), "--report", str(report)]
    assert evaluate.main([*args, "--batch-size", "100"]) == 0
    got = json.loads(report.read_text())["yale_pairs_py2"]
    # independent: onnxruntime on the file itself, flip-sum, L2, 10 folds
    vset = load_bin(pairs)
    images = decode_pairs(vset).astype(np.float32)
    emb = _ort_embed(onnx_path, _to_insightface(images))
    flipped = _ort_embed(onnx_path, _to_insightface(images[:, :, ::-1]))
    xnorm = np.mean(np.linalg.norm(np.concatenate([emb, flipped]), axis=1))
    acc, std, threshold = _ten_fold_accuracy(_l2(emb + flipped), np.asarray(vset.issame, bool))
    print(f"evaluate.py: accuracy {got['accuracy']:.5f}, onnxruntime {acc:.5f}")
    assert (got["accuracy"], got["accuracy_std"], got["best_threshold"]) == pytest.approx(
        (acc, std, threshold), abs=1e-12
    )
    assert got["xnorm"] == pytest.approx(xnorm, rel=1e-4)
    assert got["num_pairs"] == 300


def test_imported_model_exports_to_onnx_with_insightface_interface(
    arcface_torch_dir, probe, tmp_path
):
    """Round trip: import, then export with insightface's interface: the new file equals the
    original under onnxruntime."""
    pytest.importorskip("tf2onnx")
    cli = _load_script(EXPORT_CLI, "facerec_export_cli_onnx_round_trip")
    src = arcface_torch_dir / "mbf_s1_b2231_e128.onnx"
    out = tmp_path / "round_trip.onnx"
    status = cli.main(["--model", str(src), "--from-insightface-onnx", "--output", str(out),
                       "--format", "onnx", "--insightface-onnx"])  # fmt: skip
    assert status == 0
    x = _to_insightface(probe)
    _parity(_ort_embed(out, x), _ort_embed(src, x), "re-exported ONNX vs original (ORT)")


# ----------------------------------------------------------------------------------------------
# Files written by torch (tests/torch_twin.py): mbf_large, IR-SE, IResNet


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, expected",
    [
        ("mbf_large", {"stage_units": (2, 8, 12, 4), "width_scale": 4, "embedding_size": 512}),
        ("ir_se10", {"depth": 10, "se": True, "se_ratio": 16, "embedding_size": 512}),
    ],
)
def test_torch_written_files_match_onnxruntime_and_torch(twins, arch, expected):
    from facerec_tf.onnx_import import load_insightface_onnx

    path = twins / f"{arch}.onnx"
    model = load_insightface_onnx(path)
    config = model.get_config()
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in expected}
    assert got == expected
    meta = json.loads((twins / f"{arch}.json").read_text())
    assert _count_parameters(model) == meta["params"]  # torch's count
    probe = np.load(twins / f"{arch}_probe.npy").astype(np.float32)
    out = model(probe, training=False).numpy()
    _parity(out, _ort_embed(path, _to_insightface(probe)), f"{arch} vs ORT")
    _parity(out, np.load(twins / f"{arch}_eval.npy"), f"{arch} vs torch")


# ----------------------------------------------------------------------------------------------
# IResNet written node by node, module structure


def test_import_cycle_is_gone():
    """onnx_import imports nothing from export (export imports onnx_import lazily)."""
    import ast

    tree = ast.parse((ROOT / "facerec_tf" / "onnx_import.py").read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert "facerec_tf.export" not in imported and "facerec_tf._optional" in imported


def test_missing_onnx_names_the_extra(monkeypatch, tmp_path):
    from facerec_tf.errors import MissingDependencyError
    from facerec_tf.onnx_import import parse_insightface_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(MissingDependencyError, match=r"install the 'onnx' extra"):
        parse_insightface_onnx(tmp_path / "x.onnx")


# ----------------------------------------------------------------------------------------------
# insightface ONNX IResNet written node by node (as torch2onnx.py exports it)


def test_import_insightface_onnx_matches_onnxruntime(insightface_r18, imported_r18):
    sess = _ort(insightface_r18)
    assert imported_r18.name == "iresnet18"
    x = _pixels(4, seed=5)
    ref = sess.run(None, {"data": _to_insightface(x)})[0]
    out = imported_r18(x, training=False).numpy()
    diff = np.abs(out - ref).max()
    scale = np.abs(ref).max()
    print(f"insightface ONNX import: max abs diff {diff:.2e}, relative {diff / scale:.2e}")
    assert diff <= 1e-3 * scale
    cos = np.sum(_l2(out) * _l2(ref), axis=1)
    assert np.all(cos > 1 - 1e-6)


def test_import_variants_into_an_existing_backbone(imported_r18, tmp_path):
    """Unfolded Conv->BN, features folded into the fc, Reshape + MatMul + Add, Identity."""
    from facerec_tf.onnx_import import load_insightface_onnx

    path = make_insightface_iresnet_onnx(
        tmp_path / "variant.onnx", seed=2, fold_features=True, unfolded=True, matmul=True
    )
    model = load_insightface_onnx(path, backbone=imported_r18)
    assert model is imported_r18
    x = _pixels(2, seed=6)
    ref = _ort(path).run(None, {"data": _to_insightface(x)})[0]
    diff = np.abs(model(x, training=False).numpy() - ref).max()
    print(f"insightface ONNX import (variant graph): max abs diff {diff:.2e}")
    assert diff <= 1e-3 * np.abs(ref).max()


def test_import_rejects_a_non_iresnet_naming_the_node(insightface_r18, tmp_path):
    import onnx

    from facerec_tf.onnx_import import OnnxImportError, parse_insightface_onnx

    model = onnx.load(str(insightface_r18))
    prelus = [n for n in model.graph.node if n.op_type == "PRelu"]
    victim = prelus[3]  # a unit's PReLU becomes a ReLU
    victim.op_type = "Relu"
    del victim.input[1]
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(OnnxImportError) as info:
        parse_insightface_onnx(path)
    assert info.value.node is not None
    assert victim.name in str(info.value) and "PRelu" in str(info.value)
    assert str(path) in str(info.value)


def _global_average_pool(model) -> None:
    """ReduceMean(axes=[2, 3]) -> GlobalAveragePool, as nn.AdaptiveAvgPool2d(1) exports."""
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            node.op_type = "GlobalAveragePool"
            del node.attribute[:]


@pytest.mark.slow
def test_ir_se_variants(twins, tmp_path):
    """The SE pool as GlobalAveragePool imports the same; an SE block missing from one unit
    is refused naming that unit's Add."""
    from facerec_tf.onnx_import import OnnxImportError, load_insightface_onnx

    src = twins / "ir_se10.onnx"
    path = _edit(src, tmp_path / "gap.onnx", _global_average_pool)
    probe = np.load(twins / "ir_se10_probe.npy").astype(np.float32)
    model = load_insightface_onnx(path)
    assert model.get_config()["se_ratio"] == 16
    _parity(model(probe, training=False).numpy(), _ort_embed(src, _to_insightface(probe)),
            "ir_se10 (GlobalAveragePool) vs ORT")  # fmt: skip

    def drop_last_se(m):  # the last unit adds bn3 directly, without its SE nodes
        mul = [n for n in m.graph.node if n.op_type == "Mul"][-1]
        add = next(n for n in m.graph.node if n.op_type == "Add" and mul.output[0] in n.input)
        add.input[list(add.input).index(mul.output[0])] = mul.input[0]
        keep = [n for n in m.graph.node if not n.name.startswith("/layer4/layer4.0/se_module/")]
        del m.graph.node[:]
        m.graph.node.extend(keep)

    path = _edit(src, tmp_path / "no_se.onnx", drop_last_se)
    with pytest.raises(OnnxImportError) as info:
        load_insightface_onnx(path)
    message = str(info.value)
    assert "'/layer4/layer4.0/Add' (Add): stage 4 unit 1 has no SE block" in message, message
