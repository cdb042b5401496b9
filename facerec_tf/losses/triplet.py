"""Triplet losses with online mining inside the batch (FaceNet and insightface's angular one).

For an anchor ``a``, a positive ``p`` (same label, ``p != a``) and a negative ``n`` (another
label), on L2-normalised embeddings (normalised here, whatever the caller passes)::

    loss(a, p, n) = max(d(a, p) - d(a, n) + margin, 0)

Distances (``distance=``):

* ``"squared_euclidean"`` (default): ``||a - p||^2`` in ``[0, 4]``, as in the FaceNet paper
  (Schroff et al. 2015, eq. 1) and davidsandberg/facenet (``src/facenet.py triplet_loss`` on
  squared distances, ``--alpha`` 0.2 in ``src/train_tripletloss.py``): margin 0.2 by default.
  bubbliiiing/facenet-pytorch's ``triplet_loss(alpha=0.2)`` uses the plain (not squared)
  Euclidean distance instead, i.e. ``distance="euclidean"`` (it also averages over the
  violating triplets only, of triplets chosen offline).
* ``"euclidean"``: ``||a - p||`` in ``[0, 2]``.
* ``"angular"``: ``arccos(a . p)`` in radians, ``[0, pi]``: insightface's MXNet ``atriplet``
  loss (``recognition/ArcFace/train.py``: ``relu(arccos(a.p) - arccos(a.n) + alpha)``, with
  ``triplet_alpha = 0.35`` in its ``sample_config.py``; its squared-Euclidean ``triplet``
  uses 0.3). :func:`angular_triplet_loss` has that default margin.

Every distance comes from the Gram matrix ``G`` as ``d2 = |a|^2 + |b|^2 - 2 G``, with the
diagonal of ``G`` as the squared norms: the diagonal is exactly 0, and bit-identical rows give
exactly 0 too on the CPU kernels (same sums; no GEMM promises it bit for bit). The angle is
``2 atan2(|a - b|, |a + b|)`` (exact at 0 and pi, unlike ``arccos`` whose derivative is
infinite at +-1), and square roots are taken as ``sqrt(x) if x > 0 else 0`` on both value and
gradient: two coinciding embeddings give a finite gradient. Float32 cancellation bounds the
absolute error of ``d2`` by a few 1e-7, i.e. about 5e-4 on ``d`` or the angle of *nearly*
coinciding (but not identical) embeddings; it is negligible against any useful margin.

Mining (``mining=``), over the anchors of one batch:

* ``"batch_hard"`` (Hermans et al. 2017, "In Defense of the Triplet Loss"): per anchor, the
  hardest positive (largest ``d(a, p)``) and the hardest negative (smallest ``d(a, n)``); the
  anchor's loss is ``max(d_ap* - d_an* + margin, 0)``.
* ``"semi_hard"`` (FaceNet section 3.2 with tensorflow-addons' ``triplet_semihard_loss``
  semantics): for every positive pair ``(a, p)``, the negative with the smallest ``d(a, n)``
  strictly greater than ``d(a, p)``; when there is none, tfa's fallback: the negative with the
  *largest* ``d(a, n)`` (the easiest one, so the pair usually adds 0). The anchor's loss is the
  mean over its positives. On a P x K batch (every anchor has K - 1 positives) the mean over
  the batch equals tfa's loss, which averages over all positive pairs. An exact tie
  ``d(a, n) == d(a, p)`` (a negative identical to a positive) is not "farther"; float32
  rounding of the Gram matrix may break such a tie either way.
* ``"all"``: the mean of the hinge over every valid ``(p, n)`` of the anchor (the zeros
  included; "batch all" papers often average over the non-zero terms instead).

Every function returns the **per-example** loss ``float32 [B]``: 0 for an anchor without a
positive or without a negative in the batch. Reduce it as you like (``reduce_mean``, or sum
over the global batch under a strategy); :func:`triplet_anchor_mask` tells which anchors had
a triplet. Everything runs in float32 whatever the dtype policy.

Mining is done **within the batch passed in**: under ``tf.distribute`` that is the per-replica
batch, so each replica needs its own P identities x K images (see
:mod:`facerec_tf.data.pk_sampler`); negatives on other replicas are not seen. Memory:
``batch_hard`` and ``semi_hard`` use ``O(B^2)`` (semi-hard sorts each row of negatives and
binary-searches it), ``all`` builds a ``[B, B, B]`` tensor (``B = 256``: 64 MB per tensor).
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "ANGULAR_MARGIN",
    "DISTANCES",
    "FACENET_MARGIN",
    "MINING",
    "angular_triplet_loss",
    "pairwise_distances",
    "triplet_anchor_mask",
    "triplet_loss",
]

#: FaceNet's margin (alpha) on squared Euclidean distances of unit vectors.
FACENET_MARGIN = 0.2
#: insightface's ``atriplet`` margin, radians.
ANGULAR_MARGIN = 0.35

DISTANCES = ("squared_euclidean", "euclidean", "angular")
MINING = ("batch_hard", "semi_hard", "all")


def _safe_sqrt(x):
    """``sqrt(x)`` for ``x > 0`` else 0, with a zero (not NaN / inf) gradient at 0."""
    positive = x > 0.0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, 1.0)), 0.0)


def pairwise_distances(embeddings, distance: str = "squared_euclidean", normalize: bool = True):
    """``float32 [B, B]`` distances between the rows of ``embeddings [B, D]``.

    Args:
        embeddings: ``[B, D]`` float tensor (any float dtype; computed in float32).
        distance: one of :data:`DISTANCES` (see the module docstring).
        normalize: L2-normalise the rows first (the triplet losses always do).

    The diagonal is exactly 0.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    x = tf.cast(embeddings, tf.float32)
    if normalize:
        x = tf.math.l2_normalize(x, axis=1)
    gram = tf.matmul(x, x, transpose_b=True)
    sq = tf.linalg.diag_part(gram)
    norms = sq[:, None] + sq[None, :]
    zero_diag = tf.zeros_like(sq)
    d2 = tf.linalg.set_diag(tf.maximum(norms - 2.0 * gram, 0.0), zero_diag)
    if distance == "squared_euclidean":
        return d2
    diff = _safe_sqrt(d2)
    if distance == "euclidean":
        return diff
    total = _safe_sqrt(tf.maximum(norms + 2.0 * gram, 0.0))  # |a + b|
    # atan2(0, 0) has a NaN gradient (only for zero embeddings): use atan2(0, 1) there.
    total = tf.where((diff > 0.0) | (total > 0.0), total, 1.0)
    return tf.linalg.set_diag(2.0 * tf.atan2(diff, total), zero_diag)


