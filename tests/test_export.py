"""Exports (SavedModel with two signatures, TF Serving layout, ONNX in both interfaces,
``.keras``), the insightface ONNX importer and ``tools/export.py``.

The export tests use a MobileFaceNet (fast to convert) whose BatchNorm statistics and PReLU
slopes are randomised, so the parity checks exercise every parameter; each export is made
once per module. The importer is tested on an ONNX IResNet-18 that this module writes with
``onnx.helper`` exactly as arcface_torch's ``torch2onnx.py`` exports one (eval mode, BN after a
conv folded into it, pre-conv BNs kept, PReLU slopes ``[C, 1, 1]``, Flatten + Gemm).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "export.py"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

SAVED_MODEL_TOL = 1e-5
ONNX_TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# Helpers


def _randomise(model, seed: int = 0) -> None:
    """Random BN statistics/affine and PReLU slopes, then scale the last BN so that the raw
    embedding has unit spread (as in a trained model) and absolute tolerances mean something."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            if layer.gamma is not None and layer.name != "features":
                layer.gamma.assign(rng.uniform(0.7, 1.3, c).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.1, c).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.6, 1.6, c).astype(np.float32))
        elif isinstance(layer, keras.layers.PReLU):
            layer.alpha.assign(rng.uniform(0.1, 0.4, layer.alpha.shape).astype(np.float32))
    x = rng.uniform(0, 255, (4, *model.input_shape[1:])).astype(np.float32)
    spread = float(np.std(model(x, training=False).numpy()))
    features = model.get_layer("features")
    eps = features.epsilon
    features.moving_variance.assign((features.moving_variance.numpy() + eps) * spread**2 - eps)
    features.beta.assign(features.beta.numpy() / spread)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3)).astype(np.float32)


def _to_insightface(pixels: np.ndarray) -> np.ndarray:
    """NHWC pixels -> insightface's NCHW (x - 127.5) / 127.5."""
    return np.ascontiguousarray(((pixels - 127.5) / 127.5).transpose(0, 3, 1, 2))


