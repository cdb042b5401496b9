"""Adaptive-margin heads: MagFace, CurricularFace, AdaFace and annealed SphereFace.

All four take RAW (un-normalised) embeddings, so that MagFace and AdaFace can read the
feature norm, and follow :class:`~facerec_tf.heads.margin.MarginHead`'s interface::

    logits = head(embeddings, labels, training=True)   # float32 [B, C]
    logits = head(embeddings)                          # inference: scale * cos, no margin

``cos`` is the cosine between the L2-normalised embedding and the L2-normalised class
centres (:class:`~facerec_tf.heads.centers.ClassCenters`), ``y`` the label, ``theta_y =
acos(cos_y)``. Labels are int32 ``[B]``; a label of ``-1`` marks a row whose target is not
among these classes: that row gets no margin and is left out of the label statistics.

**MagFace** (Meng et al., CVPR 2021)::

    a       = clip(||x||, l_a, u_a)
    m(a)    = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a)
    logit_y = s cos(theta_y + m(a))          (insightface fallback once theta_y + m > pi)
    g(a)    = 1 / a + a / u_a^2,  loss term lambda_g g(a)  (``auxiliary_losses``)

**CurricularFace** (Huang et al., CVPR 2020)::

    t       <- alpha mean_batch(cos_y) + (1 - alpha) t          (training only, t_0 = 0)
    logit_y = s cos(theta_y + m)                                (insightface fallback)
    logit_j = s cos_j (t + cos_j)   if cos_j > cos(theta_y + m), else s cos_j

**AdaFace** (Kim et al., CVPR 2022), with ``n = clip(||x||, 0.001, 100)`` (no gradient)::

    mu, sigma <- t_alpha (mean, std)_batch(n) + (1 - t_alpha) (mu, sigma)   (training only)
    r         = clip(h (n - mu) / (sigma + eps), -1, 1)
    logit_y   = s (cos(clip(theta_y - m r, eps, pi - eps)) - (m + m r))
    logit_j   = s clip(cos_j, -1 + eps, 1 - eps)

**Annealed SphereFace / L-Softmax** (insightface's MXNet ``train_softmax.py``, loss type 1,
``LSoftmax`` op), with ``i`` the number of training calls so far::

    lambda_i = beta                                                     if i <= beta_freeze
             = max(beta_min, beta (1 + gamma (i - beta_freeze))^-power) otherwise
    logit_y  = s (lambda_i cos_y + psi(theta_y)) / (1 + lambda_i)
    psi      = (-1)^k cos(m1 theta) - 2k  for  m1 theta in [k pi, (k + 1) pi]

State (CurricularFace ``t``, AdaFace ``batch_mean``/``batch_std``, SphereFace
``iteration``) lives in non-trainable float32/int64 weights created with
``aggregation="only_first_replica"``. It changes only in calls with ``training=True`` and
labels, and the statistics are taken over the GLOBAL batch with
``get_replica_context().all_reduce``, so every replica of a ``MirroredStrategy`` holds the
same state, equal to a single-device run on the concatenated batch. The new state is used in
the same call that computes it (as the official implementations do). ``training`` must be a
Python bool (or None).

Differences from the official code (IrvingMeng/MagFace, HuangYG123/CurricularFace,
mk-minchul/AdaFace, deepinsight/insightface ``src/train_softmax.py``):

* MagFace: the official ``MagLinear`` defaults to ``easy_margin=True`` and the trainer never
  overrides it, so the official runs apply the margin only where ``cos > 0``; here the
  default is insightface's ``cos - m sin(m)`` fallback (``easy_margin=True`` reproduces the
  official behaviour). As officially, ``a`` is clipped *before* both ``m(a)`` and ``g(a)``
  (so ``g`` has no gradient outside ``[l_a, u_a]``), the margin is not detached (the
  cross-entropy gradient reaches the magnitude through ``m(a)``), and the loss is
  ``mean(CE) + lambda_g mean(g)``. The official ``trainer.py`` argparse default is
  ``lambda_g = 20``; ``run.sh`` and the paper use 35, used here.
* CurricularFace: as officially, the hard-example test uses the raw ``cos(theta_y + m)`` (no
  fallback), ``t`` is updated before it is used, and its batch mean is over the un-margined
  target cosines (clamped to [-1, 1]). Officially ``t`` is a per-process buffer updated on
  every forward with labels (also in eval mode); here it is a global-batch statistic updated
  only when ``training=True``.
* AdaFace: as officially the cosines (negatives included) are clamped to ``[-1 + eps, 1 -
  eps]``, norms are clipped to [0.001, 100] and detached, the std is the unbiased one and
  the EMA is updated before use. The official class default ``t_alpha = 1.0`` and config
  defaults ``m = 0.5, h = 0`` are not what the published runs use (scripts: ``m = 0.4, h =
  0.333``, ``t_alpha = 0.01``), which are the defaults here. Officially the statistics are
  per process; here they are over the global batch. A global batch of one example gives
  std 0 here (torch: NaN).
* Annealed SphereFace: insightface's ``LSoftmax`` multiplies by the raw feature norm
  ``||x||`` (only the centres are normalised) and applies the margin only in training; here
  the embedding is normalised and scaled by ``s`` like the other heads, and the margin is
  applied whenever labels are given (``lambda`` does not advance unless ``training``). The
  op's own per-iteration ``scale = 0.9993`` decay is unused by ``train_softmax.py`` (it sets
  ``BETA`` every batch), so it is not reproduced. Defaults are ``train_softmax.py``'s:
  ``margin 4, beta 1000, beta_min 5, beta_freeze 0, gamma 0.12, power 1``; for more than
  20000 classes that script switches to ``beta_freeze 5000, gamma 0.06``.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from facerec_tf.heads.angular import replace_target as _replace_target
from facerec_tf.heads.angular import target_index as _target_index
from facerec_tf.heads.angular import target_margin
from facerec_tf.heads.angular import theta as _theta
from facerec_tf.heads.centers import ClassCenters

_NORM_EPS = 1e-12
ADAFACE_NORM_RANGE = (0.001, 100.0)  # AdaFace's ``safe_norms`` clip


# ---------------------------------------------------------------------------------------
# Helpers


def feature_norm(embeddings):
    """``||x||`` per row, float32 ``[B]``, with a finite gradient at ``x = 0``."""
    x = tf.cast(embeddings, tf.float32)
    return tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=-1), _NORM_EPS))


def global_sum(value):
    """Sum of ``value`` over all replicas (no gradient); the value itself without a strategy
    or in cross-replica context."""
    value = tf.stop_gradient(value)
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _state_weight(layer, name, initial, dtype="float32"):
    return layer.add_weight(
        name=name,
        shape=(),
        dtype=dtype,
        initializer=keras.initializers.Constant(initial),
        trainable=False,
        aggregation="only_first_replica",
    )


# ---------------------------------------------------------------------------------------
# Formulas on cosines (pure functions, float32)


def magface_margin(norms, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8):
    """``m(a)`` for ``a = clip(norms, l_a, u_a)``."""
    a = tf.clip_by_value(tf.cast(norms, tf.float32), l_a, u_a)
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(norms, l_a=10.0, u_a=110.0):
    """``g(a) = 1 / a + a / u_a^2`` for ``a = clip(norms, l_a, u_a)``, per example."""
    a = tf.clip_by_value(tf.cast(norms, tf.float32), l_a, u_a)
    return 1.0 / a + a / (u_a * u_a)


def magface_logits(
    cos,
    norms,
    labels,
    scale=64.0,
    l_a=10.0,
    u_a=110.0,
    l_m=0.45,
    u_m=0.8,
    easy_margin=False,
):
    """MagFace logits ``[B, C]`` from cosines ``[B, C]``, feature norms ``[B]``, labels."""
    cos = tf.clip_by_value(tf.cast(cos, tf.float32), -1.0, 1.0)
    valid, index = _target_index(labels)
    target = tf.gather_nd(cos, index)
    margin = magface_margin(norms, l_a, u_a, l_m, u_m)
    with_margin = tf.cos(_theta(target) + margin)
    if easy_margin:
        new_target = tf.where(target > 0.0, with_margin, target)
    else:
        keep = target > tf.cos(math.pi - margin)
        new_target = tf.where(keep, with_margin, target - tf.sin(math.pi - margin) * margin)
    return _replace_target(cos, valid, index, new_target) * scale


def curricular_logits(cos, labels, t, scale=64.0, margin=0.5):
    """CurricularFace logits with the (already updated) curriculum parameter ``t``."""
    cos = tf.clip_by_value(tf.cast(cos, tf.float32), -1.0, 1.0)
    valid, index = _target_index(labels)
    target = tf.gather_nd(cos, index)
    threshold = tf.cos(_theta(target) + margin)  # raw cos(theta_y + m), no fallback
    hard = (cos > threshold[:, None]) & valid[:, None]
    t = tf.stop_gradient(tf.cast(t, tf.float32))
    cos = tf.where(hard, cos * (t + cos), cos)
    new_target = target_margin(target, 1.0, margin, 0.0)
    return _replace_target(cos, valid, index, new_target) * scale


def adaface_logits(
    cos,
    norms,
    labels,
    batch_mean,
    batch_std,
    scale=64.0,
    margin=0.4,
    h=0.333,
    eps=1e-3,
):
    """AdaFace logits from cosines, feature norms and the (already updated) statistics."""
    cos = tf.clip_by_value(tf.cast(cos, tf.float32), -1.0 + eps, 1.0 - eps)
    safe = tf.stop_gradient(tf.clip_by_value(tf.cast(norms, tf.float32), *ADAFACE_NORM_RANGE))
    mean = tf.stop_gradient(tf.cast(batch_mean, tf.float32))
    std = tf.stop_gradient(tf.cast(batch_std, tf.float32))
    scaler = tf.clip_by_value((safe - mean) / (std + eps) * h, -1.0, 1.0)
    valid, index = _target_index(labels)
    target = tf.gather_nd(cos, index)
    theta = tf.clip_by_value(tf.acos(target) - margin * scaler, eps, math.pi - eps)
    new_target = tf.cos(theta) - (margin + margin * scaler)
    return _replace_target(cos, valid, index, new_target) * scale


def annealed_lambda(iteration, beta=1000.0, beta_min=5.0, gamma=0.12, power=1.0, beta_freeze=0):
    """insightface's L-Softmax weight ``lambda`` for the batch after ``iteration`` batches."""
    i = tf.cast(iteration, tf.float32)
    move = tf.maximum(i - float(beta_freeze), 0.0)
    decayed = tf.maximum(beta_min, beta * tf.pow(1.0 + gamma * move, -power))
    return tf.where(i <= float(beta_freeze), tf.constant(beta, tf.float32), decayed)


