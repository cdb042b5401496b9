"""Embedding distillation: pull a student's embedding towards a frozen teacher's.

Both embeddings are L2-normalised first (raw backbone outputs may be given), the teacher gets
``stop_gradient``, and the loss is per example ``[B]``, float32 whatever the dtype policy:

* ``kind="l2"``: ``||s - t||^2`` (0 to 4; equals ``2 - 2 cos``).
* ``kind="angular"``: the angle ``theta = arccos(<s, t>)`` in radians (0 to pi), computed as
  ``2 * atan2(||s - t||, ||s + t||)`` (exact for unit vectors and well conditioned at both
  ends), each norm set to 0 below ``1e-6``. ``arccos`` itself has an infinite derivative at
  ``cos = 1``, and clipping ``cos`` only moves the blow-up to the rounding noise of ``cos``
  near 1 (float32 cannot resolve angles below ~3e-4 from ``cos``), so it is not used. With
  the formula above the value is exact (0 at ``s == t``, pi at ``s == -t``), the gradient is
  finite everywhere, has norm 1 (per unit of the normalised embedding) for any ``theta`` above
  ~1e-6 (the angle is a distance on the sphere: it behaves like an L1 loss), and is exactly 0
  at ``s == t``.

``1 - cos`` is not offered as a separate kind: on unit vectors it is ``||s - t||^2 / 2``, i.e.
``kind="l2"`` halved.
"""

from __future__ import annotations

import tensorflow as tf

from facerec_tf.errors import FacerecError

__all__ = ["DISTILLATION_KINDS", "DistillationInputError", "embedding_distillation_loss"]

DISTILLATION_KINDS = ("l2", "angular")

_NORM_FLOOR_SQ = 1e-12  # ||.||^2 floor: gradients of the norms stay finite at 0


class DistillationInputError(FacerecError, ValueError):
    """Student and teacher embeddings of the wrong rank or of different shapes, or an
    unknown loss kind."""


def embedding_distillation_loss(student, teacher, kind="l2"):
    """Per-example distillation loss ``[B]`` (float32) between L2-normalised embeddings.

    Args:
        student: ``[B, D]`` embeddings of the model being trained (any float dtype).
        teacher: ``[B, D]`` embeddings of the frozen teacher (receives no gradient).
        kind: ``"l2"`` (``||s - t||^2``) or ``"angular"`` (angle in radians); see the module
            docstring.

    Raises:
        DistillationInputError: unknown ``kind``, or shapes that are not both ``[B, D]`` with
            the same ``D`` (and ``B`` where known).
    """
    if kind not in DISTILLATION_KINDS:
        raise DistillationInputError(
            f"unknown distillation kind {kind!r}; valid kinds: {', '.join(DISTILLATION_KINDS)}"
        )
    s = tf.cast(student, tf.float32)
    t = tf.stop_gradient(tf.cast(teacher, tf.float32))
    if s.shape.rank != 2 or t.shape.rank != 2:
        raise DistillationInputError(
            f"student has shape {s.shape} and teacher {t.shape}; expected [B, D] both"
        )
    if not s.shape.is_compatible_with(t.shape):
        raise DistillationInputError(
            f"student has shape {s.shape} but teacher has shape {t.shape} (expected the same "
            "[B, D]: a teacher of another embedding size needs a projection first)"
        )
    s = tf.math.l2_normalize(s, axis=1, epsilon=1e-12)
    t = tf.math.l2_normalize(t, axis=1, epsilon=1e-12)
    diff_sq = tf.reduce_sum(tf.square(s - t), axis=1)
    if kind == "l2":
        return diff_sq
    sum_sq = tf.reduce_sum(tf.square(s + t), axis=1)
    return 2.0 * tf.atan2(_safe_norm(diff_sq), _safe_norm(sum_sq))


def _safe_norm(sq):
    """``sqrt(sq)``, and exactly 0 with a zero gradient where ``sq <= 1e-12`` (the inner
    ``where`` keeps the unused ``sqrt`` branch's gradient finite)."""
    big = sq > _NORM_FLOOR_SQ
    return tf.where(big, tf.sqrt(tf.where(big, sq, 1.0)), 0.0)
