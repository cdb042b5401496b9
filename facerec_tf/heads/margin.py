"""The combined angular margin (ArcFace / CosFace / SphereFace) and the softmax baselines.

For an L2-normalised embedding and class centres, with ``cos = cos(theta)`` the cosine to
each centre and ``y`` the label::

    logit_y = s * (cos(m1 * theta_y + m2) - m3)       # the target class
    logit_j = s * cos(theta_j)                        # every other class

``(m1, m2, m3)`` = (1, 0.5, 0) is ArcFace, (1, 0, 0.35) CosFace, (1.35, 0, 0) SphereFace,
(1, 0.3, 0.2) insightface's "combined" margin. Details that follow insightface:

* ``m1 == 1`` and ``theta + m2 > pi`` (where ``cos(theta + m2)`` stops decreasing): the
  target logit falls back to ``cos - m2 * sin(m2) - m3`` (arcface_torch's ``th``/``mm``).
  With ``easy_margin`` the margin is applied only where ``cos > 0``.
* ``m1 != 1``: SphereFace's monotonic extension ``psi = (-1)^k cos(m1 theta + m2) - 2k``
  for ``m1 theta + m2`` in ``[k pi, (k + 1) pi]``, minus ``m3``.
* ``interclass_filtering_threshold > 0``: non-target cosines above the threshold are set to
  zero (with no gradient), arcface_torch's inter-class filtering for noisy data.
* ``theta`` is computed as ``atan2(sqrt(max(1 - cos^2, 1e-12)), cos)``, so value and gradient
  are finite at ``cos = +-1``. Everything runs in float32 whatever the dtype policy.
* ``margin_gradient="arcface_torch"``: the gradient of arcface_torch's ``CombinedMarginLoss``
  (that of ``s * cos`` through the target, value ``s * cos(theta + m2)``, no fallback);
  ``"exact"`` (the default) differentiates the formula above. See
  :mod:`facerec_tf.heads.angular`, where the margin math lives.

Labels are int32 class indices; ``-1`` marks a row whose class is not among these centres
(Partial FC): that row gets no margin. The target is updated with a scatter of one value per
row, never a dense one-hot of the class count.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from facerec_tf.heads.adaptive import (
    AdaFaceHead,
    AnnealedSphereFaceHead,
    CurricularFaceHead,
    MagFaceHead,
)
from facerec_tf.heads.angular import (
    MARGIN_GRADIENTS,
    check_margin_gradient,
    combined_margin,
    target_margin,
)
from facerec_tf.heads.centers import ClassCenters

__all__ = [
    "HEADS",
    "MARGIN_GRADIENTS",
    "MARGIN_PRESETS",
    "MarginHead",
    "MarginSpec",
    "SoftmaxHead",
    "combined_margin",
    "create_head",
    "list_heads",
    "target_margin",
]


@dataclasses.dataclass(frozen=True)
class MarginSpec:
    """Margin hyper-parameters; see the module docstring for the formula."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    easy_margin: bool = False
    interclass_filtering_threshold: float = 0.0
    margin_gradient: str = "exact"


MARGIN_PRESETS: dict[str, MarginSpec] = {
    "arcface": MarginSpec(m1=1.0, m2=0.5, m3=0.0),
    "cosface": MarginSpec(m1=1.0, m2=0.0, m3=0.35),
    "sphereface": MarginSpec(m1=1.35, m2=0.0, m3=0.0),
    "combined": MarginSpec(m1=1.0, m2=0.3, m3=0.2),
    "normface": MarginSpec(m1=1.0, m2=0.0, m3=0.0),
}