def annealed_sphereface_logits(cos, labels, lam, scale=64.0, m1=4.0):
    """``s (lambda cos_y + psi(theta_y)) / (1 + lambda)`` on the target, ``s cos`` elsewhere."""
    cos = tf.cast(cos, tf.float32)
    valid, index = _target_index(labels)
    target = tf.gather_nd(cos, index)
    lam = tf.stop_gradient(tf.cast(lam, tf.float32))
    psi = target_margin(target, m1, 0.0, 0.0)
    new_target = (lam * target + psi) / (1.0 + lam)
    return _replace_target(cos, valid, index, new_target) * scale


# ---------------------------------------------------------------------------------------
# Layers


class _AdaptiveHead(keras.layers.Layer):
    """Shared part: class centres, float32, inference ``scale * cos``, config."""

    def __init__(self, num_classes, scale=64.0, centers_initializer=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.centers = ClassCenters(num_classes, initializer=centers_initializer, name="centers")

    @property
    def num_classes(self) -> int:
        return self.centers.num_classes

    def build(self, embeddings_shape, labels_shape=None):
        self.centers.build(embeddings_shape)
        self._build_state()

    def _build_state(self):
        pass

    def call(self, embeddings, labels=None, training=None):
        embeddings = tf.cast(embeddings, tf.float32)
        cos = self.centers(embeddings)
        if labels is None:
            return cos * self.scale
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        return self._logits(embeddings, cos, labels, bool(training))

    def _logits(self, embeddings, cos, labels, training):
        raise NotImplementedError

    def _hyper_parameters(self) -> dict:
        raise NotImplementedError

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            scale=self.scale,
            centers_initializer=keras.initializers.serialize(self.centers.initializer),
            **self._hyper_parameters(),
        )
        return config


