"""Fine-tuning: ``model.pretrained`` gives the architecture and weights, the ``finetune``
preset's head-only phase leaves the backbone untouched, ``optimizer.backbone_lr_mult`` scales
the backbone's SGD step exactly, ``model.include_preprocessing=false`` trains on normalised
input. Small models at 32x32 keep each run to seconds."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.config import resolve
from facerec_tf.errors import ConfigError
from facerec_tf.models import create_backbone
from facerec_tf.training.task import FaceRecognitionTask
from facerec_tf.training.trainer import Trainer

SMALL = [
    "data.source=synthetic",
    "data.image_size=32,32",
    "data.num_classes=20",
    "data.num_images=160",
    "data.batch_size=8",
    "data.synthetic_verification_pairs=0",
    "head.scale=32",
    "schedule.name=constant",
    "schedule.base_lr=0.05",
    "runtime.log_every=1",
    "runtime.verify_every=0",
    "runtime.export=false",
]


def _saved(tmp_path, name="iresnet10", **kwargs):
    model = create_backbone(name, embedding_size=32, input_shape=(32, 32, 3), **kwargs)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return model, str(path)


def _trainer(tmp_path, *sets, max_steps=None, out="run"):
    config = resolve("finetune", [*SMALL, *sets])
    task = FaceRecognitionTask(config)
    return Trainer(task, tf.distribute.get_strategy(), str(tmp_path / out), max_steps=max_steps)


def test_pretrained_gives_architecture_and_weights(tmp_path):
    source, path = _saved(tmp_path)
    task = FaceRecognitionTask(resolve("finetune", [*SMALL, f"model.pretrained={path}"]))
    backbone = task.build_backbone()
    assert type(backbone) is type(source)
    assert backbone.get_config()["depth"] == 10
    assert backbone.embedding_size == 32
    for a, b in zip(backbone.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(backbone(x), source(x), rtol=1e-6, atol=1e-6)


def test_pretrained_embedding_size_overrides_config(tmp_path):
    _, path = _saved(tmp_path)
    config = resolve("finetune", [*SMALL, f"model.pretrained={path}"])
    assert config.model.embedding_size == 0  # the preset takes it from the file
    backbone = FaceRecognitionTask(config).build_backbone()
    assert backbone.embedding_size == 32 and config.model.embedding_size == 32
    config = resolve("finetune", [*SMALL, f"model.pretrained={path}", "model.embedding_size=512"])
    with pytest.warns(UserWarning, match="model.embedding_size.*512.*gives 32"):
        backbone = FaceRecognitionTask(config).build_backbone()
    assert backbone.embedding_size == 32 and config.model.embedding_size == 32


@pytest.mark.parametrize(
    "sets, key, message",
    [
        (["model.backbone=mobilefacenet"], "model.backbone", "holds another architecture"),
        (["model.backbone=iresnet18"], "model.backbone", "stage|depth"),
        (["model.include_preprocessing=false"], "model.include_preprocessing", "set it to match"),
        (
            ["data.image_size=48,48"],
            "model.pretrained",
            "takes 32x32 images but the data are 48x48",
        ),
    ],
)
def test_pretrained_conflicts_are_config_errors(tmp_path, sets, key, message):
    _, path = _saved(tmp_path)
    config = resolve("finetune", [*SMALL, f"model.pretrained={path}", *sets])
    with pytest.raises(ConfigError, match=message) as e:
        FaceRecognitionTask(config).build_backbone()
    assert e.value.key == key


def test_same_architecture_name_is_accepted(tmp_path):
    _, path = _saved(tmp_path)
    config = resolve("finetune", [*SMALL, f"model.pretrained={path}", "model.backbone=iresnet10"])
    assert FaceRecognitionTask(config).build_backbone().get_config()["depth"] == 10


def test_finetune_needs_a_model(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.pretrained") as e:
        FaceRecognitionTask(resolve("finetune", SMALL)).build_backbone()
    assert e.value.key == "model.backbone"


def test_missing_pretrained_file_names_the_key(tmp_path):
    config = resolve("finetune", [*SMALL, f"model.pretrained={tmp_path / 'nothing.pth'}"])
    with pytest.raises(ConfigError, match=r"nothing\.pth") as e:
        FaceRecognitionTask(config).build_backbone()
    assert e.value.key == "model.pretrained"


def test_head_only_phase_then_backbone_trains(tmp_path):
    _, path = _saved(tmp_path)
    # 160 images / batch 8 = 20 steps per epoch: 0.1 epoch = 2 head-only steps
    trainer = _trainer(
        tmp_path, f"model.pretrained={path}", "optimizer.freeze_backbone_epochs=0.1", max_steps=4
    )
    assert trainer.freeze_steps == 2
    initial = [v.numpy().copy() for v in trainer.backbone.weights]  # incl. BN statistics
    head0 = [v.numpy().copy() for v in trainer.head.weights]
    trainer.iterator = trainer._make_iterator(0)
    for _ in range(2):
        trainer._train_fn(trainer.iterator, tf.constant(0.0))
    assert trainer.step == 2
    for v, before in zip(trainer.backbone.weights, initial, strict=True):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    assert any(not np.array_equal(v.numpy(), b) for v, b in zip(trainer.head.weights, head0))
    trainer._train_fn(trainer.iterator, tf.constant(0.0))
    moved = [not np.array_equal(v.numpy(), b) for v, b in zip(trainer.backbone.weights, initial)]
    assert sum(moved) > len(moved) // 2


def test_backbone_lr_mult_scales_the_first_sgd_step_exactly(tmp_path):
    _, path = _saved(tmp_path)
    deltas = {}
    for mult in (1.0, 0.25):
        trainer = _trainer(
            tmp_path,
            f"model.pretrained={path}",
            "optimizer.freeze_backbone_epochs=0",
            f"optimizer.backbone_lr_mult={mult}",
            "optimizer.clip_norm=0",
            out=f"run{mult}",
        )
        before = [v.numpy().copy() for v in trainer.backbone.trainable_variables]
        head = [v.numpy().copy() for v in trainer.head.trainable_variables]
        trainer.iterator = trainer._make_iterator(0)
        trainer._train_fn(trainer.iterator, tf.constant(0.0))
        deltas[mult] = (
            [v.numpy() - b for v, b in zip(trainer.backbone.trainable_variables, before)],
            [v.numpy() - b for v, b in zip(trainer.head.trainable_variables, head)],
        )
    full, quarter = deltas[1.0], deltas[0.25]
    norm = np.sqrt(sum(float(np.sum(d**2)) for d in full[0]))
    assert norm > 0
    for a, b in zip(full[0], quarter[0], strict=True):
        np.testing.assert_allclose(b, 0.25 * a, rtol=1e-4, atol=1e-7 * norm)
    for a, b in zip(full[1], quarter[1], strict=True):  # the head keeps the full rate
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)


def test_lr_mult_needs_sgd():
    with pytest.raises(ConfigError) as e:
        resolve(
            "finetune", [*SMALL, "optimizer.name=adamw", "optimizer.weight_decay_mode=decoupled"]
        )
    assert e.value.key == "optimizer.backbone_lr_mult"


def test_without_preprocessing_the_trainer_normalises(tmp_path):
    """A backbone that takes (x - 127.5) / 128 trains on the same pipeline and embeds the
    verification images identically to its twin with preprocessing inside."""
    source, path = _saved(tmp_path, include_preprocessing=False)
    trainer = _trainer(
        tmp_path, f"model.pretrained={path}", "model.include_preprocessing=false", max_steps=2
    )
    twin = create_backbone("iresnet10", embedding_size=32, input_shape=(32, 32, 3))
    twin.set_weights(source.get_weights())
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(
        trainer._embed_fn()(x).numpy(), twin(x.astype("float32")), rtol=1e-5, atol=1e-5
    )
    summary = trainer.train()
    assert summary["steps"] == 2 and np.isfinite(summary["last"]["loss"])
