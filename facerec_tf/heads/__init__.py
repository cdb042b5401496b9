"""Classification heads: class centres, the combined angular margin, adaptive margins
(MagFace, CurricularFace, AdaFace, annealed SphereFace), softmax baselines."""

from facerec_tf.heads.adaptive import (
    AdaFaceHead,
    AnnealedSphereFaceHead,
    CurricularFaceHead,
    MagFaceHead,
)
from facerec_tf.heads.centers import ClassCenters
from facerec_tf.heads.margin import (
    MARGIN_GRADIENTS,
    MARGIN_PRESETS,
    MarginHead,
    MarginSpec,
    SoftmaxHead,
    combined_margin,
    create_head,
    list_heads,
    target_margin,
)

__all__ = [
    "MARGIN_GRADIENTS",
    "MARGIN_PRESETS",
    "AdaFaceHead",
    "AnnealedSphereFaceHead",
    "ClassCenters",
    "CurricularFaceHead",
    "MagFaceHead",
    "MarginHead",
    "MarginSpec",
    "SoftmaxHead",
    "combined_margin",
    "create_head",
    "list_heads",
    "target_margin",
]
