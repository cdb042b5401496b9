"""Exports (SavedModel with two signatures, TF Serving layout, ONNX in both interfaces,
``.keras``) and ``tools/export.py`` (the insightface ONNX importer: ``test_onnx_import.py``).

The export tests use a MobileFaceNet (fast to convert) whose BatchNorm statistics and PReLU
slopes are randomised, so the parity checks exercise every parameter; each export is made
once per module.
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


# ----------------------------------------------------------------------------------------------
# SavedModel


def test_serving_layout_and_signatures(serving_dir, loaded):
    base, path = serving_dir
    assert path == os.path.join(base, "facerec", "1")
    assert os.path.isfile(os.path.join(base, "facerec", "1", "saved_model.pb"))
    assert os.path.isdir(os.path.join(base, "facerec", "1", "variables"))
    assert os.listdir(os.path.join(base, "facerec")) == ["1"]  # no temporary left behind
    images, jpeg = assert_serving_signatures(loaded)
    for fn in (images, jpeg):
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


def assert_serving_signatures(loaded):
    """The two TF Serving signatures of an exported SavedModel, their inputs and float32
    ``embedding`` output checked; returns ``(serving_default, serve_jpeg)``."""
    import tensorflow as tf

    assert set(loaded.signatures) == {"serving_default", "serve_jpeg"}
    images, jpeg = loaded.signatures["serving_default"], loaded.signatures["serve_jpeg"]
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
        assert fn.structured_outputs["embedding"].dtype == tf.float32
    return images, jpeg
