"""Building blocks shared by the backbones (module-level functions, keras-hub style).

Conventions that make the Keras graphs numerically identical to insightface's PyTorch ones
(and so let `facerec_tf.export` import their weights):

* BatchNorm ``epsilon=1e-5`` and ``momentum=0.9`` (torch's ``eps=1e-5, momentum=0.1``), and
  every BatchNorm is this module's :class:`BatchNormalization`, whose moving variance is
  updated with the unbiased batch variance as torch's is (Keras' layer stores the biased one).
* PReLU has **one alpha per channel** (``shared_axes=[1, 2]``), initialised to 0.25 like
  ``torch.nn.PReLU``. Keras' default is one alpha per *element*, which multiplies the
  parameter count by H*W.
* 3x3 convolutions pad 1 pixel on every side like torch. Keras ``padding="same"`` pads
  (0, 1) for a stride-2 convolution on an even input, which shifts the sampling grid, so
  strided convolutions use an explicit ``ZeroPadding2D(1)`` followed by a ``valid`` conv.
* Convolution kernels are He-normal (fan-out). arcface_torch draws N(0, 0.1), which is
  harmless in training mode (every conv is followed by BN) but makes an *untrained* iresnet100
  overflow to NaN at inference, where BN uses its initial statistics.
"""

from __future__ import annotations

import keras
import tensorflow as tf

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def conv_initializer():
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal"
    )


