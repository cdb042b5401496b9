"""Loading a saved embedding model (``.keras`` file or run folder) for training: the
pretrained backbone of a task, the teacher of a distillation objective."""

from __future__ import annotations

import os

from facerec_tf.errors import ConfigError


def load_backbone(path: str, *, key: str):
    """A saved embedding model: a ``.keras`` file, or a run folder (its
    ``export/backbone.keras``, else ``best/backbone.keras``)."""
    import keras

    import facerec_tf.models  # noqa: F401  (registers the backbone classes)

    candidates = [path]
    if os.path.isdir(path):
        candidates = [
            os.path.join(path, "export", "backbone.keras"),
            os.path.join(path, "best", "backbone.keras"),
            os.path.join(path, "backbone.keras"),
        ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            try:
                return keras.models.load_model(candidate, compile=False)
            except Exception as e:  # keras raises many types here
                raise ConfigError(f"cannot load {candidate}: {e}", key=key) from e
    raise ConfigError(
        f"no model at {path} (expected a .keras file or a run folder with export/backbone.keras)",
        key=key,
    )
