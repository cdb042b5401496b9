"""Margin math on cosines, shared by every head (pure functions, float32).

:func:`target_margin` is ``cos(m1 * theta + m2) - m3`` with insightface's fallbacks and
:func:`combined_margin` the scaled logits of the combined margin; see
:mod:`facerec_tf.heads.margin` for the formula and :mod:`facerec_tf.heads.adaptive` for the
adaptive heads built on the same helpers. This module imports no other head module.

``margin_gradient`` selects the gradient of the target logit with respect to its cosine:

* ``"exact"``: the derivative of the margin formula (full-gradient ArcFace).
* ``"arcface_torch"``: arcface_torch's ``CombinedMarginLoss``. For ``m1 == 1, m3 == 0`` it
  computes ``cos(acos(cos) + m2)`` in place under ``torch.no_grad()``, so the value carries the
  margin while the gradient is that of ``s * cos`` (target factor 1 instead of
  ``sin(theta + m2) / sin(theta)``, about ``cos m2`` near ``theta = 0``); it has no
  ``theta + m2 > pi`` fallback and no easy margin. Its ``m3 > 0`` branch is ``cos - m3``,
  differentiable and so identical to ``"exact"`` (with ``m2 == 0``). It is defined for
  ``m1 == 1`` without ``easy_margin`` and with ``m2`` and ``m3`` not both positive
  (arcface_torch drops ``m2`` when ``m3 > 0``); :func:`check_margin_gradient` rejects the rest.
"""

from __future__ import annotations

import math

import tensorflow as tf

MARGIN_GRADIENTS = ("exact", "arcface_torch")

_SIN_EPS = 1e-12


def check_margin_gradient(margin_gradient, m1, m2, m3, easy_margin=False) -> None:
    """Raise ``ValueError`` when ``margin_gradient`` is unknown or not defined for this margin."""
    if margin_gradient not in MARGIN_GRADIENTS:
        raise ValueError(
            f"margin_gradient must be one of {', '.join(MARGIN_GRADIENTS)}, got {margin_gradient!r}"
        )
    if margin_gradient == "exact":
        return
    if m1 != 1.0:
        raise ValueError(
            f"margin_gradient='arcface_torch' needs m1 == 1, got m1={m1} "
            "(arcface_torch's CombinedMarginLoss has no SphereFace branch)"
        )
    if m2 > 0 and m3 > 0:
        raise ValueError(
            f"margin_gradient='arcface_torch' takes m2 or m3, not both (got m2={m2}, m3={m3}): "
            "arcface_torch's CombinedMarginLoss drops m2 when m3 > 0"
        )
    if easy_margin:
        raise ValueError(
            "margin_gradient='arcface_torch' has no easy_margin (arcface_torch's "
            "CombinedMarginLoss applies cos(theta + m2) to every target)"
        )


def theta(cos):
    """``acos(cos)`` with a finite value and gradient at ``cos = +-1``."""
    sin = tf.sqrt(tf.maximum(1.0 - tf.square(cos), _SIN_EPS))
    return tf.atan2(sin, cos)


def target_index(labels):
    """(valid [B] bool, index [B, 2] for gather_nd/scatter) from int labels (-1: none)."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    valid = labels >= 0
    rows = tf.range(tf.shape(labels)[0], dtype=tf.int32)
    return valid, tf.stack([rows, tf.where(valid, labels, 0)], axis=1)


def replace_target(cos, valid, index, new_target):
    """``cos`` with the target column of each valid row replaced by ``new_target``."""
    new_target = tf.where(valid, new_target, tf.gather_nd(cos, index))
    return tf.tensor_scatter_nd_update(cos, index, new_target)


def target_margin(cos, m1, m2, m3, easy_margin=False):
    """``cos(m1 * theta + m2) - m3`` with insightface's fallbacks, elementwise, float32."""
    cos = tf.cast(cos, tf.float32)
    angle = m1 * theta(cos) + m2
    if m1 == 1.0:
        with_margin = tf.cos(angle)
        if easy_margin:
            out = tf.where(cos > 0.0, with_margin, cos)
        else:
            keep = cos > math.cos(math.pi - m2)
            out = tf.where(keep, with_margin, cos - math.sin(math.pi - m2) * m2)
    else:
        k = tf.floor(angle / math.pi)
        sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)
        out = sign * tf.cos(angle) - 2.0 * k
        if easy_margin:
            out = tf.where(cos > 0.0, out, cos)
    return out - m3


def arcface_torch_target(cos, m2, m3):
    """arcface_torch's target: value ``cos(acos(cos) + m2) - m3``, gradient 1 w.r.t. ``cos``."""
    cos = tf.cast(cos, tf.float32)
    if m2 == 0:
        return cos - m3  # the m3 > 0 (CosFace) branch: differentiable as it stands
    value = tf.cos(tf.acos(tf.clip_by_value(cos, -1.0, 1.0)) + m2)
    return cos + tf.stop_gradient(value - cos) - m3


def combined_margin(
    cos,
    labels,
    scale=64.0,
    m1=1.0,
    m2=0.5,
    m3=0.0,
    easy_margin=False,
    interclass_filtering_threshold=0.0,
    margin_gradient="exact",
):
    """Scaled logits ``[B, C]`` (float32) from cosines ``[B, C]`` and int labels ``[B]``.

    A label of -1 (or any negative value) means "target not in these columns": the row gets
    no margin. A label >= C is an error under eager execution (``tf.gather`` bound check).
    ``margin_gradient``: see the module doc.
    """
    check_margin_gradient(margin_gradient, m1, m2, m3, easy_margin)
    cos = tf.cast(cos, tf.float32)
    valid, index = target_index(labels)
    target_cos = tf.gather_nd(cos, index)
    if interclass_filtering_threshold > 0:
        keep = tf.stop_gradient(tf.cast(cos <= interclass_filtering_threshold, cos.dtype))
        cos = cos * keep  # the target column is overwritten below, so it is never filtered
    if margin_gradient == "arcface_torch":
        new_target = arcface_torch_target(target_cos, m2, m3)
    else:
        new_target = target_margin(target_cos, m1, m2, m3, easy_margin)
    # Rows without a local target write back their own (possibly filtered) column 0.
    return replace_target(cos, valid, index, new_target) * scale
