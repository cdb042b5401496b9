"""Export of the embedding model (SavedModel for TF Serving, ``.keras``)."""

from __future__ import annotations

import os
import shutil


def export_saved_model(backbone, path: str) -> str:
    """Write ``backbone`` as a SavedModel whose ``serving_default`` takes float32
    ``[N, H, W, 3]`` RGB in [0, 255] (normalisation inside) and returns the embedding.

    Written to a temporary folder and renamed, so ``path`` is never left half-written.
    """
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.export(tmp, format="tf_saved_model", verbose=False)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
