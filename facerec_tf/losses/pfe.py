"""Probabilistic Face Embeddings (PFE, Shi & Jain, ICCV 2019): an uncertainty head on a frozen
backbone, trained with the mutual likelihood score (MLS).

Each face is a Gaussian ``N(mu, diag(sigma^2))`` in the embedding space: ``mu`` is the frozen
backbone's L2-normalised embedding and ``log(sigma^2)`` comes from a small head trained on top.
For two faces the paper's Eq. 3 is::

    MLS = -1/2 * sum_l [ (mu1_l - mu2_l)^2 / (s1_l + s2_l) + log(s1_l + s2_l) ] - D/2 log(2 pi)

with ``s = sigma^2``. The official code (``seasonSH/Probabilistic-Face-Embeddings``,
``utils/tflib.py::negative_MLS`` and ``utils/utils.py::pair_MLS_score``) drops the ``1/2`` and
the constant: its loss is ``2 * (-MLS) - D log(2 pi)``. The constant does not change the
ranking nor the gradients; the factor 2 only rescales the learning rate (official SGD lr
``1e-3`` on its loss is our lr ``2e-3`` on :func:`mls_loss`). Here
:func:`mutual_likelihood_score` is the paper's equation (``include_constant=False`` drops the
constant), and :func:`mls_loss` is its negative.

Numerics: the fused variance ``s1 + s2 + eps`` and its log are computed from the log-variances
with a log-sum-exp (``eps = 1e-10`` as the official code's ``1e-10 + sigma_sq_fuse``), so value
and gradients are finite for any finite log-variance (``-100`` or ``+200`` included) and for
identical embeddings. Everything runs in float32 whatever the dtype policy.

The head (:class:`UncertaintyHead`) follows the official ``models/uncertainty_module.py``:

    flatten -> FC(no bias) -> BN -> ReLU -> FC(no bias) -> BN(no centre, no scale)
            -> gamma * x + beta  (one scalar gamma, beta shared by all dimensions,
                                  initialised 1e-4 and -7)
            -> log(1e-6 + exp(x))  (a floor of 1e-6 on sigma^2)

and returns ``log(sigma^2)`` ``[B, D]``. Its input is, as in the official code, the backbone's
*feature vector before the embedding dense layer* (``conv_final`` flattened there; for our
IResNet the ``head_fc`` input, 512 x 7 x 7 = 25088 values at 112 x 112; for MobileFaceNet the
``gdc_fc`` input, 512 values). :func:`feature_extractor` builds the two-output model
``images -> [features, embedding]`` for any of our backbones (the input of the last ``Dense``
layer); ``source="embedding"`` feeds the embedding itself instead, which is cheaper (a
``D x D`` first layer) but sees only what survived the projection.

Training (see :func:`mls_loss`): the backbone is frozen (``training=False``, no variables in the
optimiser; ``mu`` gets ``stop_gradient``), only the head is trained, on P x K batches (the
official config: 256 images = 64 identities x 4), so every anchor has genuine pairs.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from facerec_tf.errors import FacerecError
from facerec_tf.models import blocks

__all__ = [
    "MLS_EPS",
    "PFEInputError",
    "UncertaintyHead",
    "build_pfe_model",
    "feature_extractor",
    "fuse_gaussians",
    "genuine_counts",
    "harmonic_mean_variance",
    "mls_loss",
    "mutual_likelihood_score",
    "pairwise_mls",
    "pfe_pair_scores",
]

#: Added to the fused variance ``s1 + s2`` (the official code's ``1e-10``).
MLS_EPS = 1e-10

_LOG_2PI = math.log(2.0 * math.pi)


class PFEInputError(FacerecError, ValueError):
    """Tensors of the wrong rank or of mismatched shapes given to a PFE function, or a model
    in which no feature layer can be found."""


# ----------------------------------------------------------------------------------------------
# Helpers


def _logaddexp(a, b):
    """``log(exp(a) + exp(b))`` elementwise, stable, with the exact gradient (softmax weights)
    also where ``a == b`` (the max is a constant for the gradient, as in reduce_logsumexp)."""
    m = tf.stop_gradient(tf.maximum(a, b))
    return m + tf.math.log(tf.exp(a - m) + tf.exp(b - m))


def _static_shape(x, what):
    shape = x.shape
    if shape.rank is None:
        raise PFEInputError(f"{what} has unknown rank", expected="a tensor of known rank")
    return shape


def _check_pair(mu, logvar, what):
    mu_shape = _static_shape(mu, f"{what} mu")
    lv_shape = _static_shape(logvar, f"{what} logvar")
    if mu_shape.rank < 1:
        raise PFEInputError(f"{what} mu is a scalar; expected [..., D] embeddings")
    if not mu_shape.is_compatible_with(lv_shape):
        raise PFEInputError(
            f"{what}: mu has shape {mu_shape} but logvar has shape {lv_shape} "
            "(expected the same shape: one log(sigma^2) per embedding dimension)"
        )


def _l2_normalize(x):
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


# ----------------------------------------------------------------------------------------------
# Mutual likelihood score


def mutual_likelihood_score(
    mu1, logvar1, mu2, logvar2, *, normalize=True, include_constant=True, eps=MLS_EPS
):
    """The paper's MLS (Eq. 3) between Gaussians, reduced over the last axis, float32.

    Broadcasts over leading axes: ``[N, D]`` against ``[N, D]`` gives ``[N]`` (paired), and
    ``mu[:, None]`` against ``mu[None]`` gives the ``[N, N]`` matrix (see :func:`pairwise_mls`).

    Args:
        mu1, mu2: embeddings ``[..., D]``; L2-normalised here unless ``normalize=False``.
        logvar1, logvar2: ``log(sigma^2)`` of the same shapes as ``mu1``, ``mu2``.
        normalize: L2-normalise ``mu1`` and ``mu2`` along the last axis first.
        include_constant: subtract ``D/2 log(2 pi)`` (the paper); False drops it.
        eps: added to ``s1 + s2`` (0 gives the bare formula, then ``s1 + s2`` must not
            underflow).

    Raises:
        PFEInputError: a ``logvar`` whose shape differs from its ``mu``.
    """
    mu1, mu2 = tf.cast(mu1, tf.float32), tf.cast(mu2, tf.float32)
    logvar1, logvar2 = tf.cast(logvar1, tf.float32), tf.cast(logvar2, tf.float32)
    _check_pair(mu1, logvar1, "first")
    _check_pair(mu2, logvar2, "second")
    if normalize:
        mu1, mu2 = _l2_normalize(mu1), _l2_normalize(mu2)
    log_fused = _logaddexp(logvar1, logvar2)  # log(s1 + s2)
    if eps > 0:
        log_fused = _logaddexp(log_fused, tf.constant(math.log(eps), tf.float32))
    term = tf.square(mu1 - mu2) * tf.exp(-log_fused) + log_fused
    score = -0.5 * tf.reduce_sum(term, axis=-1)
    if include_constant:
        dim = tf.cast(tf.shape(term)[-1], tf.float32)
        score -= 0.5 * dim * _LOG_2PI
    return score


def pairwise_mls(mu, logvar, *, normalize=True, include_constant=True, eps=MLS_EPS):
    """``[B, B]`` MLS between every two rows of ``mu`` ``[B, D]`` / ``logvar`` ``[B, D]``.

    Materialises a ``[B, B, D]`` float32 tensor (256 x 256 x 512 = 128 MiB), as the official
    ``negative_MLS``: the variance-weighted distance does not factor into a matmul.
    """
    mu, logvar = tf.cast(mu, tf.float32), tf.cast(logvar, tf.float32)
    _check_pair(mu, logvar, "pairwise")
    if mu.shape.rank != 2:
        raise PFEInputError(f"mu has shape {mu.shape}; expected [B, D]")
    if normalize:
        mu = _l2_normalize(mu)
    return mutual_likelihood_score(
        mu[:, None, :],
        logvar[:, None, :],
        mu[None, :, :],
        logvar[None, :, :],
        normalize=False,
        include_constant=include_constant,
        eps=eps,
    )


def mls_loss(labels, mu, logvar, *, include_constant=True, eps=MLS_EPS):
    """Per-example PFE loss ``[B]`` float32: for anchor ``i`` the mean of ``-MLS(i, j)`` over
    its genuine pairs (``labels[j] == labels[i]``, ``j != i``); 0 for an anchor without one.

    ``mu`` (the backbone's embedding, raw or normalised) is L2-normalised and gets
    ``stop_gradient``: only ``logvar`` (the head) is trained. With P x K batches every anchor
    has ``K - 1`` genuine pairs and the batch mean of this loss equals the official loss (the
    mean over all genuine pairs) divided by 2 plus ``D/2 log(2 pi)`` (module docstring). With
    other batches average over the anchors that have a pair: ``sum(loss) / count`` where
    ``count = sum(genuine_counts(labels) > 0)``.

    Args:
        labels: int identities ``[B]``.
        mu: embeddings ``[B, D]``.
        logvar: ``log(sigma^2)`` ``[B, D]`` from :class:`UncertaintyHead`.

    Raises:
        PFEInputError: shapes that disagree (``[B]``, ``[B, D]``, ``[B, D]``).
    """
    labels = tf.convert_to_tensor(labels)
    mu = tf.stop_gradient(tf.cast(mu, tf.float32))
    logvar = tf.cast(logvar, tf.float32)
    if mu.shape.rank != 2:
        raise PFEInputError(f"mu has shape {mu.shape}; expected [B, D]")
    if labels.shape.rank is not None and labels.shape.rank != 1:
        raise PFEInputError(f"labels have shape {labels.shape}; expected [B]")
    if not mu.shape[:1].is_compatible_with(labels.shape[:1]):
        raise PFEInputError(f"labels have shape {labels.shape} but mu has shape {mu.shape}")
    scores = pairwise_mls(mu, logvar, include_constant=include_constant, eps=eps)
    mask = _genuine_mask(labels)
    count = tf.reduce_sum(tf.cast(mask, tf.float32), axis=1)
    total = tf.reduce_sum(tf.where(mask, -scores, 0.0), axis=1)
    return total / tf.maximum(count, 1.0)


def _genuine_mask(labels):
    labels = tf.reshape(labels, [-1])
    same = tf.equal(labels[:, None], labels[None, :])
    n = tf.shape(labels)[0]
    return tf.logical_and(same, tf.logical_not(tf.eye(n, dtype=tf.bool)))


def genuine_counts(labels):
    """Number of genuine pairs of each anchor ``[B]`` int32 (how :func:`mls_loss` divides)."""
    return tf.reduce_sum(tf.cast(_genuine_mask(tf.convert_to_tensor(labels)), tf.int32), axis=1)


# ----------------------------------------------------------------------------------------------
# NumPy side (evaluation)


def pfe_pair_scores(
    mu1, logvar1, mu2, logvar2, *, normalize=True, include_constant=True, eps=MLS_EPS
):
    """MLS of each pair of rows, NumPy float64: ``[N, D]`` x 4 -> ``[N]`` (higher = more
    likely the same person). Same formula and ``eps`` as :func:`mutual_likelihood_score`;
    accepts NumPy arrays or eager tensors.

    Raises:
        PFEInputError: arrays that are not four ``[N, D]`` of one shape.
    """
    arrays = [np.asarray(a, np.float64) for a in (mu1, logvar1, mu2, logvar2)]
    shapes = [a.shape for a in arrays]
    if arrays[0].ndim != 2 or any(s != shapes[0] for s in shapes):
        raise PFEInputError(
            f"mu1, logvar1, mu2, logvar2 have shapes {shapes}; expected four [N, D] arrays "
            "of the same shape"
        )
    m1, v1, m2, v2 = arrays
    if normalize:
        m1, m2 = _np_normalize(m1), _np_normalize(m2)
    log_fused = np.logaddexp(v1, v2)
    if eps > 0:
        log_fused = np.logaddexp(log_fused, math.log(eps))
    score = -0.5 * np.sum(np.square(m1 - m2) * np.exp(-log_fused) + log_fused, axis=1)
    if include_constant:
        score -= 0.5 * m1.shape[1] * _LOG_2PI
    return score


def _np_normalize(x):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def harmonic_mean_variance(logvar):
    """Per-image uncertainty ``[N]``: the harmonic mean of ``sigma^2`` over the dimensions
    (the paper's figures; larger = less reliable face). NumPy float64."""
    logvar = np.asarray(logvar, np.float64)
    if logvar.ndim != 2:
        raise PFEInputError(f"logvar has shape {logvar.shape}; expected [N, D]")
    return 1.0 / np.mean(np.exp(-logvar), axis=1)


def fuse_gaussians(mus, logvars):
    """Fuse several Gaussian embeddings of one face (e.g. an image and its mirror) into one:
    the paper's Eq. 6 (precision-weighted), ``1/s = sum 1/s_k``, ``mu = s * sum mu_k / s_k``,
    with each ``mu_k`` L2-normalised first and the result renormalised. NumPy float64.

    Args:
        mus, logvars: sequences of ``[N, D]`` arrays, same length and shapes.

    Returns:
        ``(mu [N, D], logvar [N, D])``.
    """
    mus = [_np_normalize(np.asarray(m, np.float64)) for m in mus]
    logvars = [np.asarray(v, np.float64) for v in logvars]
    if not mus or len(mus) != len(logvars):
        raise PFEInputError(f"{len(mus)} mu arrays but {len(logvars)} logvar arrays")
    shapes = {m.shape for m in mus} | {v.shape for v in logvars}
    if len(shapes) != 1 or mus[0].ndim != 2:
        raise PFEInputError(f"arrays of shapes {sorted(shapes)}; expected one [N, D] shape")
    precisions = [np.exp(-v) for v in logvars]
    total = np.sum(precisions, axis=0)
    mu = np.sum([p * m for p, m in zip(precisions, mus)], axis=0) / total
    return _np_normalize(mu), -np.log(total)


# ----------------------------------------------------------------------------------------------
# The uncertainty head


@keras.saving.register_keras_serializable(package="facerec_tf")
class UncertaintyHead(keras.layers.Layer):
    """PFE uncertainty module: ``head(features) -> log(sigma^2)`` ``[B, embedding_size]``.

    FC - BN - ReLU - FC - BN(no centre/scale) - scalar scale-and-shift - variance floor (the
    official ``uncertainty_module.py``; module docstring). Inputs of rank > 2 are flattened
    (their inner dimensions must be static). Always computes in float32.

    Args:
        embedding_size: ``D``, the backbone's embedding size.
        hidden_units: width of the first FC (official: ``D``); None means ``D``.
        gamma_init, beta_init: initial scalar scale and shift (official ``1e-4``, ``-7``:
            every ``sigma^2`` starts near ``exp(-7)`` and the spread is learned).
        min_variance: floor added to ``sigma^2`` (official ``1e-6``).
        bn_momentum, bn_epsilon: of both BNs (official decay 0.995, epsilon 1e-3). They are
            :class:`~facerec_tf.models.blocks.BatchNormalization`: the moving variance takes the
            unbiased batch variance, as TensorFlow's fused batch norm (used by the official
            ``slim.batch_norm`` on these 2-D inputs) does.
        kernel_initializer: of both FCs (official: Xavier/Glorot uniform).
        kernel_regularizer: of both FCs. The official ``slim.l2_regularizer(5e-4)`` adds
            ``5e-4 * sum(w^2) / 2``, i.e. ``keras.regularizers.L2(2.5e-4)``; None (default)
            leaves weight decay to the optimiser (the scalar gamma and beta are not decayed).
    """

    def __init__(
        self,
        embedding_size,
        hidden_units=None,
        gamma_init=1e-4,
        beta_init=-7.0,
        min_variance=1e-6,
        bn_momentum=0.995,
        bn_epsilon=1e-3,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(embedding_size) < 1:
            raise PFEInputError(f"embedding_size must be >= 1, got {embedding_size}")
        if not min_variance > 0:
            raise PFEInputError(f"min_variance must be > 0, got {min_variance}")
        self.embedding_size = int(embedding_size)
        self.hidden_units = int(hidden_units) if hidden_units else self.embedding_size
        self.gamma_init = float(gamma_init)
        self.beta_init = float(beta_init)
        self.min_variance = float(min_variance)
        self._log_floor = math.log(self.min_variance)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        dense = dict(
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            dtype="float32",
        )
        bn = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype="float32")
        self.fc1 = keras.layers.Dense(self.hidden_units, name="fc1", **dense)
        self.bn1 = blocks.BatchNormalization(name="bn1", **bn)
        self.fc2 = keras.layers.Dense(self.embedding_size, name="fc_log_sigma_sq", **dense)
        self.bn2 = blocks.BatchNormalization(center=False, scale=False, name="bn2", **bn)

    def _flat_size(self, input_shape) -> int:
        shape = tuple(input_shape)
        if len(shape) < 2 or any(d is None for d in shape[1:]):
            raise PFEInputError(
                f"UncertaintyHead input has shape {shape}; expected [B, F] or [B, ...] with "
                "static inner dimensions"
            )
        return int(np.prod(shape[1:]))

    def build(self, input_shape):
        flat = self._flat_size(input_shape)
        self.fc1.build((None, flat))
        self.bn1.build((None, self.hidden_units))
        self.fc2.build((None, self.hidden_units))
        self.bn2.build((None, self.embedding_size))
        self.gamma = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.gamma_init),
            name="gamma",
            dtype="float32",
        )
        self.beta = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.beta_init),
            name="beta",
            dtype="float32",
        )

    def call(self, features, training=None):
        x = tf.cast(features, tf.float32)
        if x.shape.rank != 2:
            x = tf.reshape(x, [-1, self._flat_size(x.shape)])
        x = self.fc1(x)
        x = tf.nn.relu(self.bn1(x, training=training))
        x = self.bn2(self.fc2(x), training=training)
        x = self.gamma * x + self.beta
        # log(min_variance + exp(x)) without overflow for large x
        return _logaddexp(x, tf.constant(self._log_floor, tf.float32))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding_size=self.embedding_size,
            hidden_units=self.hidden_units,
            gamma_init=self.gamma_init,
            beta_init=self.beta_init,
            min_variance=self.min_variance,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer)
            if self.kernel_regularizer is not None
            else None,
        )
        return config


