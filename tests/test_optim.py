"""Schedules and optimiser semantics against the formulas arcface_torch / torch use."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.config import OptimizerConfig, ScheduleConfig
from facerec_tf.training.optim import build_optimizer, coupled_decay_multipliers, process_gradients
from facerec_tf.training.schedules import (
    StepDecay,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    build_schedule,
)


def poly_reference(step, base_lr, warmup, total, power):
    """arcface_torch PolyScheduler.get_lr."""
    if step < warmup:
        return base_lr * step / warmup
    alpha = (1 - (step - warmup) / (total - warmup)) ** power
    return base_lr * alpha


def test_polynomial_schedule_matches_arcface_torch():
    s = WarmupPolynomialDecay(0.1, total_steps=1000, warmup_steps=100, power=2.0)
    for step in [0, 1, 50, 99, 100, 101, 500, 999, 1000]:
        assert float(s(step)) == pytest.approx(
            poly_reference(step, 0.1, 100, 1000, 2.0), rel=1e-5, abs=1e-9
        )
    assert float(s(5000)) == 0.0  # clamps after the end


def test_step_and_cosine_schedules():
    s = StepDecay(0.1, boundaries=[10, 20], factor=0.1, warmup_steps=0)
    assert [round(float(s(i)), 6) for i in (0, 9, 10, 19, 20, 100)] == [
        0.1,
        0.1,
        0.01,
        0.01,
        0.001,
        0.001,
    ]
    c = WarmupCosineDecay(0.1, total_steps=110, warmup_steps=10)
    assert float(c(5)) == pytest.approx(0.05)
    assert float(c(60)) == pytest.approx(0.05, abs=1e-6) and float(c(110)) == pytest.approx(
        0.0, abs=1e-7
    )
    cfg = ScheduleConfig(name="step", base_lr=0.1, lr_steps=(2, 3), warmup_epochs=0)
    assert build_schedule(cfg, steps_per_epoch=10, total_steps=40).boundaries == [20, 30]
    for sched in (s, c):
        clone = type(sched).from_config(sched.get_config())
        assert float(clone(15)) == float(sched(15))


def test_warmup_as_long_as_the_run_is_a_config_error_naming_the_key():
    from facerec_tf.errors import ConfigError

    cfg = ScheduleConfig(name="cosine", base_lr=0.1, warmup_epochs=0.05)
    with pytest.raises(ConfigError, match=r"'schedule.warmup_epochs'.*400 steps.*400 steps"):
        build_schedule(cfg, steps_per_epoch=8000, total_steps=400)
    assert build_schedule(cfg, steps_per_epoch=8000, total_steps=401).warmup_steps == 400


def test_coupled_sgd_equals_torch_sgd_with_weight_decay():
    """Three steps of torch SGD(lr, momentum=0.9, weight_decay=wd): buf = mu*buf + g + wd*w;
    w -= lr*buf. Keras SGD + our coupled decay must give the same weights."""
    lr, mu, wd = 0.1, 0.9, 5e-4
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4,)).astype(np.float32)
    grads = [rng.normal(size=(4,)).astype(np.float32) for _ in range(3)]
    w, buf = w0.astype(np.float64), np.zeros(4)
    for g in grads:
        buf = mu * buf + g + wd * w
        w = w - lr * buf

    var = tf.Variable(w0)
    config = OptimizerConfig(weight_decay=wd, momentum=mu, clip_norm=0.0)
    opt = build_optimizer(config, lr)
    decay = coupled_decay_multipliers(config, [var], [])
    for g in grads:
        processed, _ = process_gradients([tf.constant(g)], [var], decay, 1)
        opt.apply_gradients(zip(processed, [var]))
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5)


def test_clip_applies_to_backbone_only_and_centres_multiplier():
    config = OptimizerConfig(weight_decay=0.1, centers_weight_decay_mult=10.0)
    b, c = tf.Variable([1.0, 1.0]), tf.Variable([2.0])
    decay = coupled_decay_multipliers(config, [b], [c], centers=[c])
    assert decay == [0.1, pytest.approx(1.0)]
    grads, norm = process_gradients(
        [tf.constant([30.0, 40.0]), tf.constant([100.0])], [b, c], decay, 1, clip_norm=5.0
    )
    assert float(norm) == pytest.approx(50.0)
    np.testing.assert_allclose(grads[0].numpy(), [3.0 + 0.1, 4.0 + 0.1], rtol=1e-6)  # clipped to 5
    np.testing.assert_allclose(grads[1].numpy(), [100.0 + 2.0], rtol=1e-6)  # head never clipped


def test_decoupled_mode_uses_keras_weight_decay():
    opt = build_optimizer(OptimizerConfig(weight_decay=1e-2, weight_decay_mode="decoupled"), 0.1)
    assert opt.weight_decay == pytest.approx(1e-2)
    assert coupled_decay_multipliers(OptimizerConfig(weight_decay_mode="decoupled"), [1], [2]) == [
        0.0,
        0.0,
    ]
    opt16 = build_optimizer(OptimizerConfig(), 0.1, precision="mixed_float16")
    assert isinstance(opt16, keras.mixed_precision.LossScaleOptimizer)
