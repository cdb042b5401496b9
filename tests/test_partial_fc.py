"""Partial FC: sharded class centres equal the single-device full softmax.

The distributed checks run in fresh processes (tests/partial_fc_check.py) on 2 and 4
logical CPU devices.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from checks import run_check

from facerec_tf.heads.partial_fc import shard_bounds

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "partial_fc_check.py"


def check(*args) -> dict:
    return run_check("partial_fc_check.py", *args)


def test_shard_bounds_are_contiguous_blocks():
    starts, sizes = shard_bounds(11, 4)
    assert sizes.tolist() == [3, 3, 3, 2] and starts.tolist() == [0, 3, 6, 9]
    starts, sizes = shard_bounds(2_000_000, 8)
    assert set(sizes.tolist()) == {250_000} and starts[-1] == 1_750_000
    with pytest.raises(ValueError, match="3 classes cannot be split over 4 replicas"):
        shard_bounds(3, 4)


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 4])
def test_partial_fc_equals_full_softmax_and_samples_positives(replicas):
    result = check("parity", replicas)
    for c in ("c10", "c11"):  # even and uneven blocks
        r = result[c]
        assert r["loss_diff"] <= 1e-5 * max(1.0, r["ref_loss"]), r
        assert r["kernel_grad_diff"] <= 1e-5 * max(1.0, r["kernel_grad_norm"]), r
        assert r["centers_grad_diff"] <= 1e-5, r
    s = result["sampled"]  # 1000 classes, r = 0.1, global batch 8
    assert s["num_sample"] == int(np.ceil(0.1 * 1000 / replicas))
    assert s["positives_present"] and s["finite"] and s["distinct"], s
    u = check("sparse", replicas)  # r = 0.1 in-place row updates against NumPy, 2 steps
    assert u["rows"] == replicas * int(np.ceil(0.1 * 1000 / replicas)), u
    assert u["max_diff"] <= 1e-6 and u["untouched_equal"], u


def test_margin_gradient_modes_on_two_replicas_match_numpy_reference():
    """head.margin_gradient on Partial FC (2 logical CPU devices, 10 and 11 classes): loss,
    backbone-kernel and centre gradients of ArcFace equal the float64 NumPy reference of
    each mode (tests/margin_reference.py), whose gradients are 10-18% apart."""
    result = check("gradient", 2)
    for name, r in result.items():
        assert r["loss"] <= 1e-6 and r["kernel"] <= 1e-5 and r["centers"] <= 1e-5, (name, r)
        assert r["modes_apart"] >= 0.05, (name, r)


@pytest.mark.slow
def test_save_on_four_replicas_resume_on_two(tmp_path):
    saved = check("save", 4, tmp_path)
    assert saved["local_rows"] == [3, 3, 3, 3] and saved["momentum_nonzero"]
    assert saved["gathered_equal"]
    loaded = check("load", 2, tmp_path)
    assert loaded["local_rows"] == [6, 6]
    assert loaded["centers_equal"] and loaded["momentum_equal"]
    assert loaded["loss"] == pytest.approx(saved["loss"], abs=1e-6)


def train_check(mode, folder) -> dict:
    return run_check("partial_fc_train_check.py", mode, folder)


@pytest.mark.slow
def test_trainer_with_partial_fc_equals_full_softmax_and_resumes_on_fewer_replicas(tmp_path):
    """train.py's Trainer: ArcFace on 1 device (batch 16) vs Partial FC on 2 replicas (batch 8
    each) from the same weights, 3 SGD steps; then the 2-replica checkpoint restores on 1."""
    r = train_check("parity", tmp_path)
    np.testing.assert_allclose(r["pfc_losses"], r["ref_losses"], rtol=1e-5)
    assert r["backbone_diff"] <= 1e-5 and r["centers_diff"] <= 1e-6, r
    assert r["resumed_step"] == 3
    assert r["resumed_centers_equal"] and r["resumed_momentum_equal"], r


@pytest.mark.slow
def test_jit_compiled_step_equals_plain_step(tmp_path):
    """runtime.jit_compile=true: backbone, Partial FC with sampling (r = 0.5) and both
    optimisers in one XLA cluster give the losses and centres of the plain step."""
    r = train_check("jit", tmp_path)
    np.testing.assert_allclose(r["jit_losses"], r["losses"], rtol=1e-5)
    assert r["centers_diff"] <= 1e-6, r
