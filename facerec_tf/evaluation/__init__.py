"""Verification metrics (insightface-exact) and embedding helpers."""

from facerec_tf.evaluation.verification import (
    VerificationResult,
    embed_pairs,
    evaluate_embeddings,
    verification_metrics,
)

__all__ = ["VerificationResult", "embed_pairs", "evaluate_embeddings", "verification_metrics"]
