"""Loading a saved or pretrained embedding model for training: the pretrained backbone of a
task (``model.pretrained``), the teacher of a distillation objective (``loss.teacher``)."""

from __future__ import annotations

import os

from facerec_tf.errors import ConfigError, FacerecError


def load_backbone(path: str, *, key: str):
    """A ``.keras`` file, a run folder (``best/``, else ``export/backbone.keras``), an
    arcface_torch ``.pth`` or an insightface ``.onnx`` (imported), through
    :func:`facerec_tf.export.load_backbone`; errors are config errors naming ``key``."""
    from facerec_tf.export import load_backbone as load

    try:
        return load(path, from_insightface_onnx=os.fspath(path).endswith(".onnx"))
    except (FileNotFoundError, FacerecError) as e:
        raise ConfigError(str(e), key=key) from e
    except Exception as e:  # keras raises many types for a broken .keras file
        raise ConfigError(f"cannot load {path}: {e}", key=key) from e
