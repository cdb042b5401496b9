"""Optimisers, weight decay and gradient handling, insightface-equivalent by default.

**Weight decay.** torch's ``SGD(weight_decay=wd)`` (what arcface_torch uses) is *coupled* L2:
``wd * w`` is added to the gradient and then goes through the momentum buffer, so in steady
state it acts ``1 / (1 - momentum)`` = 10x stronger than the same number given to Keras'
``SGD(weight_decay=wd)``, which is *decoupled* (``w -= lr * wd * w`` outside the momentum).
``weight_decay_mode="coupled"`` (default) reproduces torch/insightface exactly: the trainer adds
``wd * mult * w`` to the all-reduced, clipped gradient, with ``mult`` =
``centers_weight_decay_mult`` for the class centres (the MXNet trainer's ``fc7-wd-mult``) and 1
elsewhere. ``"decoupled"`` hands ``weight_decay`` to Keras (AdamW always decays decoupled).

**All-reduce once.** The trainer all-reduces the gradients itself (so it can clip the *global*
gradient like ``clip_grad_norm_`` does after DDP's all-reduce), so the optimiser must not sum
them across replicas a second time: :func:`build_optimizer` returns a subclass whose
``_all_reduce_sum_gradients`` is the identity.
"""

from __future__ import annotations

import keras


def _pre_reduced(cls):
    class PreReduced(cls):
        """Gradients arrive already summed over replicas; do not all-reduce them again."""

        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

    PreReduced.__name__ = f"PreReduced{cls.__name__}"
    PreReduced.__qualname__ = PreReduced.__name__
    return PreReduced


PreReducedSGD = _pre_reduced(keras.optimizers.SGD)
PreReducedAdamW = _pre_reduced(keras.optimizers.AdamW)


def build_optimizer(optimizer_config, learning_rate, precision="fp32", centers=()):
    """Keras optimiser for the config; wrapped in a dynamic ``LossScaleOptimizer`` under
    ``mixed_float16``. ``centers``: the class-centre variables (for the decay multiplier)."""
    c = optimizer_config
    decoupled = (
        c.weight_decay if c.weight_decay_mode == "decoupled" and c.weight_decay > 0 else None
    )
    if c.name == "sgd":
        opt = PreReducedSGD(learning_rate, momentum=c.momentum, weight_decay=decoupled)
    elif c.name == "adamw":
        opt = PreReducedAdamW(
            learning_rate,
            weight_decay=decoupled or 0.0,
            beta_1=c.beta_1,
            beta_2=c.beta_2,
            epsilon=c.epsilon,
        )
    else:
        raise ValueError(f"unknown optimizer {c.name!r}")
    if decoupled and c.centers_weight_decay_mult == 0.0:
        opt.exclude_from_weight_decay(var_list=list(centers))
    if precision == "mixed_float16":
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    return opt


def coupled_decay_multipliers(optimizer_config, backbone_vars, head_vars, centers=()):
    """Per-variable coupled L2 coefficient (0 when decay is decoupled or off)."""
    c = optimizer_config
    if c.weight_decay_mode != "coupled" or c.weight_decay == 0:
        return [0.0] * (len(backbone_vars) + len(head_vars))
    center_ids = {id(v) for v in centers}
    return [
        c.weight_decay * (c.centers_weight_decay_mult if id(v) in center_ids else 1.0)
        for v in list(backbone_vars) + list(head_vars)
    ]


def process_gradients(grads, variables, decay, num_backbone, clip_norm=0.0, loss_scale=1.0):
    """Clip the backbone part of the (all-reduced) gradient by global norm, then add coupled
    L2: what ``clip_grad_norm_(backbone, clip)`` followed by torch ``SGD(weight_decay=wd)``
    does to the gradient. ``loss_scale``: gradients are still multiplied by the loss scale.

    Returns ``(grads, backbone_grad_norm)`` (the norm before clipping, unscaled).
    """
    import tensorflow as tf

    backbone, head = list(grads[:num_backbone]), list(grads[num_backbone:])
    norm = tf.linalg.global_norm(backbone) / loss_scale
    if clip_norm > 0:
        backbone, _ = tf.clip_by_global_norm(backbone, clip_norm * loss_scale)
    out = [
        g + (loss_scale * wd) * tf.cast(v, g.dtype) if wd else g
        for g, v, wd in zip(backbone + head, variables, decay)
    ]
    return out, norm