@keras.saving.register_keras_serializable(package="facerec_tf")
class MagFaceHead(_AdaptiveHead):
    """MagFace: magnitude-adaptive ArcFace margin plus the magnitude regulariser ``g``.

    ``auxiliary_losses(embeddings, labels)`` returns ``{"magface_g": lambda_g * g(a)}`` per
    example; add it to the per-example cross-entropy before averaging.

    Args:
        num_classes: number of identities.
        scale: ``s`` (64).
        l_a, u_a: magnitude range (10, 110).
        l_m, u_m: margin at ``l_a`` and ``u_a`` (0.45, 0.8).
        lambda_g: weight of ``g`` (35, the paper's and ``run.sh``'s value).
        easy_margin: margin only where ``cos > 0`` (the official code's default) instead of
            insightface's fallback (default False).
        centers_initializer: initialiser of the class centres.
    """

    def __init__(
        self,
        num_classes,
        scale=64.0,
        l_a=10.0,
        u_a=110.0,
        l_m=0.45,
        u_m=0.8,
        lambda_g=35.0,
        easy_margin=False,
        centers_initializer=None,
        **kwargs,
    ):
        super().__init__(num_classes, scale, centers_initializer, **kwargs)
        if not 0 < l_a < u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not 0 <= l_m <= u_m < math.pi:
            raise ValueError(f"need 0 <= l_m <= u_m < pi, got l_m={l_m}, u_m={u_m}")
        if lambda_g < 0:
            raise ValueError(f"lambda_g must be >= 0, got {lambda_g}")
        self.l_a, self.u_a = float(l_a), float(u_a)
        self.l_m, self.u_m = float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        self.easy_margin = bool(easy_margin)

    @property
    def min_lambda_g(self) -> float:
        """The smallest ``lambda_g`` for which the paper's convergence guarantee holds
        (``s k u_a^2 l_a^2 / (u_a^2 - l_a^2)``, checked by the official trainer)."""
        k = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return self.scale * k * self.u_a**2 * self.l_a**2 / (self.u_a**2 - self.l_a**2)

    def _logits(self, embeddings, cos, labels, training):
        return magface_logits(
            cos,
            feature_norm(embeddings),
            labels,
            self.scale,
            self.l_a,
            self.u_a,
            self.l_m,
            self.u_m,
            self.easy_margin,
        )

    def auxiliary_losses(self, embeddings, labels=None):
        g = magface_regularizer(feature_norm(embeddings), self.l_a, self.u_a)
        return {"magface_g": self.lambda_g * g}

    def _hyper_parameters(self):
        return dict(
            l_a=self.l_a,
            u_a=self.u_a,
            l_m=self.l_m,
            u_m=self.u_m,
            lambda_g=self.lambda_g,
            easy_margin=self.easy_margin,
        )


