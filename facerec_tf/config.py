"""Typed training configuration: dataclasses, named presets, files and ``key=value`` overrides.

A :class:`TrainConfig` has six sections (``data``, ``model``, ``head``, ``optimizer``,
``schedule``, ``runtime``). Presets are named like arcface_torch's config files
(``ms1mv2_r50`` ...) plus ``quickstart``. A config file (JSON or YAML) holds a partial dict,
optionally with ``base: PRESET``; ``--set section.key=value`` overrides any field. Unknown keys
and values of the wrong type raise :class:`facerec_tf.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from facerec_tf.errors import ConfigError


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    source: str = "synthetic"  # "synthetic" or a folder of TFRecord shards + manifest.json
    dataset: str = "synthetic"  # a name for logs (ms1mv2, glint360k, ...)
    num_classes: int = 0  # 0 = read from the manifest (or the synthetic default)
    num_images: int = 0  # 0 = read from the manifest
    batch_size: int = 128  # per replica, as in arcface_torch
    image_size: tuple[int, int] = (112, 112)
    shuffle_buffer: int = 8192
    random_flip: bool = True
    color_jitter: float = 0.0
    cutout: float = 0.0
    verification_targets: tuple[str, ...] = ("lfw", "cfp_fp", "agedb_30")
    verification_dir: str = ""  # default: the data folder
    synthetic_verification_pairs: int = 600  # held-out identity pairs when source=synthetic
    # K > 0: P x K batches (batch_size / K identities, K images each) for triplet and PFE
    images_per_identity: int = 0


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    embedding_size: int = 512  # 0 = the size of model.pretrained
    dropout: float | None = None  # None = the backbone's default (0, Facenet 0.5)
    l2_normalize: bool | None = None  # Facenet backbones only (their default: true)
    # Start from a pretrained backbone: a .keras file, a run folder, an arcface_torch .pth or
    # an insightface .onnx; its architecture is used (model.backbone empty, or the same one).
    pretrained: str = ""
    # True: the model maps RGB 0..255 to (x - 127.5) / 128 itself; False: the pipeline does.
    include_preprocessing: bool = True
    sync_batch_norm: bool = False  # per-replica BN statistics by default, as insightface


@dataclass
class HeadConfig:
    name: str = "arcface"  # arcface, cosface, sphereface, combined, normface, softmax
    scale: float = 64.0
    m1: float | None = None  # None = the preset's value
    m2: float | None = None
    m3: float | None = None
    easy_margin: bool = False
    interclass_filtering_threshold: float = 0.0
    # "exact" (full gradient) or "arcface_torch" (value s cos(theta + m2), gradient of s cos
    # through the target, like arcface_torch's CombinedMarginLoss); margin heads only.
    margin_gradient: str = "exact"
    # Partial FC: class centres split across the replicas (not mirrored), softmax normalised
    # with collectives; sample_rate < 1 trains each step on all positives + random negatives.
    partial_fc: bool = False
    sample_rate: float = 1.0
    # Adaptive heads (None = the published default; see facerec_tf.heads.adaptive):
    margin: float | None = None  # curricularface (0.5), adaface (0.4)
    l_a: float | None = None  # magface: magnitude range and margin range, g weight
    u_a: float | None = None
    l_m: float | None = None
    u_m: float | None = None
    lambda_g: float | None = None
    alpha: float | None = None  # curricularface: EMA rate of t
    h: float | None = None  # adaface
    t_alpha: float | None = None
    beta: float | None = (
        None  # sphereface_annealed: lambda = max(beta_min, beta (1+gamma i)^-power)
    )
    beta_min: float | None = None
    gamma: float | None = None
    power: float | None = None
    beta_freeze: int | None = None


@dataclass
class LossConfig:
    """Terms added to the head's cross entropy (each per example, averaged over the global
    batch). See README "Losses and backbones"."""

    softmax_weight: float = 1.0  # weight of the head's cross entropy
    triplet_weight: float = 0.0  # Facenet triplet loss (needs data.images_per_identity >= 2)
    triplet_margin: float | None = None  # None: 0.2 (euclidean), 0.35 (angular)
    triplet_mining: str = "batch_hard"  # batch_hard, semi_hard, all
    triplet_distance: str = "squared_euclidean"  # squared_euclidean, euclidean, angular
    center_weight: float = 0.0  # center loss lambda (Wen et al. 2016)
    center_alpha: float = 0.5  # centre update rate
    distill_weight: float = 0.0  # embedding distillation from loss.teacher
    distill_kind: str = "l2"  # l2 or angular
    teacher: str = ""  # frozen teacher: a backbone .keras file or a run folder
    pfe: bool = False  # train a PFE uncertainty head on the frozen model.pretrained backbone


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd or adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "coupled": torch / insightface L2 (wd * w added to the gradient, then momentum);
    # "decoupled": Keras / AdamW style (w -= lr * wd * w, outside the momentum).
    weight_decay_mode: str = "coupled"
    centers_weight_decay_mult: float = 1.0  # the MXNet trainer's fc7-wd-mult
    clip_norm: float = 5.0  # global-norm clip of the backbone gradient; 0 = off
    # Fine-tuning: the backbone's learning rate is the schedule's times backbone_lr_mult (SGD),
    # and for the first freeze_backbone_epochs only the head trains (backbone in inference mode).
    backbone_lr_mult: float = 1.0
    freeze_backbone_epochs: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8


@dataclass
class ScheduleConfig:
    name: str = "polynomial"  # polynomial (warmup + poly decay), step, cosine, constant
    base_lr: float = 0.1
    epochs: float = 20.0
    warmup_epochs: float = 0.0
    power: float = 2.0  # arcface_torch's PolyScheduler
    end_lr: float = 0.0
    lr_steps: tuple[float, ...] = ()  # epochs for the step schedule (the seed's --lr-steps)
    step_factor: float = 0.1
    total_steps: int = 0  # 0 = epochs * num_images / global batch


@dataclass
class RuntimeConfig:
    # auto = mixed_bfloat16 under TPUStrategy (what TPUs compute in), fp32 elsewhere
    precision: str = "auto"  # auto, fp32, mixed_float16, mixed_bfloat16
    jit_compile: bool = False
    seed: int = 0
    deterministic: bool = False  # op determinism + deterministic input order (exact resume)
    checkpoint_every: int = 2000  # steps
    keep_checkpoints: int = 3
    log_every: int = 50
    verify_every: int = 2000
    steps_per_loop: int = 1  # steps inside one tf.function call
    export: bool = True  # write OUTPUT/export (backbone.keras + SavedModel) at the end
    export_precision: str = "float32"  # float32, bfloat16: the final SavedModel's compute dtype


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Presets (class and image counts as in arcface_torch's configs).


def _dataset_preset(dataset, classes, images, backbone, epochs=20, warmup=0.0, **extra):
    config = TrainConfig()
    config.data.dataset = dataset
    config.data.num_classes = classes
    config.data.num_images = images
    config.model.backbone = backbone
    config.schedule.epochs = epochs
    config.schedule.warmup_epochs = warmup
    return merge(config, extra) if extra else config


def _quickstart():
    # A 2-core CPU run of a few minutes on the synthetic source: 400 steps of 64 images at
    # 64x64 (see README for the measured time and held-out accuracy).
    return from_dict(
        {
            "data": {
                "source": "synthetic",
                "dataset": "synthetic",
                "num_classes": 1000,
                "num_images": 64000,
                "batch_size": 64,
                "image_size": [64, 64],
                "verification_targets": ["synthetic_holdout"],
                "synthetic_verification_pairs": 2000,
            },
            "model": {"backbone": "mobilefacenet_small", "embedding_size": 128},
            "head": {"name": "arcface", "scale": 32.0, "m2": 0.3},
            "optimizer": {"weight_decay": 5e-4, "clip_norm": 5.0},
            "schedule": {
                "name": "cosine",
                "base_lr": 0.1,
                "total_steps": 400,
                "warmup_epochs": 0.05,
            },
            "runtime": {"checkpoint_every": 100, "log_every": 25, "verify_every": 200},
        }
    )


PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    "ms1mv2_r50": lambda: _dataset_preset("ms1mv2", 85742, 5822653, "iresnet50"),
    "ms1mv2_r100": lambda: _dataset_preset("ms1mv2", 85742, 5822653, "iresnet100"),
    "ms1mv3_r50": lambda: _dataset_preset("ms1mv3", 93431, 5179510, "iresnet50"),
    "ms1mv3_r100": lambda: _dataset_preset("ms1mv3", 93431, 5179510, "iresnet100"),
    "glint360k_r100": lambda: _dataset_preset(
        "glint360k", 360232, 17091657, "iresnet100", head={"name": "cosface"}
    ),
    "webface4m_r50": lambda: _dataset_preset("webface4m", 205990, 4235242, "iresnet50", warmup=2.0),
    "casia_r50": lambda: _dataset_preset("casia", 10572, 490623, "iresnet50", epochs=20),
    "quickstart": _quickstart,
    "finetune": lambda: _finetune(),
    # Issue-7 families (README "Losses and backbones"); each trains from train.py.
    "casia_facenet_mobilenet": lambda: _facenet_preset("facenet_mobilenet"),
    "casia_facenet_inception_resnetv1": lambda: _facenet_preset("facenet_inception_resnetv1"),
    "casia_center_loss": lambda: _dataset_preset(
        "casia",
        10572,
        490623,
        "mobilefacenet",
        head={"name": "softmax"},
        loss={"center_weight": 0.003, "center_alpha": 0.5},
    ),
    "casia_sphereface_annealed": lambda: _dataset_preset(
        "casia", 10572, 490623, "iresnet50", head={"name": "sphereface_annealed"}
    ),
    "ms1mv2_r100_magface": lambda: _dataset_preset(
        "ms1mv2", 85742, 5822653, "iresnet100", head={"name": "magface"}
    ),
    "ms1mv2_r100_curricularface": lambda: _dataset_preset(
        "ms1mv2", 85742, 5822653, "iresnet100", head={"name": "curricularface"}
    ),
    "ms1mv2_r100_adaface": lambda: _dataset_preset(
        "ms1mv2", 85742, 5822653, "iresnet100", head={"name": "adaface"}
    ),
    # student VarGFaceNet + ArcFace, distilled from a teacher given with --set loss.teacher=
    "ms1mv2_vargfacenet_distill": lambda: _dataset_preset(
        "ms1mv2", 85742, 5822653, "vargfacenet", loss={"distill_weight": 1.0}
    ),
    # PFE on a trained backbone given with --set model.pretrained= (its architecture)
    "ms1mv2_r50_pfe": lambda: _dataset_preset(
        "ms1mv2",
        85742,
        5822653,
        "",
        head={"name": "none"},
        loss={"pfe": True, "softmax_weight": 0.0},
        data={"images_per_identity": 4, "batch_size": 256},
        schedule={"name": "cosine", "base_lr": 0.002, "total_steps": 12000},
    ),
}


def _finetune():
    # Fine-tune a pretrained backbone (--set model.pretrained=FILE: .onnx, .pth, .keras or a
    # run folder; its architecture is used) on a small set of identities: the new ArcFace head
    # trains alone for the first 2 epochs (backbone frozen, BN statistics kept), then the
    # backbone joins at a tenth of the head's learning rate. See README "Fine-tuning".
    return from_dict(
        {
            "data": {"source": "", "dataset": "custom", "batch_size": 64},
            "model": {"backbone": "", "embedding_size": 0},
            "head": {"name": "arcface"},
            "optimizer": {
                "weight_decay": 5e-4,
                "backbone_lr_mult": 0.1,
                "freeze_backbone_epochs": 2.0,
            },
            "schedule": {"name": "cosine", "base_lr": 0.1, "epochs": 20.0},
            "runtime": {"checkpoint_every": 500, "log_every": 10, "verify_every": 200},
        }
    )


def _facenet_preset(backbone):
    # bubbliiiing / davidsandberg Facenet: 160x160 CASIA, 128-d L2-normalised embedding,
    # triplet loss (semi-hard, margin 0.2) + the softmax classifier trained jointly, P x K batches.
    return _dataset_preset(
        "casia",
        10572,
        490623,
        backbone,
        epochs=100,
        model={"embedding_size": 128},
        head={"name": "softmax"},
        data={"image_size": [160, 160], "images_per_identity": 3, "batch_size": 96},
        loss={"triplet_weight": 1.0, "triplet_mining": "semi_hard", "triplet_margin": 0.2},
        optimizer={"name": "adamw", "weight_decay_mode": "decoupled", "weight_decay": 5e-4},
        schedule={"name": "step", "base_lr": 1e-3, "lr_steps": [50.0, 75.0]},
    )


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset; valid presets: {', '.join(list_presets())}", key=name)
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# Typed conversion


def _convert(value, annotation, key):
    """Coerce ``value`` (from JSON/YAML or a ``--set`` string) to ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e.detail)
        raise ConfigError("; ".join(errors), key=key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {value!r}", key=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"expected {len(args)} values, got {value!r}", key=key)
        return tuple(_convert(v, a, key) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {value!r}", key=key)
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}", key=key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"expected an integer, got {value!r}", key=key)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", key=key)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", key=key)
    raise ConfigError(f"unsupported field type {annotation}", key=key)


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def merge(config: TrainConfig, updates: dict, prefix: str = "") -> TrainConfig:
    """Return a copy of ``config`` with the nested dict ``updates`` applied, type-checked."""
    config = dataclasses.replace(
        config, **{k: dataclasses.replace(getattr(config, k)) for k in _fields(TrainConfig)}
    )
    if not isinstance(updates, dict):
        raise ConfigError(
            f"expected a mapping, got {type(updates).__name__}", key=prefix or "<root>"
        )
    for section, values in updates.items():
        if section == "base":
            continue
        sections = _fields(TrainConfig)
        if section not in sections:
            raise ConfigError(
                f"unknown section; valid sections: {', '.join(sections)}", key=prefix + section
            )
        if not isinstance(values, dict):
            raise ConfigError("expected a mapping of keys to values", key=prefix + section)
        target = getattr(config, section)
        fields = _fields(type(target))
        for key, value in values.items():
            full = f"{prefix}{section}.{key}"
            if key not in fields:
                raise ConfigError(
                    f"unknown key; valid keys of {section!r}: {', '.join(fields)}", key=full
                )
            setattr(target, key, _convert(value, fields[key], full))
    validate(config)
    return config


