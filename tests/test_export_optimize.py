"""The inference-optimised SavedModel export (``facerec_tf.export_optimize``): BatchNorms folded
away, float32 parity with the Keras graph on real faces, bfloat16 export against float32 on
the Yale verification pairs, unchanged signatures and the image-size check of
``serving_default``.

The models are an IResNet-10 (every unit has the pre-conv ``bn1`` folded through a border
bias map, and the head BN folded into the dense layer) and a MobileFaceNet (depthwise and
grouped convolutions), with randomised BatchNorm statistics and PReLU slopes so that every
folded parameter matters.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_export import _l2, _randomise, assert_serving_signatures

# Relative tolerance of the float32 folded graph against the Keras graph (the bar).
FOLD_TOL = 1e-5
BF16_MIN_COSINE = 0.999
BF16_MAX_ACCURACY_DROP = 0.005
MODELS = ("iresnet10", "mobilefacenet")


@pytest.fixture(scope="module")
def yale(rec_dir):
    """The 300 Yale verification pairs: (JPEG bytes, float32 RGB [600, 112, 112, 3], issame)."""
    from facerec_tf.data.verification_bin import decode_pairs, load_bin

    vset = load_bin(rec_dir / "yale_pairs_py3.bin")
    return vset.jpeg_bytes, decode_pairs(vset).astype(np.float32), np.asarray(vset.issame)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    from facerec_tf.models import create_backbone

    backbone = create_backbone(request.param)
    _randomise(backbone, seed=3)
    return backbone


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """``{precision: loaded SavedModel}`` for float32 and bfloat16 exports of ``model``."""
    import tensorflow as tf

    from facerec_tf.export import export_saved_model

    folder = tmp_path_factory.mktemp(f"optimized_{model.name}")
    out = {}
    for precision in ("float32", "bfloat16"):
        path = export_saved_model(model, folder / precision, precision=precision)
        out[precision] = (path, tf.saved_model.load(path))
    return out


def _op_types(saved_model_dir) -> dict[str, list]:
    """``{op type: [node defs]}`` over every function of the SavedModel's graph."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(f"{saved_model_dir}/saved_model.pb", "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    ops: dict[str, list] = {}
    nodes = list(graph.node)
    for function in graph.library.function:
        nodes.extend(function.node_def)
    for node in nodes:
        ops.setdefault(node.op, []).append(node)
    return ops


def _embed(loaded, images, batch=100):
    fn = loaded.signatures["serving_default"]
    return np.concatenate(
        [
            fn(images=images[i : i + batch])["embedding"].numpy()
            for i in range(0, len(images), batch)
        ]
    )


def _accuracy(embeddings, issame) -> float:
    from facerec_tf.evaluation.verification import verification_metrics

    return float(
        np.mean(verification_metrics(embeddings[0::2], embeddings[1::2], issame)["accuracy"])
    )


def test_folded_graph_matches_keras_on_faces(model, yale):
    from facerec_tf.export_optimize import InferenceGraph

    images = yale[1][:16]
    graph = InferenceGraph(model)
    ref = model(images, training=False).numpy()
    out = graph(images).numpy()
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"{model.name}: folded float32 graph vs Keras, 16 Yale faces: {rel:.2e} relative")
    assert rel <= FOLD_TOL
    bns = [layer.name for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert sorted(graph.folded) == sorted(bns)


def test_saved_model_matches_keras_and_has_no_batchnorm(model, exports, yale):
    path, loaded = exports["float32"]
    images = yale[1][:16]
    ref = _l2(model(images, training=False).numpy())
    out = _embed(loaded, images)
    assert np.abs(out - ref).max() <= FOLD_TOL
    ops = _op_types(path)
    assert not [op for op in ops if "BatchNorm" in op]
    convs = sum(
        type(layer).__name__ in ("Conv2D", "DepthwiseConv2D", "GroupedConv2D")
        for layer in model.layers
    )
    conv_ops = [n for op in ("Conv2D", "DepthwiseConv2dNative") for n in ops.get(op, [])]
    # each signature (serving_default, serve_jpeg) holds one copy of the backbone
    assert len(conv_ops) == 2 * convs
    assert len(ops.get("MatMul", [])) == 2  # the embedding dense layer, BNs folded in


def test_bfloat16_export_close_to_float32_on_yale_pairs(model, exports, yale):
    """bf16 against float32: cosine on every Yale face and, for the IResNet, the verification
    accuracy on the 300 Yale pairs. The untrained MobileFaceNet's embeddings of all faces are
    nearly parallel (pair distances 0.006 to 0.08), so its accuracy moves by a pair or more
    between two float32 graphs that differ only by rounding: only its cosine is checked."""
    import tensorflow as tf

    _, images, issame = yale
    e32 = _embed(exports["float32"][1], images)
    e16 = _embed(exports["bfloat16"][1], images)
    assert e16.dtype == np.float32
    cosine = np.sum(e32 * e16, axis=1)
    print(f"{model.name}: bf16 vs fp32 cosine on 600 Yale faces: min {cosine.min():.5f}")
    assert cosine.min() >= BF16_MIN_COSINE
    if model.name.startswith("iresnet"):
        acc32, acc16 = _accuracy(e32, issame), _accuracy(e16, issame)
        print(f"{model.name}: Yale pairs accuracy fp32 {acc32:.4f} bf16 {acc16:.4f}")
        assert abs(acc16 - acc32) <= BF16_MAX_ACCURACY_DROP
    convs = _op_types(exports["bfloat16"][0])["Conv2D"]
    assert {c.attr["T"].type for c in convs} == {tf.bfloat16.as_datatype_enum}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_signatures_unchanged(exports, precision, yale):
    import tensorflow as tf

    loaded = exports[precision][1]
    images, jpeg = assert_serving_signatures(loaded)
    jpegs = tf.constant(yale[0][:4])
    np.testing.assert_allclose(
        jpeg(jpeg_bytes=jpegs)["embedding"].numpy(),
        images(images=yale[1][:4])["embedding"].numpy(),
        atol=1e-6,
    )


def test_serving_default_refuses_a_wrong_image_size(exports):
    import tensorflow as tf

    loaded = exports["float32"][1]
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures["serving_default"](images=tf.zeros([2, 128, 96, 3]))
    message = info.value.message
    assert "serving_default: images must be 112x112 pixels ([N, 112, 112, 3]" in message
    assert "got height, width =] [128 96]" in message
    assert "Reshape" not in message


def test_unknown_precision_is_refused(model, tmp_path):
    from facerec_tf.export import ExportError, export_saved_model

    with pytest.raises(
        ExportError, match="precision 'float16' is not supported; expected one of float32, bfloat16"
    ):
        export_saved_model(model, tmp_path / "sm", precision="float16")
    assert not (tmp_path / "sm").exists()


def test_cli_precision_applies_to_saved_model_only(tmp_path, capsys):
    from test_export import _load_cli

    cli = _load_cli()
    args = ["--model", str(tmp_path / "m.keras"), "--output", str(tmp_path / "o.onnx")]
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--format", "onnx", "--precision", "bfloat16"])
    assert info.value.code == 2
    assert "--precision applies to --format saved_model only" in capsys.readouterr().err
    assert "--precision {float32,bfloat16}" in cli._parser().format_help()
