"""Metric-learning and auxiliary losses (triplet, center loss, ...).

Importing this package only defines functions and classes (no device, precision or logging
configuration).
"""

from facerec_tf.losses.center_loss import CenterLoss
from facerec_tf.losses.distill import (
    DISTILLATION_KINDS,
    DistillationInputError,
    embedding_distillation_loss,
)
from facerec_tf.losses.pfe import (
    PFEInputError,
    UncertaintyHead,
    build_pfe_model,
    feature_extractor,
    mls_loss,
    mutual_likelihood_score,
    pfe_pair_scores,
)
from facerec_tf.losses.triplet import (
    ANGULAR_MARGIN,
    DISTANCES,
    FACENET_MARGIN,
    MINING,
    angular_triplet_loss,
    pairwise_distances,
    triplet_anchor_mask,
    triplet_loss,
)

__all__ = [
    "ANGULAR_MARGIN",
    "DISTANCES",
    "DISTILLATION_KINDS",
    "FACENET_MARGIN",
    "MINING",
    "CenterLoss",
    "DistillationInputError",
    "PFEInputError",
    "UncertaintyHead",
    "angular_triplet_loss",
    "build_pfe_model",
    "embedding_distillation_loss",
    "feature_extractor",
    "mls_loss",
    "mutual_likelihood_score",
    "pairwise_distances",
    "pfe_pair_scores",
    "triplet_anchor_mask",
    "triplet_loss",
]