# ----------------------------------------------------------------------------------------------
# Wiring on a backbone


def _feature_layer(backbone, layer_name=None):
    if layer_name is not None:
        try:
            return backbone.get_layer(layer_name)
        except ValueError:
            raise PFEInputError(
                f"model {backbone.name!r} has no layer named {layer_name!r}"
            ) from None
    dense = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise PFEInputError(
            f"model {backbone.name!r} has no Dense layer: give feature_layer= the name of "
            "the layer whose input is the feature vector"
        )
    return dense[-1]


def feature_extractor(backbone, source="features", feature_layer=None):
    """A ``keras.Model`` ``images -> [features, embedding]`` sharing ``backbone``'s layers.

    ``features`` is the input of the backbone's embedding dense layer (the last ``Dense`` in
    the functional graph, or the layer named ``feature_layer``): IResNet ``head_fc``
    (``head_flatten`` output, 512 x 7 x 7 at 112 x 112), MobileFaceNet ``gdc_fc`` (512),
    i.e. the official PFE ``conv_final`` flattened. With ``source="embedding"`` the features
    *are* the embedding. Works for every backbone of ``facerec_tf.models.registry``
    (IResNet, IR-SE and MobileFaceNet share these heads).

    Raises:
        PFEInputError: unknown ``source``, a model with several outputs, no Dense layer, or
            no layer named ``feature_layer``.
    """
    if source not in ("features", "embedding"):
        raise PFEInputError(f"source must be 'features' or 'embedding', got {source!r}")
    if len(backbone.outputs) != 1:
        raise PFEInputError(
            f"model {backbone.name!r} has {len(backbone.outputs)} outputs; expected one "
            "embedding output"
        )
    embedding = backbone.outputs[0]
    if source == "embedding":
        features = embedding
    else:
        features = _feature_layer(backbone, feature_layer).input
        if isinstance(features, (list, tuple)):
            raise PFEInputError(f"layer {feature_layer!r} has several inputs")
    return keras.Model(
        _single_input(backbone), [features, embedding], name=f"{backbone.name}_pfe_features"
    )


def _single_input(model):
    """The model's input tensor itself when it has one (calling with a bare tensor then
    matches the input structure), else the list."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def build_pfe_model(backbone, head, source="features", feature_layer=None, name=None):
    """``images -> [embedding, log(sigma^2)]``: the frozen backbone's raw embedding (mu
    before normalisation) and the head's output, as one ``keras.Model`` for evaluation and
    export. ``head`` is an :class:`UncertaintyHead`. The backbone's layers are shared, not
    copied: set ``backbone.trainable = False`` before training the head through this model."""
    extractor = feature_extractor(backbone, source, feature_layer)
    features, embedding = extractor.outputs
    logvar = head(features)
    return keras.Model(
        _single_input(backbone), [embedding, logvar], name=name or f"{backbone.name}_pfe"
    )