@keras.saving.register_keras_serializable(package="facerec_tf")
class MarginHead(keras.layers.Layer):
    """Class centres + combined margin: ``head(embeddings, labels) -> logits`` (float32).

    Without labels (inference) it returns ``scale * cos`` with no margin. The layer always
    computes in float32, so it is safe as the output layer under mixed precision.

    Args:
        num_classes: number of identities.
        scale, m1, m2, m3, easy_margin, interclass_filtering_threshold: see the module doc.
        margin_gradient: ``"exact"`` or ``"arcface_torch"`` (see the module doc).
        centers_initializer: initialiser of the class centres.
    """

    def __init__(
        self,
        num_classes,
        scale=64.0,
        m1=1.0,
        m2=0.5,
        m3=0.0,
        easy_margin=False,
        interclass_filtering_threshold=0.0,
        centers_initializer=None,
        margin_gradient="exact",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {m2}")
        check_margin_gradient(margin_gradient, m1, m2, m3, easy_margin)
        self.spec = MarginSpec(
            float(scale),
            float(m1),
            float(m2),
            float(m3),
            bool(easy_margin),
            float(interclass_filtering_threshold),
            str(margin_gradient),
        )
        self.centers = ClassCenters(num_classes, initializer=centers_initializer, name="centers")

    @property
    def num_classes(self) -> int:
        return self.centers.num_classes

    def build(self, embeddings_shape, labels_shape=None):
        self.centers.build(embeddings_shape)

    def call(self, embeddings, labels=None):
        cos = self.centers(embeddings)
        if labels is None:
            return cos * self.spec.scale
        return combined_margin(cos, labels, **dataclasses.asdict(self.spec))

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            centers_initializer=keras.initializers.serialize(self.centers.initializer),
            **dataclasses.asdict(self.spec),
        )
        return config


@keras.saving.register_keras_serializable(package="facerec_tf")
class SoftmaxHead(keras.layers.Layer):
    """Plain softmax classifier baseline: ``W x + b`` or, normalised, ``s * cos``.

    Takes ``(embeddings, labels)`` like :class:`MarginHead` (labels are ignored) so the two
    are interchangeable in a training step.

    Args:
        num_classes: number of identities.
        normalize: L2-normalise embeddings and weights (NormFace); then ``use_bias`` is off.
        scale: logit scale when ``normalize``.
    """

    def __init__(self, num_classes, normalize=False, scale=64.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.normalize = bool(normalize)
        self.scale = float(scale)
        if self.normalize:
            self.classifier = ClassCenters(num_classes, name="centers")
        else:
            self.classifier = keras.layers.Dense(num_classes, name="dense")
        self._num_classes = int(num_classes)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def build(self, embeddings_shape, labels_shape=None):
        self.classifier.build(embeddings_shape)

    def call(self, embeddings, labels=None):
        logits = self.classifier(tf.cast(embeddings, tf.float32))
        return logits * self.scale if self.normalize else logits

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, normalize=self.normalize, scale=self.scale)
        return config


HEADS = (
    "arcface",
    "cosface",
    "sphereface",
    "combined",
    "normface",
    "softmax",
    "magface",
    "curricularface",
    "adaface",
    "sphereface_annealed",
)


def list_heads() -> list[str]:
    return list(HEADS)


def create_head(name: str, num_classes: int, **kwargs):
    """Build a classification head by name.

    ``arcface``, ``cosface``, ``sphereface``, ``combined`` and ``normface`` are
    :class:`MarginHead` presets (any of ``scale``, ``m1``, ``m2``, ``m3``, ``easy_margin``,
    ``interclass_filtering_threshold``, ``margin_gradient`` may be overridden); ``softmax`` is
    the plain :class:`SoftmaxHead` (``normalize=True`` for the normalised variant).
    ``magface``, ``curricularface``, ``adaface`` and ``sphereface_annealed`` are the adaptive
    heads of :mod:`facerec_tf.heads.adaptive` (``kwargs`` go to their constructors). Those and
    ``softmax`` differentiate their logits exactly: they accept ``margin_gradient="exact"``
    and reject ``"arcface_torch"``, which arcface_torch defines for its combined margin only.
    """
    mode = kwargs.get("margin_gradient", "exact")
    if name not in MARGIN_PRESETS and name in HEADS:
        if mode != "exact":
            raise ValueError(
                f"margin_gradient={mode!r} is not defined for head {name!r} (only for "
                f"{', '.join(MARGIN_PRESETS)}); its gradient is the exact one"
            )
        kwargs.pop("margin_gradient", None)
    if name == "softmax":
        return SoftmaxHead(num_classes, **kwargs)
    adaptive_heads = {
        "magface": MagFaceHead,
        "curricularface": CurricularFaceHead,
        "adaface": AdaFaceHead,
        "sphereface_annealed": AnnealedSphereFaceHead,
    }
    if name in adaptive_heads:
        return adaptive_heads[name](num_classes, **kwargs)
    if name not in MARGIN_PRESETS:
        raise ValueError(f"unknown head {name!r}; valid names: {', '.join(HEADS)}")
    spec = {**dataclasses.asdict(MARGIN_PRESETS[name]), **kwargs}
    return MarginHead(num_classes, **spec)
