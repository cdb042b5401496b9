"""Face-quality aware evaluation: PFE (mutual likelihood score) verification and MagFace-style
feature-norm quality.

PFE pair scoring
    :func:`evaluate_pfe` takes ``mu`` (raw or normalised embeddings) and ``log(sigma^2)`` of
    the ``2N`` images of a verification set, interleaved like the ``.bin`` sets (pair ``i`` =
    images ``2i`` and ``2i + 1``), scores each pair with the MLS
    (:func:`facerec_tf.losses.pfe.pfe_pair_scores`) and returns a
    :class:`~facerec_tf.evaluation.verification.VerificationResult` with the same protocol as
    insightface's accuracy: 10-fold ``KFold`` without shuffle, best threshold on the train
    folds applied to the test fold, VAL@FAR from the train folds' FAR curve, and whole-set ROC
    figures (AUC, EER, TAR@FAR) from the scores.

    :func:`~facerec_tf.evaluation.verification.verification_metrics` only accepts embeddings
    (it computes squared L2 distances itself and searches thresholds on the fixed grid
    ``arange(0, 4, 0.01)``, which fits distances between unit vectors only). MLS scores are
    unbounded (typically hundreds to thousands), so :func:`score_verification_metrics` runs the
    same fold logic (it reuses ``verification.py``'s confusion counting and ``slinear``
    interpolation) on ``distance = -MLS`` with thresholds taken from each train fold: the
    midpoints between its consecutive distinct distances (subsampled to at most
    ``max_thresholds``), plus one below and one above every distance. ``best_threshold`` is reported
    on the *similarity* (MLS) scale: a pair is called "same" when ``MLS > best_threshold``.

    With flip, an image and its mirror are fused as two observations of one face
    (:func:`~facerec_tf.losses.pfe.fuse_gaussians`, the paper's Eq. 6) before scoring, instead
    of insightface's "sum then normalise".

MagFace quality
    MagFace trains the embedding norm to grow with face quality: :func:`feature_norms` gives
    the per-image norm of the *raw* (not normalised) embedding, and :func:`summarize_quality`
    the mean (and spread) per set. For PFE the per-image uncertainty is
    :func:`~facerec_tf.losses.pfe.harmonic_mean_variance` (larger = worse), which
    :func:`summarize_quality` summarises the same way.

Everything here is NumPy; TensorFlow is imported only through ``facerec_tf.losses.pfe``
(lazily, when a PFE function is first called).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from facerec_tf.errors import FacerecError
from facerec_tf.evaluation.verification import (
    VERIFICATION_FARS,
    _accuracy,
    _folds,
    fold_val_far,
    result_from_metrics,
)

__all__ = [
    "QualityInputError",
    "QualitySummary",
    "evaluate_pfe",
    "feature_norms",
    "pfe_uncertainty",
    "score_thresholds",
    "score_verification_metrics",
    "summarize_quality",
    "summarize_sets",
]


class QualityInputError(FacerecError, ValueError):
    """Embeddings, log-variances or labels of the wrong shape for a quality evaluation."""


# ----------------------------------------------------------------------------------------------
# Verification from similarity scores


def score_thresholds(dist, max_thresholds=2000):
    """Candidate thresholds for ``dist < threshold`` decisions on arbitrary-scale distances:
    one below the minimum, the midpoints between consecutive distinct values, one above the
    maximum (every distinct split of the pairs), evenly subsampled to ``max_thresholds``."""
    values = np.unique(np.asarray(dist, np.float64))
    if values.size == 0:
        raise QualityInputError("no distances to threshold")
    span = max(values[-1] - values[0], 1.0)
    mids = (values[:-1] + values[1:]) / 2.0
    thresholds = np.concatenate([[values[0] - span], mids, [values[-1] + span]])
    if len(thresholds) > max_thresholds:
        index = np.unique(np.linspace(0, len(thresholds) - 1, max_thresholds).round().astype(int))
        thresholds = thresholds[index]
    return thresholds


def score_verification_metrics(scores, issame, num_folds=10, far_target=1e-3, max_thresholds=2000):
    """insightface's fold protocol on similarity ``scores`` (higher = more alike) ``[N]``.

    Same as :func:`~facerec_tf.evaluation.verification.verification_metrics` with
    ``dist = -scores`` and data-driven thresholds instead of the ``[0, 4)`` grids: on each
    fold the candidates are :func:`score_thresholds` of the *train* fold's distances, so the
    first best one lies halfway between two train pairs (with a data-independent grid as
    fine as the data it would hug the last train pair and misclassify any test pair in the
    gap). Returns a dict with ``accuracy`` and ``best_thresholds`` per fold (the thresholds
    on the *score* scale: "same" when ``score > threshold``), ``val``, ``val_std``, ``far``
    and ``dist``.

    Raises:
        QualityInputError: ``scores`` and ``issame`` of different lengths, non-finite scores,
            or fewer pairs than folds.
    """
    scores = np.asarray(scores, np.float64)
    issame = np.asarray(issame, bool)
    if scores.ndim != 1 or scores.shape != issame.shape:
        raise QualityInputError(
            f"scores have shape {scores.shape} and issame {issame.shape}; expected two [N]"
        )
    if not np.all(np.isfinite(scores)):
        raise QualityInputError(f"{int(np.sum(~np.isfinite(scores)))} scores are not finite")
    if len(scores) < num_folds:
        raise QualityInputError(f"{len(scores)} pairs cannot be split into {num_folds} folds")
    dist = -scores
    folds = _folds(len(dist), num_folds)
    accuracy = np.zeros(num_folds)
    best_thresholds = np.zeros(num_folds)
    val = np.zeros(num_folds)
    far = np.zeros(num_folds)
    for i, (train, test) in enumerate(folds):
        thresholds = score_thresholds(dist[train], max_thresholds)
        _, _, acc_train = _accuracy(dist[train], issame[train], thresholds)
        best = int(np.argmax(acc_train))
        best_thresholds[i] = -thresholds[best]
        accuracy[i] = _accuracy(dist[test], issame[test], thresholds[best : best + 1])[2][0]
        # nothing reaches the FAR: accept nothing (insightface's threshold 0 on distances)
        val[i], far[i] = fold_val_far(
            dist, issame, train, test, thresholds, far_target, fallback=thresholds[0]
        )
    return {
        "accuracy": accuracy,
        "best_thresholds": best_thresholds,
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "dist": dist,
    }


def _check_pfe_arrays(mu, logvar, what=""):
    mu = np.asarray(mu, np.float64)
    logvar = np.asarray(logvar, np.float64)
    if mu.ndim != 2 or mu.shape != logvar.shape:
        raise QualityInputError(
            f"{what}mu has shape {mu.shape} and {what}logvar {logvar.shape}; expected two "
            "[2N, D] arrays of the same shape"
        )
    return mu, logvar


def evaluate_pfe(
    name,
    mu,
    logvar,
    issame,
    flipped_mu=None,
    flipped_logvar=None,
    num_folds=10,
    fars=VERIFICATION_FARS,
    max_thresholds=2000,
):
    """Verification metrics of one target from PFE outputs of its ``2N`` images.

    Args:
        name: the target's name (``lfw``...).
        mu: ``[2N, D]`` embeddings (raw or normalised; pair ``i`` = rows ``2i``, ``2i + 1``).
        logvar: ``[2N, D]`` ``log(sigma^2)`` from the uncertainty head.
        issame: ``[N]`` booleans.
        flipped_mu, flipped_logvar: the same for the mirrored images, or None (no flip).
        num_folds, fars: as :func:`~facerec_tf.evaluation.verification.evaluate_embeddings`.

    Returns:
        A :class:`VerificationResult`: ``accuracy`` etc. from the MLS, ``best_threshold`` on
        the MLS scale, ``xnorm`` the mean norm of the raw ``mu`` (and flips), ROC from MLS.

    Raises:
        QualityInputError: shapes that do not fit ``[2N, D]`` / ``[N]``.
    """
    from facerec_tf.losses.pfe import fuse_gaussians, pfe_pair_scores

    mu, logvar = _check_pfe_arrays(mu, logvar)
    issame = np.asarray(issame, bool)
    if issame.ndim != 1 or mu.shape[0] != 2 * issame.shape[0]:
        raise QualityInputError(
            f"{mu.shape[0]} images for {issame.shape[0]} pairs; expected 2 images per pair "
            "(interleaved: pair i = images 2i and 2i + 1)"
        )
    if (flipped_mu is None) != (flipped_logvar is None):
        raise QualityInputError("give both flipped_mu and flipped_logvar, or neither")
    norms = np.linalg.norm(mu, axis=1)
    if flipped_mu is not None:
        fmu, flv = _check_pfe_arrays(flipped_mu, flipped_logvar, "flipped ")
        if fmu.shape != mu.shape:
            raise QualityInputError(f"flipped_mu has shape {fmu.shape} but mu {mu.shape}")
        norms = np.concatenate([norms, np.linalg.norm(fmu, axis=1)])
        mu, logvar = fuse_gaussians([mu, fmu], [logvar, flv])
    scores = pfe_pair_scores(mu[0::2], logvar[0::2], mu[1::2], logvar[1::2])
    m = score_verification_metrics(
        scores, issame, num_folds=num_folds, max_thresholds=max_thresholds
    )
    return result_from_metrics(
        name, m, scores, issame, float(np.mean(norms)), fars, flip=flipped_mu is not None
    )


# ----------------------------------------------------------------------------------------------
# Per-image quality


def feature_norms(embeddings):
    """MagFace quality: the L2 norm of each *raw* embedding, ``[N]`` float64 (higher = better
    face for a MagFace-trained model; a normalised model gives all ones).

    Raises:
        QualityInputError: ``embeddings`` not ``[N, D]``.
    """
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2:
        raise QualityInputError(f"embeddings have shape {x.shape}; expected [N, D]")
    return np.linalg.norm(x, axis=1)


def pfe_uncertainty(logvar):
    """PFE per-image uncertainty ``[N]``: harmonic mean of ``sigma^2`` (larger = worse)."""
    from facerec_tf.losses.pfe import harmonic_mean_variance

    return harmonic_mean_variance(logvar)


@dataclasses.dataclass(frozen=True)
class QualitySummary:
    """Distribution of a per-image quality score over one set."""

    name: str
    count: int
    mean: float
    std: float
    min: float
    median: float
    max: float

    def line(self) -> str:
        return (
            f"[{self.name}] quality mean {self.mean:.4f} +- {self.std:.4f} "
            f"(min {self.min:.4f}, median {self.median:.4f}, max {self.max:.4f}, "
            f"{self.count} images)"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize_quality(name, scores) -> QualitySummary:
    """Summary of per-image quality ``scores`` ``[N]`` (e.g. :func:`feature_norms` of a set's
    raw embeddings: ``mean`` is MagFace's mean norm of the set). NaN figures when empty."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0:
        nan = float("nan")
        return QualitySummary(name, 0, nan, nan, nan, nan, nan)
    return QualitySummary(
        name=name,
        count=int(s.size),
        mean=float(np.mean(s)),
        std=float(np.std(s)),
        min=float(np.min(s)),
        median=float(np.median(s)),
        max=float(np.max(s)),
    )


def summarize_sets(sets: Mapping[str, np.ndarray]) -> dict[str, QualitySummary]:
    """``{name: summarize_quality(name, scores)}`` for several sets at once."""
    return {name: summarize_quality(name, scores) for name, scores in sets.items()}