@keras.saving.register_keras_serializable(package="facerec_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` with torch's moving statistics.

    In training the batch is normalised with the biased batch variance (as in Keras and
    torch), but the moving variance is updated with the *unbiased* one, as torch does::

        moving_mean     = momentum * moving_mean     + (1 - momentum) * mean
        moving_variance = momentum * moving_variance + (1 - momentum) * var * n / (n - 1)

    ``n`` is the number of values reduced per channel: ``N * H * W`` for 4-D inputs, ``N``
    for 2-D ones, the global count over the replicas with ``synchronized=True`` (in a
    replica context), the number of unmasked values with a mask. Statistics are float32 under
    mixed precision. ``renorm`` is not supported.

    On an NHWC image batch (no mask, not synchronized) the training pass is TensorFlow's fused
    kernel, one ``FusedBatchNormV3`` op and its gradient op, which returns the unbiased
    variance itself: Keras' own code is about ten elementwise ops each way, in float32 even
    under ``mixed_bfloat16`` (a third of a bf16 IResNet train step on CPU). Same outputs and
    gradients to float32 rounding.

    The class keeps Keras' name on purpose: a ``.keras`` file stores a layer's weights under
    the snake-cased class name (``layers/batch_normalization_7``), so files written with
    Keras' layer load into this one (and back); the weights, their names and order are
    Keras' own.
    """

    def __init__(self, **kwargs):
        if kwargs.get("renorm"):
            raise ValueError("facerec_tf BatchNormalization does not implement renorm")
        super().__init__(**kwargs)

    def _count(self, x, mask):
        """Values reduced per channel (float32; per channel with a mask)."""
        if mask is not None:
            weights = tf.broadcast_to(tf.cast(mask, x.dtype)[..., tf.newaxis], tf.shape(x))
            return tf.reduce_sum(weights, axis=self._reduction_axes)
        shape = tf.shape(x)
        count = tf.cast(tf.reduce_prod(tf.gather(shape, self._reduction_axes)), x.dtype)
        if self.synchronized:
            ctx = tf.distribute.get_replica_context()
            if ctx is not None:  # the same rule as Keras' synchronized moments
                count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
        return count

    def _update_moving(self, mean, unbiased):
        momentum = self.momentum
        dtype = self.moving_mean.dtype
        mean, unbiased = tf.cast(mean, dtype), tf.cast(unbiased, dtype)
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + unbiased * (1.0 - momentum))

    def _fused_call(self, inputs):
        channels = inputs.shape[-1]
        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16) else tf.cast(inputs, tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        empty = tf.constant([], tf.float32)
        y, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        self._update_moving(mean, unbiased)  # the op's variance is Bessel-corrected
        return tf.cast(y, self.compute_dtype)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            return super().call(inputs, training=training, mask=mask)  # Keras' error
        if (
            mask is None
            and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16)
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and keras.backend.backend() == "tensorflow"
        ):
            return self._fused_call(inputs)
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(x, mask)
        count = self._count(x, mask)
        unbiased = variance * (count / tf.maximum(count - 1.0, 1.0))
        self._update_moving(mean, unbiased)
        gamma = tf.cast(self.gamma, x.dtype) if self.scale else None
        beta = tf.cast(self.beta, x.dtype) if self.center else None
        outputs = keras.ops.batch_normalization(
            x, mean, variance, axis=self.axis, offset=beta, scale=gamma, epsilon=self.epsilon
        )
        return tf.cast(outputs, self.compute_dtype)


def batch_norm(x, name, dtype=None, scale=True, axis=-1):
    return BatchNormalization(
        axis=axis,
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        scale=scale,
        name=name,
        dtype=dtype,
    )(x)


def prelu(x, name, dtype=None):
    """PReLU with one learnable slope per channel (torch ``nn.PReLU(C)``)."""
    return keras.layers.PReLU(
        alpha_initializer=keras.initializers.Constant(0.25),
        shared_axes=[1, 2],
        name=name,
        dtype=dtype,
    )(x)


def _torch_padding(x, kernel_size, strides, padding, name, dtype):
    """Apply torch-style symmetric padding; returns (x, keras padding mode)."""
    if not padding:
        return x, "valid"
    if strides == 1 and kernel_size == 2 * padding + 1:
        return x, "same"  # symmetric for odd kernels at stride 1: identical to torch
    x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad", dtype=dtype)(x)
    return x, "valid"


def conv(x, filters, kernel_size, name, strides=1, padding=0, groups=1, use_bias=False, dtype=None):
    """Conv2D with torch-style symmetric zero padding of ``padding`` pixels."""
    x, pad_mode = _torch_padding(x, kernel_size, strides, padding, name, dtype)
    if groups > 1:
        if use_bias:
            raise ValueError("grouped convolutions here have no bias")
        return GroupedConv2D(
            filters, kernel_size, groups, strides=strides, padding=pad_mode, name=name, dtype=dtype
        )(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=pad_mode,
        use_bias=use_bias,
        kernel_initializer=conv_initializer(),
        name=name,
        dtype=dtype,
    )(x)


def depthwise_conv(x, kernel_size, name, strides=1, padding=0, dtype=None):
    """Depthwise conv (torch ``groups == in_channels == out_channels``) with torch padding."""
    x, pad_mode = _torch_padding(x, kernel_size, strides, padding, name, dtype)
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding=pad_mode,
        use_bias=False,
        depthwise_initializer=conv_initializer(),
        name=name,
        dtype=dtype,
    )(x)


def squeeze_excite(x, ratio, name, dtype=None):
    """Squeeze-and-excitation: GAP, 1x1 conv C/ratio, ReLU, 1x1 conv C, sigmoid, rescale.

    The 1x1 convolutions have no bias, as in the widely used IR-SE-50 (InsightFace_Pytorch).
    """
    channels = x.shape[-1]
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool", dtype=dtype)(x)
    s = conv(s, channels // ratio, 1, name=f"{name}_reduce", dtype=dtype)
    s = keras.layers.ReLU(name=f"{name}_relu", dtype=dtype)(s)
    s = conv(s, channels, 1, name=f"{name}_expand", dtype=dtype)
    s = keras.layers.Activation("sigmoid", name=f"{name}_sigmoid", dtype=dtype)(s)
    return keras.layers.Multiply(name=f"{name}_scale", dtype=dtype)([x, s])


def preprocessing(x, name="preprocess", dtype=None):
    """Map RGB pixels in [0, 255] to ``(x - 127.5) / 128`` (the MXNet insightface convention).

    Living inside the model, it is identical by construction in training, evaluation and every
    export (SavedModel, ONNX, .keras).
    """
    return keras.layers.Rescaling(1.0 / 128.0, offset=-127.5 / 128.0, name=name, dtype=dtype)(x)


@keras.saving.register_keras_serializable(package="facerec_tf")
class GroupedConv2D(keras.layers.Layer):
    """A grouped convolution (torch ``Conv2d(groups=G)``, no bias) computed as a depthwise
    convolution with ``depth_multiplier = filters / G`` followed by a sum over the input
    channels of each group.

    TensorFlow's CPU kernel for ``Conv2D(groups=G)`` falls back to a path that is thousands of
    times slower than a dense convolution in the backward pass (41 s for one 16x28x28x128
    fwd+bwd with 64 groups, against 0.02 s for the depthwise form), which made MobileFaceNet
    untrainable on CPU. The parameter count is identical: ``kernel`` has shape
    ``[kh, kw, in_channels, filters / G]`` and ``kernel[:, :, g*cin + k, j]`` is torch's
    ``weight[g*cout + j, k]`` (``cin``/``cout`` channels per group).
    """

    def __init__(self, filters, kernel_size, groups, strides=1, padding="valid", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.groups = int(groups)
        self.strides = int(strides)
        self.padding = padding
        if self.filters % self.groups:
            raise ValueError(f"filters ({filters}) must be divisible by groups ({groups})")

    def build(self, input_shape):
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(
                f"input channels ({channels}) must be divisible by groups ({self.groups})"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.kernel_size, self.kernel_size, channels, self.filters // self.groups),
            initializer=conv_initializer(),
        )

    def call(self, x):
        import tensorflow as tf

        channels = x.shape[-1]
        kernel = tf.cast(self.kernel, x.dtype)
        y = tf.nn.depthwise_conv2d(
            x, kernel, strides=[1, self.strides, self.strides, 1], padding=self.padding.upper()
        )
        cin, cout = channels // self.groups, self.filters // self.groups
        shape = tf.shape(y)
        y = tf.reshape(y, [shape[0], shape[1], shape[2], self.groups, cin, cout])
        y = tf.reduce_sum(y, axis=4)
        return tf.reshape(y, [shape[0], shape[1], shape[2], self.filters])

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        if self.padding == "valid":
            h = None if h is None else (h - self.kernel_size) // self.strides + 1
            w = None if w is None else (w - self.kernel_size) // self.strides + 1
        else:
            h = None if h is None else -(-h // self.strides)
            w = None if w is None else -(-w // self.strides)
        return (input_shape[0], h, w, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            groups=self.groups,
            strides=self.strides,
            padding=self.padding,
        )
        return config
