"""Typed configs: presets, files, overrides, and errors that name the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from facerec_tf.config import (
    TrainConfig,
    get_preset,
    list_presets,
    merge,
    parse_overrides,
    resolve,
)
from facerec_tf.errors import ConfigError

ARCFACE_TORCH_COUNTS = {
    "ms1mv2_r50": (85742, 5822653),
    "ms1mv2_r100": (85742, 5822653),
    "ms1mv3_r50": (93431, 5179510),
    "ms1mv3_r100": (93431, 5179510),
    "glint360k_r100": (360232, 17091657),
    "webface4m_r50": (205990, 4235242),
}


@pytest.mark.parametrize("name", sorted(ARCFACE_TORCH_COUNTS))
def test_dataset_presets_match_arcface_torch(name):
    c = get_preset(name)
    assert (c.data.num_classes, c.data.num_images) == ARCFACE_TORCH_COUNTS[name]
    assert c.model.backbone == {"r50": "iresnet50", "r100": "iresnet100"}[name.split("_")[1]]
    # insightface training defaults
    assert (c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay) == ("sgd", 0.9, 5e-4)
    assert (c.schedule.base_lr, c.data.batch_size, c.model.embedding_size) == (0.1, 128, 512)
    assert c.schedule.name == "polynomial"


def test_all_presets_are_valid():
    assert {"quickstart", "casia_r50", *ARCFACE_TORCH_COUNTS} <= set(list_presets())
    for name in list_presets():
        assert isinstance(get_preset(name), TrainConfig)


def test_overrides_are_typed():
    c = resolve(
        "ms1mv2_r50",
        [
            "optimizer.weight_decay=1e-4",
            "data.batch_size=64",
            "runtime.jit_compile=true",
            "schedule.lr_steps=8,14,18",
            "head.m2=none",
            "data.image_size=96,96",
        ],
    )
    assert (
        c.optimizer.weight_decay == 1e-4
        and c.data.batch_size == 64
        and c.runtime.jit_compile is True
    )
    assert (
        c.schedule.lr_steps == (8.0, 14.0, 18.0)
        and c.head.m2 is None
        and c.data.image_size == (96, 96)
    )


@pytest.mark.parametrize(
    "override, key, message",
    [
        ("optimizer.wieght_decay=1", "optimizer.wieght_decay", "unknown key"),
        ("optimiser.weight_decay=1", "optimiser", "unknown section"),
        ("data.batch_size=big", "data.batch_size", "expected an integer"),
        ("data.batch_size=1.5", "data.batch_size", "expected an integer"),
        ("runtime.jit_compile=maybe", "runtime.jit_compile", "expected true or false"),
        ("runtime.precision=fp8", "runtime.precision", "must be one of"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay", "must be >= 0"),
        ("data.batch_size=0", "data.batch_size", "must be > 0"),
        ("data.image_size=112", "data.image_size", "expected 2 values"),
        ("weight_decay", "weight_decay", "expected section.key=value"),
        ("head.sample_rate=0", "head.sample_rate", "must be in \\(0, 1\\]"),
        ("head.sample_rate=0.1", "head.sample_rate", "set head.partial_fc=true"),
    ],
)
def test_config_errors_name_the_key(override, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve("quickstart", [override])
    assert info.value.key == key and repr(key) in str(info.value)


def test_config_file_with_base_and_errors(tmp_path):
    path = tmp_path / "my.json"
    path.write_text(json.dumps({"base": "glint360k_r100", "optimizer": {"clip_norm": 0}}))
    c = resolve(str(path))
    assert (
        c.data.num_classes == 360232 and c.optimizer.clip_norm == 0.0 and c.head.name == "cosface"
    )
    path.write_text(json.dumps({"model": {"backbone": 50}}))
    with pytest.raises(ConfigError, match=r"'model\.backbone': expected a string"):
        resolve(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve(str(path))
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("ms1mv9_r50")


def test_weight_decay_mode_rules():
    with pytest.raises(ConfigError, match="centers_weight_decay_mult"):
        merge(
            TrainConfig(),
            {"optimizer": {"weight_decay_mode": "decoupled", "centers_weight_decay_mult": 10}},
        )
    with pytest.raises(ConfigError, match="weight_decay_mode"):
        merge(TrainConfig(), {"optimizer": {"name": "adamw"}})


@pytest.mark.parametrize(
    "override, key",
    [
        ("head.name=softmax", "head.name"),
        ("head.easy_margin=true", "head.easy_margin"),
        ("head.interclass_filtering_threshold=0.2", "head.interclass_filtering_threshold"),
        ("optimizer.weight_decay_mode=decoupled", "optimizer.weight_decay_mode"),
    ],
)
def test_partial_fc_refuses_what_it_does_not_implement(override, key):
    resolve("quickstart", ["head.partial_fc=true", "head.sample_rate=0.1"])  # fine
    with pytest.raises(ConfigError, match=r"not supported with head\.partial_fc=true") as info:
        resolve("quickstart", ["head.partial_fc=true", override])
    assert info.value.key == key


def test_precision_auto_is_bfloat16_on_tpu_only():
    import tensorflow as tf

    from facerec_tf.training.trainer import resolve_precision

    assert resolve("quickstart").runtime.precision == "auto"
    assert resolve_precision("auto", tf.distribute.get_strategy()) == "fp32"
    assert resolve_precision("mixed_float16", tf.distribute.get_strategy()) == "mixed_float16"
    fake_tpu = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)  # no TPU here
    assert resolve_precision("auto", fake_tpu) == "mixed_bfloat16"
    assert resolve_precision("fp32", fake_tpu) == "fp32"


def test_tpu_strategy_without_a_tpu_fails_fast(tmp_path):
    """No TPU on this machine: exit 2 within seconds, with the fix in the message, and no
    run folder left behind."""
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "quickstart",
            "--data",
            "synthetic",
            "--output",
            str(tmp_path / "run"),
            "--strategy",
            "tpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: no TPU reachable at (auto-detected)" in out.stderr
    assert "--tpu NAME_OR_ADDRESS" in out.stderr
    assert not (tmp_path / "run").exists()


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x=y"]) == {"a": {"b": "1", "c": "x=y"}}


def test_train_cli_reports_config_errors():
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "quickstart",
            "--data",
            "synthetic",
            "--output",
            "/tmp/x",
            "--set",
            "head.scael=30",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "config key 'head.scael': unknown key" in out.stderr
    help_text = subprocess.run(
        [sys.executable, "train.py", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "--strategy {default,mirrored,multiworker,tpu}" in help_text.stdout
    assert "python train.py --config quickstart --data synthetic" in help_text.stdout


def test_margin_gradient_key():
    from facerec_tf.config import CHOICES, head_kwargs
    from facerec_tf.heads import MARGIN_GRADIENTS

    assert CHOICES["head.margin_gradient"] == MARGIN_GRADIENTS
    assert "margin_gradient" not in head_kwargs(resolve("quickstart").head)  # default: exact
    c = resolve("quickstart", ["head.margin_gradient=arcface_torch"])
    assert head_kwargs(c.head)["margin_gradient"] == "arcface_torch"
    c = resolve(
        "quickstart", ["head.name=cosface", "head.m2=0", "head.margin_gradient=arcface_torch"]
    )
    assert c.head.margin_gradient == "arcface_torch"  # identical gradient, accepted
    resolve("quickstart", ["head.partial_fc=true", "head.margin_gradient=arcface_torch"])
    cases = [
        ({"margin_gradient": "torch"}, "must be one of exact, arcface_torch, got 'torch'"),
        ({"name": "sphereface"}, "needs m1 == 1, got m1=1.35"),
        ({"name": "combined"}, r"drops m2 when m3 > 0"),
        ({"m3": 0.1}, r"drops m2 when m3 > 0"),
        ({"easy_margin": True}, "has no easy_margin"),
        ({"name": "adaface"}, r"not used by head 'adaface'"),
        ({"name": "softmax"}, r"not used by head 'softmax'"),
    ]
    for head, message in cases:
        head = {"margin_gradient": "arcface_torch", **head}
        with pytest.raises(ConfigError, match=message) as info:
            merge(TrainConfig(), {"head": head})
        assert info.value.key == "head.margin_gradient"
