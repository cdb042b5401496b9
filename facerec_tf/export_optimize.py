"""Inference-optimised graph of an embedding model, used by the SavedModel export.

:class:`InferenceGraph` walks a functional Keras backbone once and rebuilds it from plain
TensorFlow ops over its own (folded) variables:

* every BatchNorm that directly follows a convolution (plain, grouped or depthwise) or a dense
  layer is folded into that layer's kernel and bias (``Conv2D`` + ``BiasAdd``, which the
  CPU kernels fuse);
* a BatchNorm that *precedes* a plain convolution (the ``bn1`` of every IResNet unit, through
  an optional ``ZeroPadding2D``) is folded into it too: its scale goes into the kernel and its
  shift becomes a constant map ``conv(pad(shift))`` added to the output. The map differs from
  a bias only on the border, where the zero padding is not shifted, so the fold is exact for
  the model's fixed input size;
* a BatchNorm that precedes a dense layer through ``Dropout`` / ``Flatten`` (IResNet's head
  ``bn2``) is folded into the dense kernel and bias;
* PReLU is one ``Maximum(x, alpha * x)`` where every slope is in [0, 1] (a ``Select``
  otherwise), grouped convolutions are one grouped ``Conv2D`` op, dropout disappears.

In float32 the result equals the Keras graph up to rounding (about 1e-6 relative on the
embedding). With ``precision="bfloat16"`` the convolutions, BatchNorm-free activations and
residual adds run in bfloat16 (oneDNN's AVX512-BF16 / AMX kernels), while the input
normalisation, the dense layers (a negligible share of the FLOPs) and the output stay float32.

Layers it does not know are called as they are (their own variables are kept), so any
functional model exports; only the known layers are optimised.
"""

from __future__ import annotations

import numpy as np

from facerec_tf.errors import FacerecError

__all__ = [
    "PRECISIONS",
    "InferenceGraph",
    "OptimizeError",
]

PRECISIONS = ("float32", "bfloat16")


class OptimizeError(FacerecError, ValueError):
    """The model cannot be turned into an inference graph with the requested options."""