def _masks(labels):
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    same = tf.equal(labels[:, None], labels[None, :])
    eye = tf.cast(tf.eye(tf.shape(labels)[0]), tf.bool)
    return same & ~eye, ~same


def triplet_anchor_mask(labels):
    """``bool [B]``: the anchors that have at least one positive and one negative."""
    positive, negative = _masks(labels)
    return tf.reduce_any(positive, axis=1) & tf.reduce_any(negative, axis=1)


def _batch_hard(d, positive, negative, margin):
    hardest_pos = tf.reduce_max(tf.where(positive, d, 0.0), axis=1)
    has_neg = tf.reduce_any(negative, axis=1)
    big = tf.stop_gradient(tf.reduce_max(d)) + 1.0  # finite, larger than every distance
    hardest_neg = tf.reduce_min(tf.where(negative, d, big), axis=1)
    hardest_neg = tf.where(has_neg, hardest_neg, 0.0)
    return tf.nn.relu(hardest_pos - hardest_neg + margin)


def _semi_hard(d, positive, negative, margin):
    # Row a of `ordered` holds d(a, n) for the negatives of a, ascending, then `big`s.
    big = tf.stop_gradient(tf.reduce_max(d)) + 1.0
    neg_d = tf.where(negative, d, big)
    order = tf.argsort(neg_d, axis=1, stable=True)
    ordered = tf.gather(neg_d, order, axis=1, batch_dims=1)
    num_neg = tf.reduce_sum(tf.cast(negative, tf.int32), axis=1, keepdims=True)
    # For the pair (a, p): how many negatives have d(a, n) <= d(a, p). The `big` padding is
    # never <= d(a, p), so this counts real negatives only.
    count = tf.searchsorted(tf.stop_gradient(ordered), tf.stop_gradient(d), side="right")
    count = tf.cast(count, tf.int32)
    semi_hard = count < num_neg  # the smallest d(a, n) > d(a, p) exists
    pick = tf.where(semi_hard, count, tf.maximum(num_neg - 1, 0))  # else the largest one
    chosen = tf.gather(ordered, pick, axis=1, batch_dims=1)
    valid = positive & (num_neg > 0)
    hinge = tf.where(valid, tf.nn.relu(d - tf.where(valid, chosen, 0.0) + margin), 0.0)
    num_pos = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)
    return tf.reduce_sum(hinge, axis=1) / tf.maximum(num_pos, 1.0)


def _all(d, positive, negative, margin):
    valid = positive[:, :, None] & negative[:, None, :]  # [a, p, n]
    hinge = tf.nn.relu(d[:, :, None] - d[:, None, :] + margin)
    hinge = tf.where(valid, hinge, 0.0)
    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=[1, 2])
    return tf.reduce_sum(hinge, axis=[1, 2]) / tf.maximum(count, 1.0)


_MINERS = {"batch_hard": _batch_hard, "semi_hard": _semi_hard, "all": _all}


def triplet_loss(
    labels,
    embeddings,
    margin: float | None = None,
    mining: str = "batch_hard",
    distance: str = "squared_euclidean",
):
    """Per-example triplet loss ``float32 [B]`` with online mining inside this batch.

    Args:
        labels: int ``[B]`` identity labels.
        embeddings: ``[B, D]`` embeddings (L2-normalised here, computed in float32).
        margin: the hinge margin; ``None``: :data:`FACENET_MARGIN` (0.2) for the Euclidean
            distances, :data:`ANGULAR_MARGIN` (0.35 rad) for ``"angular"``.
        mining: ``"batch_hard"``, ``"semi_hard"`` or ``"all"`` (module docstring).
        distance: ``"squared_euclidean"``, ``"euclidean"`` or ``"angular"``.

    Returns:
        ``float32 [B]``; 0 for anchors without a positive or a negative in the batch.
    """
    if mining not in _MINERS:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if margin is None:
        margin = ANGULAR_MARGIN if distance == "angular" else FACENET_MARGIN
    margin = float(margin)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    d = pairwise_distances(embeddings, distance)
    positive, negative = _masks(labels)
    loss = _MINERS[mining](d, positive, negative, margin)
    valid = tf.reduce_any(positive, axis=1) & tf.reduce_any(negative, axis=1)
    return tf.where(valid, loss, 0.0)


def angular_triplet_loss(labels, embeddings, margin: float = ANGULAR_MARGIN, mining="batch_hard"):
    """insightface's angular triplet loss: ``triplet_loss(distance="angular")``, margin 0.35."""
    return triplet_loss(labels, embeddings, margin=margin, mining=mining, distance="angular")
