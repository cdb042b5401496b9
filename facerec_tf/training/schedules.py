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


class _WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then :meth:`decayed`.

    ``get_config`` returns the constructor arguments given to :meth:`_remember`.
    """

    def _remember(self, **config):
        self._config = config
        self.base_lr = float(config["base_lr"])
        self.warmup_steps = int(config.get("warmup_steps", 0))
        total = config.get("total_steps")
        if total is not None and int(total) <= self.warmup_steps:
            raise ValueError(
                f"total_steps ({total}) must exceed warmup_steps ({self.warmup_steps})"
            )

    def _progress(self, step):
        """Fraction of the decay phase done, clipped to [0, 1]."""
        decay_steps = float(self.total_steps - self.warmup_steps)
        return tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)

    def decayed(self, step):
        raise NotImplementedError

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.base_lr * step / max(float(self.warmup_steps), 1.0)
        return tf.where(step < self.warmup_steps, warm, self.decayed(step))

    def get_config(self):
        return dict(self._config)


@keras.saving.register_keras_serializable(package="facerec_tf")
class WarmupPolynomialDecay(_WarmupSchedule):
    def __init__(self, base_lr, total_steps, warmup_steps=0, power=2.0, end_lr=0.0):
        self._remember(
            base_lr=float(base_lr),
            total_steps=int(total_steps),
            warmup_steps=int(warmup_steps),
            power=float(power),
            end_lr=float(end_lr),
        )
        self.total_steps, self.power, self.end_lr = int(total_steps), float(power), float(end_lr)

    def decayed(self, step):
        t = self._progress(step)
        return (self.base_lr - self.end_lr) * tf.pow(1.0 - t, self.power) + self.end_lr


@keras.saving.register_keras_serializable(package="facerec_tf")
class StepDecay(_WarmupSchedule):
    def __init__(self, base_lr, boundaries, factor=0.1, warmup_steps=0):
        self.boundaries = [int(b) for b in boundaries]
        if self.boundaries != sorted(self.boundaries):
            raise ValueError(f"boundaries must be increasing, got {self.boundaries}")
        self._remember(
            base_lr=float(base_lr),
            boundaries=self.boundaries,
            factor=float(factor),
            warmup_steps=int(warmup_steps),
        )
        self.factor = float(factor)

    def decayed(self, step):
        passed = 0.0
        if self.boundaries:
            bounds = tf.constant(self.boundaries, tf.float32)
            passed = tf.reduce_sum(tf.cast(step >= bounds, tf.float32))
        return self.base_lr * tf.pow(self.factor, passed)


@keras.saving.register_keras_serializable(package="facerec_tf")
class WarmupCosineDecay(_WarmupSchedule):
    def __init__(self, base_lr, total_steps, warmup_steps=0, end_lr=0.0):
        self._remember(
            base_lr=float(base_lr),
            total_steps=int(total_steps),
            warmup_steps=int(warmup_steps),
            end_lr=float(end_lr),
        )
        self.total_steps, self.end_lr = int(total_steps), float(end_lr)

    def decayed(self, step):
        t = self._progress(step)
        return self.end_lr + 0.5 * (self.base_lr - self.end_lr) * (1.0 + tf.cos(math.pi * t))


def build_schedule(schedule_config, steps_per_epoch: int, total_steps: int):
    """The schedule described by a :class:`facerec_tf.config.ScheduleConfig`."""
    from facerec_tf.errors import ConfigError

    c = schedule_config
    warmup = round(c.warmup_epochs * steps_per_epoch)
    if c.name in ("polynomial", "cosine") and warmup >= total_steps:
        raise ConfigError(
            f"{c.warmup_epochs} epochs of warmup are {warmup} steps ({steps_per_epoch} per "
            f"epoch), not fewer than the run's {total_steps} steps",
            key="schedule.warmup_epochs",
        )
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
    raise ConfigError(
        f"unknown schedule {c.name!r} (polynomial, cosine, step, constant)", key="schedule.name"
    )
