"""Parity with arcface_torch computed by torch itself, in a separate interpreter.

torch is not a dependency: the tests run it in a subprocess, with this Python when the
test extra ``.[torch-tests]`` is installed (as CI does) or with ``FACEREC_TORCH_PYTHON`` (and
numpy); tests/torch_reference.py runs there. Without it these tests skip.

    FACEREC_TORCH_PYTHON=/path/to/torch/python pytest -s tests/test_torch_parity.py
"""

from __future__ import annotations

import pathlib
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.heads import MarginHead
from facerec_tf.models import blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    from conftest import require_torch_python

    python = require_torch_python()
    rng = np.random.default_rng(5)
    y = rng.integers(0, 40, 16)
    w = rng.standard_normal((40, 32)).astype(np.float32)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    x[:8] += 2.0 * w[y[:8]]  # half the rows near their centre
    inputs = {
        "x": x,
        "w": w,
        "y": y,
        "bn4": (rng.standard_normal((4, 5, 3, 6)) * 2 + 1).astype(np.float32),
        "bn2": (rng.standard_normal((16, 6)) * 2 + 1).astype(np.float32),
    }
    folder = tmp_path_factory.mktemp("torch")
    np.savez(folder / "in.npz", **inputs)
    out = subprocess.run(
        [python, str(ROOT / "tests" / "torch_reference.py"), folder / "in.npz", folder / "out.npz"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return inputs, dict(np.load(folder / "out.npz"))


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_arcface_torch_mode_gives_arcface_torch_gradients(torch_run):
    inputs, ref = torch_run
    diffs = {}
    for mode in ("arcface_torch", "exact"):
        head = MarginHead(40, m2=0.5, margin_gradient=mode)
        head.build((None, 32))
        head.centers.kernel.assign(inputs["w"])
        x = tf.constant(inputs["x"])
        labels = inputs["y"].astype(np.int32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, head(x, labels))
            )
        gx, gw = tape.gradient(loss, [x, head.centers.kernel])
        assert float(loss) == pytest.approx(float(ref["loss"]), rel=1e-5)
        diffs[mode] = (relative(gx.numpy(), ref["gx"]), relative(gw.numpy(), ref["gw"]))
    print(f"\nrelative gradient differences from arcface_torch (x, w): {diffs}")
    assert max(diffs["arcface_torch"]) <= 1e-5
    assert min(diffs["exact"]) >= 0.05  # the full gradient is not what arcface_torch trains


def test_batch_norm_statistics_equal_torch(torch_run):
    inputs, ref = torch_run
    diffs = {}
    for key in ("4", "2"):
        x = inputs[f"bn{key}"]
        ours = blocks.BatchNormalization(momentum=0.9, epsilon=1e-5)
        ours(x, training=True)
        plain = tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
        plain(x, training=True)
        np.testing.assert_allclose(ours.moving_mean.numpy(), ref[f"rm{key}"], atol=1e-6)
        diffs[f"{key}-D"] = (
            relative(ours.moving_variance.numpy(), ref[f"rv{key}"]),
            relative(plain.moving_variance.numpy(), ref[f"rv{key}"]),
        )
    print(f"\nrelative running-variance differences from torch (ours, keras): {diffs}")
    assert all(ours <= 1e-6 and keras >= 1e-3 for ours, keras in diffs.values())
