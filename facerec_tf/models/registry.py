"""One registry of backbones and one entry point, :func:`create_backbone`.

Each row of :data:`BACKBONES` names a backbone class and the arguments that make the
variant; depth variants are rows, not files.
"""

from __future__ import annotations

import inspect

from facerec_tf.models.facenet import FacenetBackbone
from facerec_tf.models.iresnet import IResNetBackbone
from facerec_tf.models.mobilefacenet import MobileFaceNetBackbone
from facerec_tf.models.vargfacenet import VarGFaceNetBackbone

BACKBONES: dict[str, tuple[type, dict]] = {
    "iresnet10": (IResNetBackbone, {"depth": 10}),  # CPU smoke runs and tests
    "iresnet18": (IResNetBackbone, {"depth": 18}),
    "iresnet34": (IResNetBackbone, {"depth": 34}),
    "iresnet50": (IResNetBackbone, {"depth": 50}),
    "iresnet100": (IResNetBackbone, {"depth": 100}),
    "iresnet200": (IResNetBackbone, {"depth": 200}),
    "ir_se50": (IResNetBackbone, {"depth": 50, "se": True}),
    "ir_se100": (IResNetBackbone, {"depth": 100, "se": True}),
    "mobilefacenet": (MobileFaceNetBackbone, {}),
    # arcface_torch mbf_large: scale 4, blocks (2, 8, 12, 4)
    "mobilefacenet_large": (
        MobileFaceNetBackbone,
        {"width_scale": 4, "stage_units": (2, 8, 12, 4)},
    ),
    # half width (arcface_torch scale=1): the CPU quickstart backbone
    "mobilefacenet_small": (MobileFaceNetBackbone, {"width_scale": 1}),
    "vargfacenet": (VarGFaceNetBackbone, {}),
    # Facenet: 160x160 input, 128-d L2-normalised output by default
    "facenet_mobilenet": (FacenetBackbone, {"features": "mobilenet"}),
    "facenet_inception_resnetv1": (FacenetBackbone, {"features": "inception_resnetv1"}),
}

# Names insightface users type, mapped to ours.
ALIASES = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
    "mbf": "mobilefacenet",
    "mbf_large": "mobilefacenet_large",
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone` (aliases excluded)."""
    return sorted(BACKBONES)


def create_backbone(name: str, **kwargs):
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones` (or an insightface alias such as ``r50``).
        **kwargs: constructor arguments overriding the registry row, e.g.
            ``embedding_size=256, dropout=0.2, dtype="mixed_float16"``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    cls, preset = BACKBONES[key]
    args = {**preset, "name": key, **kwargs}
    return cls(**args)


# Constructor arguments that do not change the architecture's weights (or that any file
# overrides): ignored when a pretrained model is compared with a registry name.
_NOT_ARCHITECTURE = {
    "name",
    "trainable",
    "dtype",
    "dropout",
    "input_shape",
    "include_preprocessing",
    "l2_normalize",
    "embedding_size",
}


def architecture_differences(name: str, model) -> dict[str, tuple]:
    """How ``model`` (a built backbone) differs from the registry row ``name``:
    ``{argument: (registry value, model value)}``, ``{"class": ...}`` for another class; empty
    when the model is that architecture (embedding size, input size and dropout aside)."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    cls, preset = BACKBONES[key]
    if type(model) is not cls:
        return {"class": (cls.__name__, type(model).__name__)}
    defaults = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    expected = {**defaults, **preset}
    config = model.get_config()
    out = {}
    for k, v in expected.items():
        if k in _NOT_ARCHITECTURE or k not in config:
            continue
        got = config[k]
        if isinstance(v, (list, tuple)):
            v, got = tuple(v), tuple(got)
        if v != got:
            out[k] = (v, got)
    return out