# ----------------------------------------------------------------------------------------------
# Graph inspection


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def _bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` in float64 with ``bn(x) == x * scale + shift`` at inference."""
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    gamma = np.ones_like(var) if bn.gamma is None else np.asarray(bn.gamma.numpy(), np.float64)
    beta = np.zeros_like(var) if bn.beta is None else np.asarray(bn.beta.numpy(), np.float64)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _class_name(layer) -> str:
    return type(layer).__name__


def _is_plain_conv(layer) -> bool:
    import keras

    return (
        isinstance(layer, keras.layers.Conv2D)
        and type(layer).__name__ == "Conv2D"
        and layer.data_format == "channels_last"
        and layer.activation is keras.activations.linear
    )


def _is_depthwise(layer) -> bool:
    import keras

    return (
        type(layer) is keras.layers.DepthwiseConv2D
        and layer.data_format == "channels_last"
        and layer.activation is keras.activations.linear
    )


def _is_grouped(layer) -> bool:
    return _class_name(layer) == "GroupedConv2D" and hasattr(layer, "groups")


def _is_dense(layer) -> bool:
    import keras

    return (
        type(layer) is keras.layers.Dense
        and layer.activation is keras.activations.linear
        and len(layer.kernel.shape) == 2
    )


def _is_bn(layer) -> bool:
    import keras

    if not isinstance(layer, keras.layers.BatchNormalization) or _class_name(layer) not in (
        "BatchNormalization",
    ):
        return False
    rank = len(layer.input.shape)
    return layer.axis in (-1, rank - 1)


def _is_passthrough(layer) -> bool:
    """Layers that are the identity at inference."""
    import keras

    return type(layer) in (keras.layers.Dropout, keras.layers.Identity)


# ----------------------------------------------------------------------------------------------


class InferenceGraph:
    """``graph(images) -> float32 raw embedding`` of ``model`` at inference, optimised.

    Args:
        model: a functional Keras model with one input and one output, each layer called once.
        precision: ``"float32"`` or ``"bfloat16"`` (see the module docstring).

    Attributes:
        variables: the tf.Variables the graph reads (folded weights, plus the weights of
            layers called as they are); track them in the exported module.
        folded: names of the BatchNorm layers folded away.
    """

    def __init__(self, model, *, precision: str = "float32"):
        import tensorflow as tf

        if precision not in PRECISIONS:
            raise OptimizeError(
                f"precision {precision!r} is not supported; expected one of {', '.join(PRECISIONS)}"
            )
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError):
            inputs = outputs = None
        if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
            raise OptimizeError(
                f"model {model.name!r}: the optimised export needs a functional model with one "
                "input and one output"
            )
        self.model = model
        self.precision = precision
        self.compute_dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
        self.folded: list[str] = []
        self._weights: dict[str, tf.Variable] = {}
        self._kept_layers = []
        self._nodes = [n for nodes in model._nodes_by_depth.values() for n in nodes]
        self._consumers: dict[int, list] = {}
        for node in self._nodes:
            if node.operation is None or node.is_input:
                continue
            for t in node.input_tensors:
                self._consumers.setdefault(id(t), []).append(node.operation)
        for t in model.outputs:
            self._consumers.setdefault(id(t), []).append(None)
        for node in self._nodes:
            op = node.operation
            if op is not None and not node.is_input and len(op._inbound_nodes) != 1:
                raise OptimizeError(
                    f"model {model.name!r}: layer {op.name!r} is called more than once; the "
                    "optimised export needs each layer called once"
                )
        self._plan()
        self._lowered = {}
        for node in self._nodes:  # creates the folded variables, eagerly
            op = node.operation
            if op is not None and not node.is_input:
                self._lowered[id(op)] = self._lower(op)

    # ------------------------------------------------------------------------------ planning

    def _only_consumer(self, layer):
        """The single layer consuming ``layer``'s output, or None."""
        users = self._consumers.get(id(layer.output), [])
        return users[0] if len(users) == 1 else None

    def _plan(self) -> None:
        post: dict[int, object] = {}  # id(linear layer) -> BN folded after it
        pre: dict[int, tuple] = {}  # id(linear layer) -> (BN, [layers between])
        identity: set[int] = set()
        layers = [n.operation for n in self._nodes if n.operation is not None and not n.is_input]
        for bn in layers:
            if not _is_bn(bn):
                continue
            src = _producer(bn.input)
            if (
                src is not None
                and (
                    _is_plain_conv(src) or _is_depthwise(src) or _is_grouped(src) or _is_dense(src)
                )
                and self._only_consumer(src) is bn
                and id(src) not in post
            ):
                post[id(src)] = bn
                identity.add(id(bn))
                continue
            # Forward: BN -> [ZeroPadding2D] -> Conv2D, or BN -> [Dropout]* -> Flatten -> Dense.
            chain, nxt = [], self._only_consumer(bn)
            while nxt is not None and (
                _is_passthrough(nxt) or _class_name(nxt) in ("ZeroPadding2D", "Flatten")
            ):
                chain.append(nxt)
                nxt = self._only_consumer(nxt)
            kinds = [_class_name(c) for c in chain if not _is_passthrough(c)]
            if nxt is None or id(nxt) in pre:
                continue
            if (_is_plain_conv(nxt) and kinds in ([], ["ZeroPadding2D"]) and nxt.groups == 1) or (
                _is_dense(nxt) and kinds == ["Flatten"] and len(bn.output.shape) == 4
            ):
                if _class_name(nxt) == "Conv2D" and [c for c in chain if _is_passthrough(c)]:
                    continue
                pre[id(nxt)] = (bn, chain)
                identity.add(id(bn))
        self._post, self._pre, self._identity = post, pre, identity
        for bn in layers:
            if id(bn) in identity:
                self.folded.append(bn.name)

    # ------------------------------------------------------------------------------ weights

    def _variable(self, name: str, value: np.ndarray, dtype):
        import tensorflow as tf

        v = tf.Variable(tf.cast(tf.constant(value, tf.float32), dtype), trainable=False, name=name)
        self._weights[name] = v
        return v

    @property
    def variables(self) -> list:
        out = list(self._weights.values())
        for layer in self._kept_layers:
            out.extend(layer.variables)
        return out

    def _fold_linear(self, layer, kernel: np.ndarray, bias: np.ndarray, channel_axis_shape):
        """Apply the pre- and post- BatchNorm folds of ``layer`` to float64 ``kernel``/``bias``.

        ``kernel``'s last axis is the output channels except for depthwise kernels, whose output
        channels are the last two axes (``channel_axis_shape`` = ``(C, M)``). Returns
        ``(kernel, bias, bias_map)``; ``bias_map`` is None or an ``[1, H, W, C]`` array.
        """
        import tensorflow as tf

        bias_map = None
        if id(layer) in self._pre:
            bn, chain = self._pre[id(layer)]
            scale, shift = _bn_affine(bn)
            if _is_dense(layer):
                h, w, c = (int(d) for d in bn.output.shape[1:])
                s_flat = np.tile(scale, h * w)
                t_flat = np.tile(shift, h * w)
                bias = bias + t_flat @ kernel
                kernel = kernel * s_flat[:, None]
            else:  # plain conv, kernel [kh, kw, cin, cout]
                h, w, c = (int(d) for d in bn.output.shape[1:])
                shifted = np.broadcast_to(shift, (1, h, w, c)).astype(np.float64)
                for pad in chain:
                    if _class_name(pad) == "ZeroPadding2D":
                        (top, bottom), (left, right) = pad.padding
                        shifted = np.pad(shifted, ((0, 0), (top, bottom), (left, right), (0, 0)))
                conv_map = tf.nn.conv2d(
                    tf.constant(shifted, tf.float64),
                    tf.constant(kernel, tf.float64),
                    strides=list(layer.strides),
                    padding=layer.padding.upper(),
                    dilations=list(layer.dilation_rate),
                ).numpy()
                kernel = kernel * scale[None, None, :, None]
                flat = conv_map.reshape(-1, conv_map.shape[-1])
                if np.all(flat == flat[0]):
                    bias = bias + flat[0]
                else:
                    bias_map = conv_map + bias
                    bias = np.zeros_like(bias)
        if id(layer) in self._post:
            scale, shift = _bn_affine(self._post[id(layer)])
            if channel_axis_shape is not None:
                scale = scale.reshape(channel_axis_shape)
                shift = shift.reshape(channel_axis_shape)
            kernel = kernel * scale
            bias = bias * scale + shift
            if bias_map is not None:
                bias_map = bias_map * scale + shift
                bias = np.zeros_like(bias)
        return kernel, bias, bias_map

    # ------------------------------------------------------------------------------ lowering

    def _cast(self, x, dtype):
        import tensorflow as tf

        return x if x.dtype == dtype else tf.cast(x, dtype)

    def _lower(self, layer):
        """A callable computing ``layer`` at inference with plain TF ops."""
        import keras
        import tensorflow as tf

        cd = self.compute_dtype
        name = layer.name
        if id(layer) in self._identity or _is_passthrough(layer):
            return lambda x, **_: x
        if type(layer) is keras.layers.Rescaling and np.ndim(layer.scale) == 0:
            scale, offset = float(layer.scale), float(layer.offset)

            def rescale(x, **_):
                return self._cast(self._cast(x, tf.float32) * scale + offset, cd)

            return rescale
        if _is_plain_conv(layer) or _is_grouped(layer):
            kernel = np.asarray(layer.kernel.numpy(), np.float64)
            if _is_grouped(layer):  # depthwise-form kernel [kh, kw, C, F/G] -> grouped Conv2D
                kh, kw, c, cout = kernel.shape
                g = layer.groups
                kernel = kernel.reshape(kh, kw, g, c // g, cout).transpose(0, 1, 3, 2, 4)
                kernel = kernel.reshape(kh, kw, c // g, g * cout)
                strides, dilations = [layer.strides] * 2, [1, 1]
                use_bias, bias = False, np.zeros(kernel.shape[-1])
            else:
                strides, dilations = list(layer.strides), list(layer.dilation_rate)
                use_bias = layer.use_bias
                bias = (
                    np.asarray(layer.bias.numpy(), np.float64)
                    if use_bias
                    else np.zeros(kernel.shape[-1])
                )
            kernel, bias, bias_map = self._fold_linear(layer, kernel, bias, None)
            k = self._variable(f"{name}/kernel", kernel, cd)
            folded = id(layer) in self._post or id(layer) in self._pre
            b = self._variable(f"{name}/bias", bias, cd) if (use_bias or folded) else None
            m = self._variable(f"{name}/bias_map", bias_map, cd) if bias_map is not None else None
            padding = layer.padding.upper()

            def convolve(x, **_):
                y = tf.nn.conv2d(
                    self._cast(x, cd), k, strides=strides, padding=padding, dilations=dilations
                )
                if m is not None:
                    return y + m
                return tf.nn.bias_add(y, b) if b is not None else y

            return convolve
        if _is_depthwise(layer):
            kernel = np.asarray(layer.kernel.numpy(), np.float64)
            c, mult = kernel.shape[2], kernel.shape[3]
            bias = (
                np.asarray(layer.bias.numpy(), np.float64).reshape(c, mult)
                if layer.use_bias
                else np.zeros((c, mult))
            )
            kernel, bias, _ = self._fold_linear(layer, kernel, bias, (c, mult))
            k = self._variable(f"{name}/kernel", kernel, cd)
            folded = id(layer) in self._post
            b = (
                self._variable(f"{name}/bias", bias.reshape(-1), cd)
                if (layer.use_bias or folded)
                else None
            )
            strides = [1, *layer.strides, 1]
            padding = layer.padding.upper()
            dilations = list(layer.dilation_rate)

            def depthwise(x, **_):
                y = tf.nn.depthwise_conv2d(
                    self._cast(x, cd), k, strides=strides, padding=padding, dilations=dilations
                )
                return tf.nn.bias_add(y, b) if b is not None else y

            return depthwise
        if _is_dense(layer):
            kernel = np.asarray(layer.kernel.numpy(), np.float64)
            bias = (
                np.asarray(layer.bias.numpy(), np.float64)
                if layer.use_bias
                else np.zeros(kernel.shape[-1])
            )
            kernel, bias, _ = self._fold_linear(layer, kernel, bias, None)
            # The dense layers stay float32: a negligible share of the FLOPs, and the embedding
            # keeps a float32 accumulation.
            k = self._variable(f"{name}/kernel", kernel, tf.float32)
            b = self._variable(f"{name}/bias", bias, tf.float32)

            def dense(x, **_):
                return tf.nn.bias_add(tf.matmul(self._cast(x, tf.float32), k), b)

            return dense
        if _is_bn(layer):  # not folded: an inference BatchNorm as one multiply-add
            scale, shift = _bn_affine(layer)
            s = self._variable(f"{name}/scale", scale, cd)
            t = self._variable(f"{name}/shift", shift, cd)
            return lambda x, **_: self._cast(x, cd) * s + t
        if type(layer) is keras.layers.PReLU and layer.shared_axes is not None:
            alpha = np.asarray(layer.alpha.numpy(), np.float64)
            a = self._variable(f"{name}/alpha", alpha, cd)
            if np.all((alpha >= 0) & (alpha <= 1)):
                # max(x, a*x) == PReLU(x) exactly when 0 <= a <= 1

                def prelu_max(x, **_):
                    x = self._cast(x, cd)
                    return tf.maximum(x, x * a)

                return prelu_max

            def prelu(x, **_):
                x = self._cast(x, cd)
                return tf.where(x >= 0, x, x * a)

            return prelu
        if type(layer) is keras.layers.ZeroPadding2D and layer.data_format == "channels_last":
            (top, bottom), (left, right) = layer.padding
            paddings = [[0, 0], [top, bottom], [left, right], [0, 0]]
            return lambda x, **_: tf.pad(x, paddings)
        if type(layer) is keras.layers.Flatten:
            return lambda x, **_: tf.reshape(x, [-1, int(np.prod(layer.output.shape[1:]))])
        if type(layer) is keras.layers.Add:
            return lambda xs, **_: tf.add_n([self._cast(x, cd) for x in xs])
        if type(layer) is keras.layers.Multiply:

            def multiply(xs, **_):
                y = self._cast(xs[0], cd)
                for x in xs[1:]:
                    y = y * self._cast(x, cd)
                return y

            return multiply
        if type(layer) is keras.layers.ReLU and (
            layer.max_value is None and not layer.negative_slope and not layer.threshold
        ):
            return lambda x, **_: tf.nn.relu(self._cast(x, cd))
        if type(layer) is keras.layers.GlobalAveragePooling2D and (
            layer.data_format == "channels_last"
        ):
            return lambda x, **_: tf.reduce_mean(x, axis=[1, 2], keepdims=layer.keepdims)
        # Anything else: the layer itself, in its own compute dtype.
        self._kept_layers.append(layer)

        def call_layer(*args, **kwargs):
            kwargs.pop("training", None)
            try:
                out = layer(*args, training=False, **kwargs)
            except TypeError:
                out = layer(*args, **kwargs)
            return tf.nest.map_structure(lambda t: self._cast(t, cd), out)

        return call_layer

    # ------------------------------------------------------------------------------ running

    def __call__(self, images):
        """The float32 raw embedding of ``images`` (the model's input, float32)."""
        import tensorflow as tf

        out = self.model._run_through_graph(
            [tf.convert_to_tensor(images, tf.float32)],
            operation_fn=lambda op: self._lowered[id(op)],
        )
        if isinstance(out, (list, tuple)):
            (out,) = out
        return tf.cast(out, tf.float32)
