"""The scripts' shared command-line behaviour (facerec_tf/cli.py): ``--set`` with several
pairs, and quiet output -- no TensorFlow / absl / oneDNN / onnxruntime log line unless asked
for, while TensorFlow's errors still reach the user.

The quiet checks run the real scripts in subprocesses with ``TF_CPP_MIN_LOG_LEVEL`` removed
from the environment (as a new user runs them).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from facerec_tf.cli import TF_LOG_LINE

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A line of TensorFlow's, absl's, oneDNN's or onnxruntime's own logging.
LOG_LINE = re.compile(
    r"^[IWEF]\d{4} |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |absl|oneDNN|onnxruntime|"
    r"^WARNING:tensorflow|cpu_feature_guard|rebuild TensorFlow",
    re.M,
)
SMALL = [
    "model.backbone=iresnet10",
    "model.embedding_size=16",
    "data.image_size=32,32",
    "data.num_classes=20",
    "data.num_images=640",
    "data.batch_size=8",
    "data.synthetic_verification_pairs=0",
    "schedule.name=constant",
    "runtime.verify_every=0",
    "runtime.export=false",
]


def run(*cmd, verbose_env: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if verbose_env:
        env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    return subprocess.run(
        [sys.executable, *map(str, cmd)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def log_lines(r: subprocess.CompletedProcess) -> list[str]:
    text = r.stdout + "\n" + r.stderr
    return [line for line in text.splitlines() if LOG_LINE.search(line)]


# ----------------------------------------------------------------------------------------------
# --set


def test_set_takes_several_pairs_and_repeats():
    from facerec_tf.training.run import build_parser

    args = build_parser().parse_args(
        [
            "--config",
            "quickstart",
            "--data",
            "synthetic",
            "--output",
            "o",
            "--set",
            "a.b=1",
            "c.d=x y",
            "--verbose",
            "--set",
            "e.f=-3",
        ]
    )
    assert args.verbose
    assert args.overrides == ["a.b=1", "c.d=x y", "e.f=-3"]


def test_train_set_several_pairs_after_one_flag(tmp_path):
    r = run(
        "train.py", "--config", "quickstart", "--data", "synthetic", "--output", tmp_path,
        "--set", "data.batch_size=16", "optimizer.weight_decay=1e-4",
        "--set", "head.scale=30", "--print-config",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["data"]["batch_size"] == 16
    assert config["optimizer"]["weight_decay"] == 1e-4
    assert config["head"]["scale"] == 30.0


def test_train_set_without_a_pair_is_refused(tmp_path):
    r = run(
        "train.py", "--config", "quickstart", "--data", "synthetic", "--output", tmp_path,
        "--set", "data.batch_size=16", "oops", "--print-config",
    )  # fmt: skip
    assert r.returncode == 2 and "expected section.key=value" in r.stderr and "oops" in r.stderr


# ----------------------------------------------------------------------------------------------
# Quiet command lines


def test_log_line_pattern_matches_what_tensorflow_prints():
    lines = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        b"I0000 00:00:1796316182.224424    5517 port.cc:153] oneDNN custom operations are on.",
        b"E0000 00:00:1796316190.621166    5536 mkl_util.h:101] oneDNN supports DT_UINT8 only",
        b"2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] x",
        b"To enable the following instructions: AVX2 FMA, in other operations, rebuild "
        b"TensorFlow with the appropriate compiler flags.",
    ]
    assert all(TF_LOG_LINE.match(line) for line in lines)
    for own in (b"error: the model is missing", b"step 2/2 (100%) loss 3.1", b"I0000 is a key"):
        assert not TF_LOG_LINE.match(own)


@pytest.mark.slow
def test_train_prints_only_its_own_lines(tmp_path):
    sets = [x for s in SMALL for x in ("--set", s)]
    r = run(
        "train.py", "--config", "quickstart", "--data", "synthetic", "--output",
        tmp_path / "run", "--max-steps", "2", *sets,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "final weights digest" in r.stdout
    assert log_lines(r) == []


def _tiny_insightface_onnx(path: pathlib.Path) -> None:
    """An insightface-interface ONNX (NCHW input, dynamic batch) whose output is declared with
    batch 1: onnxruntime warns about the shape at every batch of more than one image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["data"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["fc1"]),
        ],
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def onnx_and_bin(rec_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = tmp_path / "if.onnx"
    _tiny_insightface_onnx(model)
    with open(rec_dir / "yale_pairs_py3.bin", "rb") as f:
        images, issame = pickle.load(f)
    small = tmp_path / "small.bin"
    with open(small, "wb") as f:
        pickle.dump((images[:80], issame[:40]), f)
    return model, small


def test_evaluate_onnx_prints_only_its_own_lines(onnx_and_bin):
    model, target = onnx_and_bin
    r = run("evaluate.py", "--model", model, "--bin", target, "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert "Accuracy-Flip" in r.stdout
    assert log_lines(r) == []
    # the same run, asking for them: TensorFlow's and onnxruntime's lines are there
    r = run("evaluate.py", "--model", model, "--bin", target, "--batch-size", "8", "--verbose")
    assert r.returncode == 0, r.stderr
    noise = "\n".join(log_lines(r))
    assert "oneDNN" in noise or "cpu_feature_guard" in noise
    assert "onnxruntime" in noise or "VerifyOutputSizes" in noise


def test_tensorflow_errors_still_reach_the_user():
    program = (
        "from facerec_tf.cli import quiet_tensorflow\n"
        "quiet_tensorflow()\n"
        "import tensorflow as tf\n"
        "print('own line', flush=True)\n"
        "tf.io.decode_jpeg(b'not a jpeg at all')\n"
    )
    r = run("-c", program)
    assert r.returncode == 1
    assert r.stdout == "own line\n"
    assert "InvalidArgumentError" in r.stderr and "jpeg" in r.stderr.lower()
    assert log_lines(r) == []