def _ort(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _load_cli():
    spec = importlib.util.spec_from_file_location("facerec_export_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
# Fixtures (module scope: each export is made once)


@pytest.fixture(scope="module")
def backbone():
    from facerec_tf.models import create_backbone

    model = create_backbone("mobilefacenet")
    _randomise(model)
    return model


@pytest.fixture(scope="module")
def faces(rec_dir):
    """8 real 112x112 faces: (JPEG bytes, decoded float32 RGB [8, 112, 112, 3])."""
    from facerec_tf.data.verification_bin import decode_pairs, load_bin

    vset = load_bin(rec_dir / "yale_pairs_py3.bin")
    return vset.jpeg_bytes[:8], decode_pairs(vset)[:8].astype(np.float32)


@pytest.fixture(scope="module")
def serving_dir(backbone, tmp_path_factory):
    from facerec_tf.export import export_for_serving

    base = tmp_path_factory.mktemp("serving")
    return base, export_for_serving(backbone, base, model_name="facerec", version=1)


@pytest.fixture(scope="module")
def saved_model_cli(serving_dir):
    """``saved_model_cli show --all`` started right after the export; runs in the background
    (it is mostly the TensorFlow import) while the in-process tests go on."""
    exe = pathlib.Path(sys.executable).with_name("saved_model_cli")
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    )
    proc = subprocess.Popen(
        [*cmd, "show", "--all", "--dir", serving_dir[1]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def loaded(serving_dir, saved_model_cli):
    import tensorflow as tf

    return tf.saved_model.load(serving_dir[1])


@pytest.fixture(scope="module")
def onnx_files(backbone, tmp_path_factory):
    pytest.importorskip("tf2onnx")
    from facerec_tf.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    return (
        export_onnx(backbone, folder / "facerec.onnx"),
        export_onnx(backbone, folder / "insightface.onnx", insightface_interface=True),
    )


@pytest.fixture(scope="module")
def insightface_r18(tmp_path_factory):
    pytest.importorskip("onnx")
    path = tmp_path_factory.mktemp("insightface") / "r18.onnx"
    return make_insightface_iresnet_onnx(path, seed=1)


@pytest.fixture(scope="module")
def imported_r18(insightface_r18):
    from facerec_tf.onnx_import import load_insightface_onnx

    return load_insightface_onnx(insightface_r18)


# ----------------------------------------------------------------------------------------------
# SavedModel


def test_serving_layout_and_signatures(serving_dir, loaded):
    import tensorflow as tf

    base, path = serving_dir
    assert path == os.path.join(base, "facerec", "1")
    assert os.path.isfile(os.path.join(base, "facerec", "1", "saved_model.pb"))
    assert os.path.isdir(os.path.join(base, "facerec", "1", "variables"))
    assert os.listdir(os.path.join(base, "facerec")) == ["1"]  # no temporary left behind
    assert set(loaded.signatures) == {"serving_default", "serve_jpeg"}
    images = loaded.signatures["serving_default"]
    jpeg = loaded.signatures["serve_jpeg"]
    (spec,) = images.structured_input_signature[1].values()
    assert (spec.name, spec.dtype, spec.shape.as_list()) == (
        "images",
        tf.float32,
        [None, 112, 112, 3],
    )
    (spec,) = jpeg.structured_input_signature[1].values()
    assert (spec.name, spec.dtype, spec.shape.as_list()) == ("jpeg_bytes", tf.string, [None])
    for fn in (images, jpeg):
        assert list(fn.structured_outputs) == ["embedding"]
        assert fn.structured_outputs["embedding"].shape.as_list() == [None, 512]


def test_export_for_serving_refuses_an_existing_version(backbone, serving_dir):
    from facerec_tf.export import ExportError, export_for_serving

    with pytest.raises(ExportError, match="already exists"):
        export_for_serving(backbone, serving_dir[0], model_name="facerec", version=1)
    with pytest.raises(ExportError, match="non-negative integer"):
        export_for_serving(backbone, serving_dir[0], version=-1)


def test_serving_default_matches_keras_on_faces(backbone, loaded, faces):
    _, images = faces
    ref = _l2(backbone(images, training=False).numpy())
    out = loaded.signatures["serving_default"](images=images)["embedding"].numpy()
    diff = np.abs(out - ref).max()
    print(f"serving_default vs Keras, 8 Yale faces: max abs diff {diff:.2e}")
    assert diff <= SAVED_MODEL_TOL
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_serve_jpeg_matches_keras_on_faces(backbone, loaded, faces):
    import tensorflow as tf

    jpegs, images = faces
    ref = _l2(backbone(images, training=False).numpy())
    out = loaded.signatures["serve_jpeg"](jpeg_bytes=tf.constant(jpegs))["embedding"].numpy()
    diff = np.abs(out - ref).max()
    print(f"serve_jpeg vs Keras on the decoded faces: max abs diff {diff:.2e}")
    assert diff <= SAVED_MODEL_TOL


def test_serve_jpeg_rejects_a_wrong_size(loaded, faces):
    import tensorflow as tf

    jpegs, images = faces
    small = tf.io.encode_jpeg(tf.cast(images[0, :100], tf.uint8)).numpy()  # 100x112
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures["serve_jpeg"](jpeg_bytes=tf.constant([jpegs[0], small]))
    message = info.value.message
    assert "serve_jpeg: every JPEG must decode to 112x112 pixels" in message
    assert "[100 112]" in message


def test_saved_model_cli_shows_both_signatures(saved_model_cli):
    out, err = saved_model_cli.communicate(timeout=120)
    assert saved_model_cli.returncode == 0, err[-2000:]
    for text in (
        "signature_def['serving_default']",
        "signature_def['serve_jpeg']",
        "inputs['images']",
        "inputs['jpeg_bytes']",
        "outputs['embedding']",
    ):
        assert text in out


def test_atomic_dir_keeps_the_old_export_on_failure(tmp_path):
    from facerec_tf.export import _atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), _atomic_dir(target) as tmp:
        pathlib.Path(tmp, "new.txt").write_text("half")
        raise RuntimeError("writer failed")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert os.listdir(target) == ["old.txt"]
    with _atomic_dir(target) as tmp:
        pathlib.Path(tmp, "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert os.listdir(target) == ["new.txt"]


# ----------------------------------------------------------------------------------------------
# ONNX export


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_tf(backbone, onnx_files, batch):
    sess = _ort(onnx_files[0])
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.shape) == ("images", ["N", 112, 112, 3])
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    x = _pixels(batch, seed=batch)
    ref = _l2(backbone(x, training=False).numpy())
    out = sess.run(None, {"images": x})[0]
    diff = np.abs(out - ref).max()
    print(f"ONNX (NHWC, L2) vs TF, batch {batch}: max abs diff {diff:.2e}")
    assert out.shape == (batch, 512)
    assert diff <= ONNX_TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_insightface_interface_matches_tf(backbone, onnx_files, batch):
    import onnx

    sess = _ort(onnx_files[1])
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.shape) == ("data", ["N", 3, 112, 112])
    x = _pixels(batch, seed=10 + batch)
    ref = backbone(x, training=False).numpy()  # raw, not normalised
    out = sess.run(None, {"data": _to_insightface(x)})[0]
    diff = np.abs(out - ref).max()
    print(
        f"ONNX (insightface NCHW, raw) vs TF, batch {batch}: max abs diff {diff:.2e} "
        f"(output max {np.abs(ref).max():.2f})"
    )
    assert diff <= ONNX_TOL
    # insightface.model_zoo assumes normalisation inside the graph when one of its first 8
    # node names starts with Sub and one with Mul; ours must not look like that.
    names = [n.name for n in onnx.load(onnx_files[1]).graph.node[:8]]
    assert not (
        any(n.startswith(("Sub", "_minus")) for n in names)
        and any(n.startswith(("Mul", "_mul")) for n in names)
    )


def test_onnx_missing_dependency_names_the_extra(backbone, tmp_path, monkeypatch):
    from facerec_tf.export import MissingDependencyError, export_onnx

    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # makes `import tf2onnx` fail
    with pytest.raises(MissingDependencyError, match=r"'onnx' extra"):
        export_onnx(backbone, tmp_path / "x.onnx")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------
# insightface ONNX import


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


# ----------------------------------------------------------------------------------------------
# .keras export and tools/export.py


def test_cli_help():
    out = subprocess.run(
        [sys.executable, str(CLI), "--help"], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert out.returncode == 0, out.stderr
    for text in ("examples:", "--from-insightface-onnx", "--insightface-onnx", "--model-name"):
        assert text in out.stdout


def test_cli_missing_model_exits_2(tmp_path):
    missing = tmp_path / "nope" / "backbone.keras"
    out = subprocess.run(
        [
            sys.executable,
            str(CLI),
            "--model",
            str(missing),
            "--output",
            str(tmp_path / "o"),
            "--format",
            "keras",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert out.returncode == 2
    assert str(missing) in out.stderr and "not found" in out.stderr
    assert not (tmp_path / "o").exists()


def test_resolve_model_path_in_a_run_folder(tmp_path):
    from facerec_tf.export import resolve_model_path

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "backbone.keras").write_bytes(b"")
    assert resolve_model_path(run) == str(run / "export" / "backbone.keras")
    (run / "best").mkdir()
    (run / "best" / "backbone.keras").write_bytes(b"")
    assert resolve_model_path(run) == str(run / "best" / "backbone.keras")
    with pytest.raises(FileNotFoundError, match=r"neither best/backbone\.keras"):
        resolve_model_path(tmp_path)


def test_cli_converts_a_run_folder_to_keras(backbone, tmp_path):
    import keras

    from facerec_tf.export import export_keras

    run = tmp_path / "run"
    export_keras(backbone, run / "export" / "backbone.keras")
    assert os.listdir(run / "export") == ["backbone.keras"]
    out = tmp_path / "out"
    status = _load_cli().main(
        ["--model", str(run), "--output", str(out), "--format", "keras", "--model-name", "mbf"]
    )
    assert status == 0
    reloaded = keras.saving.load_model(out / "mbf.keras", compile=False)
    x = _pixels(2, seed=7)
    np.testing.assert_array_equal(
        reloaded(x, training=False).numpy(), backbone(x, training=False).numpy()
    )
    shutil.rmtree(run)