def from_dict(d: dict) -> TrainConfig:
    base = get_preset(d["base"]) if isinstance(d, dict) and "base" in d else TrainConfig()
    return merge(base, d)


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """``["optimizer.weight_decay=1e-4", "data.batch_size=64"]`` -> nested dict of strings."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("expected section.key=value", key=item)
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                "expected section.key=value (e.g. optimizer.weight_decay=1e-4)", key=key
            )
        out.setdefault(parts[0], {})[parts[1]] = value.strip()
    return out


def load_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError("YAML configs need PyYAML (pip install pyyaml)", key=path) from e
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON: {e}", key=path) from e
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping", key=path)
    return data


def resolve(name_or_file: str, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """A preset name or a JSON/YAML file, then ``key=value`` overrides."""
    if os.path.exists(name_or_file):
        config = from_dict(load_file(name_or_file))
    else:
        config = get_preset(name_or_file)
    return merge(config, parse_overrides(overrides))


MARGIN_KEYS = (
    "scale",
    "m1",
    "m2",
    "m3",
    "easy_margin",
    "interclass_filtering_threshold",
    "margin_gradient",
)
# Config keys each head takes (others must stay unset).
HEAD_KEYS = {
    **{name: MARGIN_KEYS for name in ("arcface", "cosface", "sphereface", "combined", "normface")},
    "softmax": (),
    "none": (),
    "magface": ("scale", "l_a", "u_a", "l_m", "u_m", "lambda_g", "easy_margin"),
    "curricularface": ("scale", "margin", "alpha"),
    "adaface": ("scale", "margin", "h", "t_alpha"),
    "sphereface_annealed": ("scale", "m1", "beta", "beta_min", "gamma", "power", "beta_freeze"),
}


CHOICES = {
    "head.name": tuple(HEAD_KEYS),  # facerec_tf.heads.list_heads() + "none"
    "head.margin_gradient": ("exact", "arcface_torch"),  # facerec_tf.heads.MARGIN_GRADIENTS
    "optimizer.name": ("sgd", "adamw"),
    "optimizer.weight_decay_mode": ("coupled", "decoupled"),
    "schedule.name": ("polynomial", "step", "cosine", "constant"),
    "runtime.precision": ("auto", "fp32", "mixed_float16", "mixed_bfloat16"),
    "runtime.export_precision": ("float32", "bfloat16"),
    "loss.triplet_mining": ("batch_hard", "semi_hard", "all"),
    "loss.triplet_distance": ("squared_euclidean", "euclidean", "angular"),
    "loss.distill_kind": ("l2", "angular"),
}

_HEAD_DEFAULTS = {
    "scale": 64.0,
    "easy_margin": False,
    "interclass_filtering_threshold": 0.0,
    "margin_gradient": "exact",
}


def head_kwargs(head: HeadConfig) -> dict:
    """The constructor arguments of ``head.name`` that the config sets."""
    out = {}
    for key in HEAD_KEYS[head.name]:
        value = getattr(head, key)
        if value is not None and not (key != "scale" and _HEAD_DEFAULTS.get(key) == value):
            out[key] = value
    return out


def validate(config: TrainConfig) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}, got {value!r}", key=key)
    positive = {
        "data.batch_size": config.data.batch_size,
        "runtime.log_every": config.runtime.log_every,
        "runtime.checkpoint_every": config.runtime.checkpoint_every,
        "runtime.keep_checkpoints": config.runtime.keep_checkpoints,
        "runtime.steps_per_loop": config.runtime.steps_per_loop,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"must be > 0, got {value}", key=key)
    non_negative = {
        "data.num_classes": config.data.num_classes,
        "data.num_images": config.data.num_images,
        "optimizer.weight_decay": config.optimizer.weight_decay,
        "optimizer.clip_norm": config.optimizer.clip_norm,
        "schedule.warmup_epochs": config.schedule.warmup_epochs,
        "schedule.total_steps": config.schedule.total_steps,
        "optimizer.backbone_lr_mult": config.optimizer.backbone_lr_mult,
        "optimizer.freeze_backbone_epochs": config.optimizer.freeze_backbone_epochs,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"must be >= 0, got {value}", key=key)
    _validate_partial_fc(config)
    _validate_losses(config)
    _validate_margin_gradient(config)
    o = config.optimizer
    if o.weight_decay_mode == "decoupled" and o.centers_weight_decay_mult not in (0.0, 1.0):
        raise ConfigError(
            "decoupled weight decay supports a centre multiplier of 0 or 1 only; use "
            "weight_decay_mode=coupled for other values",
            key="optimizer.centers_weight_decay_mult",
        )
    if o.backbone_lr_mult != 1.0 and o.name != "sgd":
        raise ConfigError(
            "a backbone learning-rate multiplier is applied through SGD's gradient (exact "
            "for SGD with momentum only); use optimizer.name=sgd",
            key="optimizer.backbone_lr_mult",
        )
    if (o.backbone_lr_mult != 1.0 or o.freeze_backbone_epochs) and config.loss.pfe:
        raise ConfigError("PFE never trains the backbone", key="optimizer.freeze_backbone_epochs")
    if o.name == "adamw" and o.weight_decay_mode == "coupled" and o.weight_decay > 0:
        raise ConfigError(
            "AdamW decays weights decoupled; set optimizer.weight_decay_mode=decoupled",
            key="optimizer.weight_decay_mode",
        )


def _validate_partial_fc(config: TrainConfig) -> None:
    h, o = config.head, config.optimizer
    if not 0.0 < h.sample_rate <= 1.0:
        raise ConfigError(f"must be in (0, 1], got {h.sample_rate}", key="head.sample_rate")
    if not h.partial_fc:
        if h.sample_rate < 1.0:
            raise ConfigError(
                "sampling needs Partial FC: set head.partial_fc=true", key="head.sample_rate"
            )
        return
    unsupported = {
        "head.name": h.name not in ("arcface", "cosface", "sphereface", "combined", "normface"),
        "head.easy_margin": h.easy_margin,
        "head.interclass_filtering_threshold": h.interclass_filtering_threshold > 0,
        "optimizer.name": o.name != "sgd",
        "optimizer.weight_decay_mode": o.weight_decay_mode != "coupled",
        "optimizer.freeze_backbone_epochs": o.freeze_backbone_epochs > 0,
    }
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(
                "not supported with head.partial_fc=true (Partial FC trains the sharded "
                "centres with its own SGD, coupled weight decay, and the combined margin "
                "of the arcface/cosface/sphereface/combined/normface heads)",
                key=key,
            )


def _validate_margin_gradient(config: TrainConfig) -> None:
    """``head.margin_gradient=arcface_torch`` needs a margin arcface_torch defines (m1 == 1,
    not both m2 and m3, no easy margin); other heads reject the key in _validate_losses."""
    h = config.head
    if h.margin_gradient == "exact" or "margin_gradient" not in HEAD_KEYS[h.name]:
        return
    from facerec_tf.heads.angular import check_margin_gradient
    from facerec_tf.heads.margin import MARGIN_PRESETS

    preset = MARGIN_PRESETS[h.name]
    m = {
        k: getattr(preset, k) if getattr(h, k) is None else getattr(h, k)
        for k in ("m1", "m2", "m3")
    }
    try:
        check_margin_gradient(h.margin_gradient, easy_margin=h.easy_margin, **m)
    except ValueError as e:
        raise ConfigError(str(e), key="head.margin_gradient") from e


def _validate_losses(config: TrainConfig) -> None:
    h, loss, d = config.head, config.loss, config.data
    accepted = set(HEAD_KEYS[h.name])
    for key in _fields(HeadConfig):
        if key in ("name", "scale", "partial_fc", "sample_rate") or key in accepted:
            continue
        value = getattr(h, key)
        if value is not None and _HEAD_DEFAULTS.get(key, None) != value:
            valid = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(f"not used by head {h.name!r} (its keys: {valid})", key=f"head.{key}")
    for key in ("softmax_weight", "triplet_weight", "center_weight", "distill_weight"):
        if getattr(loss, key) < 0:
            raise ConfigError(f"must be >= 0, got {getattr(loss, key)}", key=f"loss.{key}")
    if d.images_per_identity < 0:
        raise ConfigError("must be >= 0", key="data.images_per_identity")
    if d.images_per_identity and d.batch_size % d.images_per_identity:
        raise ConfigError(
            f"data.batch_size {d.batch_size} is not a multiple of {d.images_per_identity}",
            key="data.images_per_identity",
        )
    if (loss.triplet_weight > 0 or loss.pfe) and d.images_per_identity < 2:
        raise ConfigError(
            "triplet and PFE losses need several images per identity in each batch: set "
            "data.images_per_identity (e.g. 4)",
            key="data.images_per_identity",
        )
    # (a missing loss.teacher / model.pretrained is reported when the run is built, so that
    # presets can leave them to the user)
    if loss.pfe:
        if h.name != "none":
            raise ConfigError("PFE trains no classifier: set head.name=none", key="head.name")
    elif h.name == "none" and loss.triplet_weight == 0:
        raise ConfigError(
            "without a classification head the run needs loss.triplet_weight > 0 or loss.pfe",
            key="head.name",
        )
    extras = loss.triplet_weight or loss.center_weight or loss.distill_weight or loss.pfe
    if h.partial_fc and extras:
        raise ConfigError(
            "Partial FC is trained with the margin softmax only", key="head.partial_fc"
        )
