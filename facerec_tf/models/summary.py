"""Parameter counts and FLOPs of a Keras backbone, counted the way papers and insightface do."""

from __future__ import annotations

import math

import keras


def _is_bn_statistic(variable) -> bool:
    path = getattr(variable, "path", variable.name)
    return path.endswith("moving_mean") or path.endswith("moving_variance")


def count_parameters(model) -> dict[str, int]:
    """``{"total": .., "trainable": ..}`` excluding BatchNorm running statistics.

    ``total`` matches ``sum(p.numel() for p in torch_model.parameters())``; ``trainable``
    matches the count with ``requires_grad`` (the iresnets freeze the last BN's scale).
    """
    total = sum(math.prod(v.shape) for v in model.weights if not _is_bn_statistic(v))
    trainable = sum(math.prod(v.shape) for v in model.trainable_weights)
    return {"total": int(total), "trainable": int(trainable)}


def flops(model, batch_size: int = 1) -> int:
    """Forward FLOPs (2 x multiply-adds) of convolutions and dense layers for one batch.

    Only multiply-accumulates are counted (BN, PReLU, additions and SE gating are excluded),
    the usual convention of the face-recognition literature; iresnet50 at 112x112 gives
    12.62 GFLOPs.
    """
    from facerec_tf.models.blocks import GroupedConv2D

    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, GroupedConv2D):
            out = layer.output.shape
            cin = layer.input.shape[-1] // layer.groups
            k = layer.kernel_size
            total += 2 * k * k * cin * out[1] * out[2] * out[3]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            out = layer.output.shape
            total += 2 * kh * kw * out[1] * out[2] * out[3]
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            out = layer.output.shape
            cin = layer.input.shape[-1] // layer.groups
            total += 2 * kh * kw * cin * out[1] * out[2] * out[3]
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total * batch_size)
