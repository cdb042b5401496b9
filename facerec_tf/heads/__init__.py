"""Classification heads: class centres, the combined angular margin, softmax baselines."""

from facerec_tf.heads.centers import ClassCenters
from facerec_tf.heads.margin import (
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
    "MARGIN_PRESETS",
    "ClassCenters",
    "MarginHead",
    "MarginSpec",
    "SoftmaxHead",
    "combined_margin",
    "create_head",
    "list_heads",
    "target_margin",
]