@keras.saving.register_keras_serializable(package="facerec_tf")
class CurricularFaceHead(_AdaptiveHead):
    """CurricularFace: ArcFace target, hard negatives re-weighted by the EMA ``t``.

    Args:
        num_classes: number of identities.
        scale: ``s`` (64).
        margin: additive angular margin ``m`` (0.5).
        alpha: EMA rate of ``t`` (0.01).
        centers_initializer: initialiser of the class centres.
    """

    def __init__(
        self,
        num_classes,
        scale=64.0,
        margin=0.5,
        alpha=0.01,
        centers_initializer=None,
        **kwargs,
    ):
        super().__init__(num_classes, scale, centers_initializer, **kwargs)
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"margin must be in [0, pi), got {margin}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.margin = float(margin)
        self.alpha = float(alpha)

    def _build_state(self):
        self.t = _state_weight(self, "t", 0.0)

    def _logits(self, embeddings, cos, labels, training):
        t = tf.convert_to_tensor(self.t)
        if training:
            valid, index = _target_index(labels)
            target = tf.clip_by_value(tf.gather_nd(cos, index), -1.0, 1.0)
            mask = tf.cast(valid, tf.float32)
            total, count = tf.unstack(
                global_sum(tf.stack([tf.reduce_sum(target * mask), tf.reduce_sum(mask)]))
            )
            updated = self.alpha * total / tf.maximum(count, 1.0) + (1.0 - self.alpha) * t
            t = tf.where(count > 0, updated, t)
            self.t.assign(t)
        return curricular_logits(cos, labels, t, self.scale, self.margin)

    def _hyper_parameters(self):
        return dict(margin=self.margin, alpha=self.alpha)


