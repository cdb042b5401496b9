"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016).

For embeddings ``x_i`` with labels ``y_i`` and class centres ``c_j``::

    L_i = 0.5 * ||x_i - c_{y_i}||^2                                  (per example, eq. 2)

The centres are **not** learnt by gradient descent. After computing the loss, a training
step moves them towards the batch features (eq. 4 and Algorithm 1)::

    delta_c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)       n_j = #{i: y_i = j}
    c_j      <- c_j - alpha * delta_c_j

with ``alpha`` the centre update rate (0.5 by default; the paper explores 0.01-1). The loss
of the step uses the centres *before* the update; classes absent from the batch do not move.
The total objective is ``softmax + lambda * mean(L_i)``: the layer returns the unweighted
``L_i`` and the caller applies ``lambda`` (0.003-0.01 in the paper's face experiments).

Distributed training: under a ``tf.distribute`` strategy the update uses the **global**
batch. Each replica contributes its ``(c_{y_i} - x_i, 1)`` rows as ``tf.IndexedSlices``;
``ReplicaContext.all_reduce("sum", ...)`` concatenates them (an all-gather of ``B x (D + 1)``
numbers per replica, never a dense ``[C, D]`` tensor), every replica reduces them per class
with ``tf.unique`` + ``unsorted_segment_sum`` and applies the same ``scatter_sub``. The
centres variable is created with ``aggregation="only_first_replica"``, which makes that
replica-context update legal (the first replica's value is written to every copy).
Nothing is one-hot encoded: memory is ``O(B * D)`` on top of the ``[C, D]`` centres.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["CenterLoss"]


@keras.saving.register_keras_serializable(package="facerec_tf")
class CenterLoss(keras.layers.Layer):
    """``center_loss(embeddings, labels, training) -> float32 [B]``; see the module doc.

    The layer owns the non-trainable centres ``[num_classes, D]`` (zeros at start, ``D``
    taken from the embeddings at build time) and always computes in float32.

    Args:
        num_classes: number of identities ``C``; labels must be in ``[0, C)``.
        alpha: centre update rate in ``(0, 1]`` (Wen et al.: 0.5).
    """

    def __init__(self, num_classes, alpha=0.5, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha (the centre update rate) must be in (0, 1], got {alpha}")
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)

    def build(self, embeddings_shape, labels_shape=None):
        dim = embeddings_shape[-1]
        if dim is None:
            raise ValueError("the embedding size (last dimension) must be known to build")
        self.centers = self.add_weight(
            shape=(self.num_classes, int(dim)),
            initializer="zeros",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
            name="centers",
        )

    def call(self, embeddings, labels, training=None):
        x = tf.cast(embeddings, tf.float32)
        y = tf.reshape(tf.cast(labels, tf.int32), [-1])
        centers_y = tf.stop_gradient(tf.gather(tf.convert_to_tensor(self.centers), y))
        diff = x - centers_y
        loss = 0.5 * tf.reduce_sum(tf.square(diff), axis=1)
        if training:
            self._update_centers(tf.stop_gradient(-diff), y)
        return loss

    def _update_centers(self, c_minus_x, labels):
        """``c_j -= alpha * sum_{y_i = j} (c_j - x_i) / (1 + n_j)`` over the global batch."""
        dim = self.centers.shape[-1]
        rows = tf.concat([c_minus_x, tf.ones_like(c_minus_x[:, :1])], axis=1)
        update = tf.IndexedSlices(
            rows, labels, dense_shape=tf.constant([self.num_classes, dim + 1], tf.int32)
        )
        ctx = tf.distribute.get_replica_context()
        if ctx is not None:  # also the default (no strategy) context: then the identity
            update = ctx.all_reduce(tf.distribute.ReduceOp.SUM, update)
        classes, position = tf.unique(tf.cast(update.indices, tf.int32))
        sums = tf.math.unsorted_segment_sum(update.values, position, tf.size(classes))
        delta = sums[:, :dim] / (1.0 + sums[:, dim:])
        variable = self.centers.value
        variable.scatter_sub(tf.IndexedSlices(self.alpha * delta, classes))

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0],)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, alpha=self.alpha)
        return config
