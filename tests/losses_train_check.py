"""Short train.py-equivalent runs (the Trainer, in one process) of every loss family's preset
on the synthetic source, run by tests/test_losses_training.py.

    python tests/losses_train_check.py OUT [CASE ...]

Prints one JSON object: per case the loss of every step and of every loss term.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

tf.config.experimental.enable_op_determinism()

from facerec_tf.config import resolve  # noqa: E402
from facerec_tf.training.task import FaceRecognitionTask  # noqa: E402
from facerec_tf.training.trainer import Trainer  # noqa: E402

SMALL = [
    "data.source=synthetic",
    "data.num_classes=16",
    "data.num_images=16000",
    "data.synthetic_verification_pairs=0",
    "data.batch_size=16",
    "model.backbone=iresnet10",
    "model.embedding_size=32",
    "data.image_size=32,32",
    "schedule.name=constant",
    "schedule.warmup_epochs=0",
    "schedule.base_lr=0.02",
    "runtime.log_every=1",
    "runtime.verify_every=0",
    "runtime.export=false",
    "runtime.deterministic=true",
]
STEPS = 8

# name -> (preset, overrides); "{teacher}" is the backbone saved by the first case.
CASES = {
    "center_loss": ("casia_center_loss", ["model.backbone=iresnet10", "loss.center_weight=0.1"]),
    "magface": ("ms1mv2_r100_magface", ["head.scale=32", "head.l_a=2", "head.u_a=40"]),
    "curricularface": ("ms1mv2_r100_curricularface", ["head.scale=32"]),
    "adaface": ("ms1mv2_r100_adaface", ["head.scale=32"]),
    "sphereface_annealed": ("casia_sphereface_annealed", ["head.scale=32"]),
    "facenet_mobilenet": (
        "casia_facenet_mobilenet",
        ["model.backbone=facenet_mobilenet", "data.image_size=64,64", "data.batch_size=12"],
    ),
    "facenet_inception_resnetv1": (
        "casia_facenet_inception_resnetv1",
        [
            "model.backbone=facenet_inception_resnetv1",
            "data.image_size=96,96",
            "data.batch_size=12",
        ],
    ),
    "angular_triplet": (
        "casia_facenet_mobilenet",
        [
            "model.backbone=iresnet10",
            "head.name=none",
            "loss.triplet_distance=angular",
            "loss.triplet_mining=semi_hard",
            "loss.triplet_margin=0.35",
            "data.batch_size=12",
        ],
    ),
    "vargfacenet_distill": (
        "ms1mv2_vargfacenet_distill",
        [
            "model.backbone=iresnet10",
            "head.scale=32",
            "loss.teacher={teacher}",
            "loss.distill_weight=20",
            "loss.softmax_weight=0.1",
        ],
    ),
    "pfe": (
        "ms1mv2_r50_pfe",
        [
            "model.pretrained={teacher}",
            "data.batch_size=16",
            "data.synthetic_verification_pairs=60",
        ],
    ),
}


def run(name: str, out: str, teacher: str) -> dict:
    preset, extra = CASES[name]
    extra = [e.replace("{teacher}", teacher) for e in extra]
    config = resolve(preset, [*SMALL, *extra])
    trainer = Trainer(
        FaceRecognitionTask(config),
        tf.distribute.get_strategy(),
        os.path.join(out, name),
        max_steps=STEPS,
        stream=sys.stderr,
    )
    trainer.train()
    result = {
        "loss": [h["loss"] for h in trainer.history],
        "terms": {
            k[5:]: [h[k] for h in trainer.history]
            for k in trainer.history[0]
            if k.startswith("term_")
        },
    }
    if name == "pfe":
        result["backbone_unchanged"] = all(
            (a == b).all() for a, b in zip(trainer.backbone.get_weights(), TEACHER_WEIGHTS)
        )
        result["verification"] = trainer.history and {
            k: v.accuracy for k, v in trainer.verify().items()
        }
        trainer._pfe_model().save(os.path.join(out, "pfe.keras"))
    return result, trainer


TEACHER_WEIGHTS = []


def main() -> int:
    out = sys.argv[1]
    names = sys.argv[2:] or list(CASES)
    teacher = os.path.join(out, "teacher.keras")
    results = {}
    for name in names:
        if name in ("pfe", "vargfacenet_distill") and not os.path.exists(teacher):
            raise SystemExit("run center_loss first (it saves the teacher)")
        start = time.perf_counter()
        result, trainer = run(name, out, teacher)
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
        if name == "center_loss":
            trainer.backbone.save(teacher)
            TEACHER_WEIGHTS.extend(trainer.backbone.get_weights())
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