@keras.saving.register_keras_serializable(package="facerec_tf")
class AdaFaceHead(_AdaptiveHead):
    """AdaFace: margin adapted to the feature norm relative to EMA batch statistics.

    Args:
        num_classes: number of identities.
        scale: ``s`` (64).
        margin: ``m`` (0.4).
        h: concentration of the norm-to-margin map (0.333).
        t_alpha: EMA rate of the norm mean and std (0.01).
        eps: cosine/angle clip and std guard (1e-3).
        centers_initializer: initialiser of the class centres.

    The EMA starts at mean 20, std 100 (the official buffers' initial values).
    """

    def __init__(
        self,
        num_classes,
        scale=64.0,
        margin=0.4,
        h=0.333,
        t_alpha=0.01,
        eps=1e-3,
        centers_initializer=None,
        **kwargs,
    ):
        super().__init__(num_classes, scale, centers_initializer, **kwargs)
        if not 0.0 <= t_alpha <= 1.0:
            raise ValueError(f"t_alpha must be in [0, 1], got {t_alpha}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.margin = float(margin)
        self.h = float(h)
        self.t_alpha = float(t_alpha)
        self.eps = float(eps)

    def _build_state(self):
        self.batch_mean = _state_weight(self, "batch_mean", 20.0)
        self.batch_std = _state_weight(self, "batch_std", 100.0)

    def _logits(self, embeddings, cos, labels, training):
        norms = feature_norm(embeddings)
        mean = tf.convert_to_tensor(self.batch_mean)
        std = tf.convert_to_tensor(self.batch_std)
        if training:
            safe = tf.clip_by_value(norms, *ADAFACE_NORM_RANGE)
            total, count = tf.unstack(
                global_sum(tf.stack([tf.reduce_sum(safe), tf.cast(tf.size(safe), tf.float32)]))
            )
            batch_mean = total / tf.maximum(count, 1.0)
            squares = global_sum(tf.reduce_sum(tf.square(safe - batch_mean)))
            batch_std = tf.sqrt(squares / tf.maximum(count - 1.0, 1.0))  # unbiased, as torch
            a = self.t_alpha
            mean = tf.where(count > 0, a * batch_mean + (1.0 - a) * mean, mean)
            std = tf.where(count > 0, a * batch_std + (1.0 - a) * std, std)
            self.batch_mean.assign(mean)
            self.batch_std.assign(std)
        return adaface_logits(
            cos, norms, labels, mean, std, self.scale, self.margin, self.h, self.eps
        )

    def _hyper_parameters(self):
        return dict(margin=self.margin, h=self.h, t_alpha=self.t_alpha, eps=self.eps)


@keras.saving.register_keras_serializable(package="facerec_tf")
class AnnealedSphereFaceHead(_AdaptiveHead):
    """SphereFace with insightface's L-Softmax annealing of ``lambda`` (see module doc).

    Args:
        num_classes: number of identities.
        scale: ``s`` (64; insightface's op uses the raw feature norm instead).
        m1: multiplicative angular margin (4, ``--margin``).
        beta, beta_min, gamma, power, beta_freeze: the ``lambda`` schedule (1000, 5, 0.12,
            1, 0; insightface uses beta_freeze 5000 and gamma 0.06 above 20000 classes).
        centers_initializer: initialiser of the class centres.

    ``iteration`` (int64) counts the training calls; ``current_lambda()`` is the ``lambda``
    the next call will use.
    """

    def __init__(
        self,
        num_classes,
        scale=64.0,
        m1=4.0,
        beta=1000.0,
        beta_min=5.0,
        gamma=0.12,
        power=1.0,
        beta_freeze=0,
        centers_initializer=None,
        **kwargs,
    ):
        super().__init__(num_classes, scale, centers_initializer, **kwargs)
        if m1 < 1:
            raise ValueError(f"m1 must be >= 1, got {m1}")
        if beta < 0 or beta_min < 0 or gamma < 0 or power < 0 or beta_freeze < 0:
            raise ValueError("beta, beta_min, gamma, power and beta_freeze must be >= 0")
        self.m1 = float(m1)
        self.beta = float(beta)
        self.beta_min = float(beta_min)
        self.gamma = float(gamma)
        self.power = float(power)
        self.beta_freeze = int(beta_freeze)

    def _build_state(self):
        self.iteration = _state_weight(self, "iteration", 0, dtype="int64")

    def current_lambda(self):
        return annealed_lambda(self.iteration, **self._schedule())

    def _schedule(self):
        return dict(
            beta=self.beta,
            beta_min=self.beta_min,
            gamma=self.gamma,
            power=self.power,
            beta_freeze=self.beta_freeze,
        )

    def _logits(self, embeddings, cos, labels, training):
        lam = self.current_lambda()
        if training:
            self.iteration.assign_add(1)
        return annealed_sphereface_logits(cos, labels, lam, self.scale, self.m1)

    def _hyper_parameters(self):
        return dict(m1=self.m1, **self._schedule())
