"""What a training step minimises: per-example loss terms from the config's ``head`` and
``loss`` sections.

One replica's step computes, for each example of its batch::

    softmax   softmax_weight * CE(head(embedding, label))       (unless head.name=none)
    <aux>     the head's own terms (MagFace's lambda_g * g(a))
    triplet   triplet_weight * triplet(embeddings, labels)      (mined in the replica batch)
    center    center_weight * 0.5 ||x - c_y||^2                 (centres updated at rate alpha)
    distill   distill_weight * d(normalise(x), normalise(teacher(image)))
    pfe       -MLS over the genuine pairs (frozen backbone, only the uncertainty head trains)

The trainer sums the terms, averages over the *global* batch and logs each one
(``train/loss_<term>`` in TensorBoard).
"""

from __future__ import annotations

from typing import NamedTuple

from facerec_tf.errors import ConfigError


class ObjectiveOutput(NamedTuple):
    embeddings: object  # [B, D] raw embeddings (float)
    logits: object  # [B, C] float32, or None without a classification head
    terms: dict  # name -> float32 [B] weighted per-example losses


class Objective:
    """The loss of one replica's batch, built from the task config (see the module doc).

    Args:
        task: the :class:`~facerec_tf.training.task.FaceRecognitionTask`.
        backbone: the embedding model (frozen here when ``loss.pfe``).
        head: the classification head or ``None``.
    """

    def __init__(self, task, backbone, head):
        loss = task.config.loss
        self.config = loss
        self.backbone, self.head = backbone, head
        self.include_preprocessing = task.config.model.include_preprocessing
        self.center = self.teacher = self.uncertainty = self.extractor = None
        dim = backbone.embedding_size
        if loss.pfe:
            from facerec_tf.losses.pfe import UncertaintyHead, feature_extractor

            if not task.config.model.pretrained:
                raise ConfigError(
                    "PFE trains an uncertainty head on a frozen, trained backbone: set "
                    "model.pretrained to its .keras file or run folder",
                    key="model.pretrained",
                )

            backbone.trainable = False
            self.extractor = feature_extractor(backbone)
            self.uncertainty = UncertaintyHead(dim, name="uncertainty_head")
            self.uncertainty.build(tuple(self.extractor.outputs[0].shape))
        if loss.center_weight > 0:
            from facerec_tf.losses.center_loss import CenterLoss

            self.center = CenterLoss(task.num_classes, alpha=loss.center_alpha, name="center")
            self.center.build((None, dim))
        if loss.distill_weight > 0:
            from facerec_tf.training.saved_models import load_backbone

            if not loss.teacher:
                raise ConfigError(
                    "distillation needs a teacher: a backbone .keras file or a run folder",
                    key="loss.teacher",
                )

            teacher = load_backbone(loss.teacher, key="loss.teacher")
            if tuple(teacher.input_shape[1:]) != tuple(backbone.input_shape[1:]):
                raise ConfigError(
                    f"the teacher takes images of {teacher.input_shape[1:]}, the student "
                    f"{backbone.input_shape[1:]}",
                    key="loss.teacher",
                )
            if int(teacher.outputs[0].shape[-1]) != dim:
                raise ConfigError(
                    f"the teacher's embedding has {teacher.outputs[0].shape[-1]} dimensions, "
                    f"the student's {dim} (model.embedding_size)",
                    key="loss.teacher",
                )
            teacher.trainable = False
            self.teacher = teacher

    # ---- variables -----------------------------------------------------------------------
    @property
    def backbone_variables(self) -> list:
        return [] if self.uncertainty is not None else list(self.backbone.trainable_variables)

    @property
    def head_variables(self) -> list:
        out = list(self.head.trainable_variables) if self.head is not None else []
        if self.uncertainty is not None:
            out += list(self.uncertainty.trainable_variables)
        return out

    @property
    def centers(self) -> list:
        """The class-centre variable (for ``optimizer.centers_weight_decay_mult``)."""
        kernel = getattr(getattr(self.head, "centers", None), "kernel", None)
        return [kernel] if kernel is not None else []

    def trackables(self) -> dict:
        """Extra state for the checkpoint (centre-loss centres, the PFE head)."""
        out = {}
        if self.center is not None:
            out["center_loss"] = self.center
        if self.uncertainty is not None:
            out["uncertainty_head"] = self.uncertainty
        return out

    # ---- the loss ------------------------------------------------------------------------
    def __call__(self, images, labels, train_backbone: bool = True) -> ObjectiveOutput:
        """``train_backbone=False``: the backbone runs in inference mode (BN statistics and
        dropout frozen) and passes no gradient (fine-tuning's head-only phase)."""
        import keras
        import tensorflow as tf

        from facerec_tf.models.backbone import backbone_input

        c = self.config
        terms = {}
        images = backbone_input(images, self.include_preprocessing)
        if self.uncertainty is not None:
            from facerec_tf.losses.pfe import mls_loss

            features, embeddings = self.extractor(images, training=False)
            logvar = self.uncertainty(features, training=True)
            terms["pfe"] = mls_loss(labels, tf.stop_gradient(embeddings), logvar)
            return ObjectiveOutput(embeddings, None, terms)

        embeddings = self.backbone(images, training=train_backbone)
        if not train_backbone:
            embeddings = tf.stop_gradient(embeddings)
        logits = None
        if self.head is not None:
            logits = self.head(embeddings, labels, training=True)
            ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            terms["softmax"] = c.softmax_weight * tf.cast(ce, tf.float32)
            auxiliary = getattr(self.head, "auxiliary_losses", None)
            if auxiliary is not None:
                terms.update(auxiliary(embeddings, labels))
        if c.triplet_weight > 0:
            from facerec_tf.losses.triplet import triplet_loss

            terms["triplet"] = c.triplet_weight * triplet_loss(
                labels,
                embeddings,
                margin=c.triplet_margin,
                mining=c.triplet_mining,
                distance=c.triplet_distance,
            )
        if self.center is not None:
            terms["center"] = c.center_weight * self.center(embeddings, labels, training=True)
        if self.teacher is not None:
            from facerec_tf.losses.distill import embedding_distillation_loss

            target = self.teacher(images, training=False)
            terms["distill"] = c.distill_weight * embedding_distillation_loss(
                embeddings, target, kind=c.distill_kind
            )
        return ObjectiveOutput(embeddings, logits, terms)
