"""Partial FC inside the Trainer, run by tests/test_partial_fc.py in fresh processes.

    python tests/partial_fc_train_check.py parity OUT   # 2 replicas + Partial FC vs 1 device
    python tests/partial_fc_train_check.py jit OUT      # jit_compile=True vs False, r = 0.5

Each prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()

from facerec_tf.config import resolve  # noqa: E402
from facerec_tf.training.task import FaceRecognitionTask  # noqa: E402
from facerec_tf.training.trainer import Trainer  # noqa: E402

SMALL = [
    "data.source=synthetic",
    "model.backbone=iresnet10",
    "model.embedding_size=32",
    "model.sync_batch_norm=true",
    "data.image_size=32,32",
    "data.num_classes=40",
    "data.num_images=3200",
    "data.synthetic_verification_pairs=0",
    "head.scale=32",
    "schedule.name=constant",
    "schedule.base_lr=0.001",
    "runtime.log_every=1",
    "runtime.verify_every=0",
    "runtime.export=false",
    "runtime.deterministic=true",
]
STEPS = 3


def trainer(out, strategy, *extra):
    config = resolve("quickstart", [*SMALL, *extra])
    return Trainer(FaceRecognitionTask(config), strategy, out, max_steps=STEPS, stream=sys.stderr)


def losses(t):
    return [h["loss"] for h in t.history]


def parity(out: str) -> dict:
    """Full-softmax ArcFace on one device (batch 16) vs Partial FC at r = 1 on two replicas
    (batch 8 each), same initial weights and centres."""
    ref = trainer(os.path.join(out, "ref"), tf.distribute.get_strategy(), "data.batch_size=16")
    mirrored = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices()])
    pfc = trainer(os.path.join(out, "pfc"), mirrored, "data.batch_size=8", "head.partial_fc=true")
    pfc.backbone.set_weights(ref.backbone.get_weights())
    pfc.partial_fc.load_full(ref.head.centers.kernel.numpy())
    ref.train()
    pfc.train()
    backbone_diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(ref.backbone.get_weights(), pfc.backbone.get_weights())
    )
    centers = ref.head.centers.kernel.numpy()
    # resume the Partial FC run (saved on 2 replicas) on 1 device: the centres re-shard
    resumed = trainer(
        os.path.join(out, "pfc"),
        tf.distribute.get_strategy(),
        "data.batch_size=8",
        "head.partial_fc=true",
    )
    resumed.restore()
    return {
        "ref_losses": losses(ref),
        "pfc_losses": losses(pfc),
        "backbone_diff": backbone_diff,
        "centers_diff": float(np.abs(pfc.partial_fc.full_centers() - centers).max()),
        "resumed_step": resumed.step,
        "resumed_centers_equal": bool(
            np.array_equal(resumed.partial_fc.full_centers(), pfc.partial_fc.full_centers())
        ),
        "resumed_momentum_equal": bool(
            np.array_equal(resumed.partial_fc.full_momentum(), pfc.partial_fc.full_momentum())
        ),
    }


def jit(out: str) -> dict:
    """The whole step (backbone, Partial FC with sampling, optimisers) under XLA."""
    runs, start = {}, None
    for flag in ("false", "true"):
        t = trainer(
            os.path.join(out, flag),
            tf.distribute.get_strategy(),
            "data.batch_size=8",
            "head.partial_fc=true",
            "head.sample_rate=0.5",
            f"runtime.jit_compile={flag}",
        )
        if start is None:
            start = (t.backbone.get_weights(), t.partial_fc.full_centers())
        t.backbone.set_weights(start[0])
        t.partial_fc.load_full(start[1])
        t.train()
        runs[flag] = (losses(t), t.partial_fc.full_centers())
    return {
        "losses": runs["false"][0],
        "jit_losses": runs["true"][0],
        "centers_diff": float(np.abs(runs["true"][1] - runs["false"][1]).max()),
    }


def main() -> int:
    mode, out = sys.argv[1], sys.argv[2]
    result = parity(out) if mode == "parity" else jit(out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
