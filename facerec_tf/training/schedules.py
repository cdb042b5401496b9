"""Learning-rate schedules (serializable Keras ``LearningRateSchedule``s), all step-based.

* :class:`WarmupPolynomialDecay` — arcface_torch's ``PolyScheduler``: linear warmup from 0
  to ``base_lr`` over ``warmup_steps``, then ``base_lr * (1 - t) ** power`` down to ``end_lr``.
* :class:`StepDecay` — multiply by ``factor`` at each boundary (the MXNet trainer's
  ``--lr-steps``), after an optional linear warmup.
* :class:`WarmupCosineDecay` — linear warmup then half-cosine to ``end_lr``.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def _warmup(step, base_lr, warmup_steps):
    return base_lr * step / max(float(warmup_steps), 1.0)


@keras.saving.register_keras_serializable(package="facerec_tf")
class WarmupPolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, base_lr, total_steps, warmup_steps=0, power=2.0, end_lr=0.0):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.power = float(power)
        self.end_lr = float(end_lr)
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})"
            )

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decay_steps = float(self.total_steps - self.warmup_steps)
        t = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        decayed = (self.base_lr - self.end_lr) * tf.pow(1.0 - t, self.power) + self.end_lr
        return tf.where(
            step < self.warmup_steps, _warmup(step, self.base_lr, self.warmup_steps), decayed
        )

    def get_config(self):
        return dict(
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            power=self.power,
            end_lr=self.end_lr,
        )


@keras.saving.register_keras_serializable(package="facerec_tf")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, base_lr, boundaries, factor=0.1, warmup_steps=0):
        self.base_lr = float(base_lr)
        self.boundaries = [int(b) for b in boundaries]
        self.factor = float(factor)
        self.warmup_steps = int(warmup_steps)
        if self.boundaries != sorted(self.boundaries):
            raise ValueError(f"boundaries must be increasing, got {self.boundaries}")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        passed = 0.0
        if self.boundaries:
            bounds = tf.constant(self.boundaries, tf.float32)
            passed = tf.reduce_sum(tf.cast(step >= bounds, tf.float32))
        lr = self.base_lr * tf.pow(self.factor, passed)
        return tf.where(
            step < self.warmup_steps, _warmup(step, self.base_lr, self.warmup_steps), lr
        )

    def get_config(self):
        return dict(
            base_lr=self.base_lr,
            boundaries=self.boundaries,
            factor=self.factor,
            warmup_steps=self.warmup_steps,
        )


@keras.saving.register_keras_serializable(package="facerec_tf")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, base_lr, total_steps, warmup_steps=0, end_lr=0.0):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.end_lr = float(end_lr)
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})"
            )

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        t = tf.clip_by_value(
            (step - self.warmup_steps) / float(self.total_steps - self.warmup_steps), 0.0, 1.0
        )
        decayed = self.end_lr + 0.5 * (self.base_lr - self.end_lr) * (1.0 + tf.cos(math.pi * t))
        return tf.where(
            step < self.warmup_steps, _warmup(step, self.base_lr, self.warmup_steps), decayed
        )

    def get_config(self):
        return dict(
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            end_lr=self.end_lr,
        )


def build_schedule(schedule_config, steps_per_epoch: int, total_steps: int):
    """The schedule described by a :class:`facerec_tf.config.ScheduleConfig`."""
    c = schedule_config
    warmup = round(c.warmup_epochs * steps_per_epoch)
    if c.name == "polynomial":
        return WarmupPolynomialDecay(c.base_lr, total_steps, warmup, c.power, c.end_lr)
    if c.name == "cosine":
        return WarmupCosineDecay(c.base_lr, total_steps, warmup, c.end_lr)
    if c.name == "step":
        return StepDecay(
            c.base_lr, [round(e * steps_per_epoch) for e in c.lr_steps], c.step_factor, warmup
        )
    if c.name == "constant":
        return StepDecay(c.base_lr, [], 1.0, warmup)
    raise ValueError(f"unknown schedule {c.name!r}")
