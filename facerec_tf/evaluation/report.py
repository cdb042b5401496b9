"""Evaluation reports: a JSON file keyed by target name and one ROC curve PNG per target.

JSON layout (NaN written as ``null``)::

    {
      "lfw": {"type": "verification", "accuracy": 0.99817, "accuracy_std": 0.00229,
              "best_threshold": 1.42, "val_at_far_1e-3": 0.99, "val_std": 0.004,
              "far": 0.0009, "auc": 0.9996, "eer": 0.0023,
              "tar_at_far": {"1e-1": 1.0, "1e-2": 0.998, "1e-3": 0.996, "1e-4": 0.99},
              "num_pairs": 6000, "num_same": 3000, "num_diff": 3000, "xnorm": 22.5,
              "flip": true},
      "ijbc": {"type": "ijb", "tar_at_far": {"1e-6": ..., ...}, "auc": ..., "eer": ...,
               "num_pairs": ..., "num_templates": ..., "num_images": ...},
      "_meta": {...}                      # optional: model, options (the only "_" key)
    }

Plots use matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), so writing a plot never touches pyplot or the global backend.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np

from facerec_tf.evaluation.ijb import IJBResult
from facerec_tf.evaluation.verification import VerificationResult

__all__ = ["build_report", "plot_roc", "plot_rocs", "report_entry", "write_report"]

PathLike = str | os.PathLike
Result = VerificationResult | IJBResult


def _clean(value):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def report_entry(result: Result) -> dict:
    """The JSON entry of one target."""
    if isinstance(result, VerificationResult):
        return _clean(
            {
                "type": "verification",
                "accuracy": result.accuracy,
                "accuracy_std": result.accuracy_std,
                "best_threshold": result.best_threshold,
                "val_at_far_1e-3": result.val_at_far_1e3,
                "val_std": result.val_std,
                "far": result.far,
                "auc": result.auc,
                "eer": result.eer,
                "tar_at_far": result.tar_at_far,
                "num_pairs": result.num_pairs,
                "num_same": result.num_same,
                "num_diff": result.num_diff,
                "xnorm": result.xnorm,
                "flip": result.flip,
            }
        )
    if isinstance(result, IJBResult):
        return _clean({"type": "ijb", **result.to_dict()})
    raise TypeError(f"not an evaluation result: {type(result).__name__}")


def build_report(results: Iterable[Result], meta: Mapping | None = None) -> dict:
    """``{target name: entry}`` (plus ``"_meta"`` when given).

    Raises:
        ValueError: two targets share a name (two ``lfw.bin`` from different folders).
    """
    report: dict = {}
    for r in results:
        if r.name in report or r.name == "_meta":
            raise ValueError(f"two evaluation targets are named {r.name!r}")
        report[r.name] = report_entry(r)
    if meta is not None:
        report["_meta"] = _clean(dict(meta))
    return report


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_report(path: PathLike, results: Iterable[Result], meta: Mapping | None = None) -> dict:
    """Write the JSON report atomically (temp file + rename) and return it."""
    report = build_report(results, meta)
    data = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8")
    _atomic_write(os.fspath(path), lambda f: f.write(data))
    return report


def _plot_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "target"


def plot_roc(result: Result, path: PathLike) -> str | None:
    """Write the ROC curve of one target as a PNG (log-scale FAR axis, TAR@FAR targets and
    the EER point marked). Returns the path, or None when the target has no ROC (one class
    of pairs only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roc = result.roc
    if roc is None:
        return None
    fars = [float(k) for k in result.tar_at_far]
    positive = roc.fpr[roc.fpr > 0]
    lowest = min([*fars, float(positive.min()) if positive.size else 1.0])
    xmin = 10 ** math.floor(math.log10(lowest))

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # FAR = 0 cannot be drawn on a log axis: draw those points at the left edge.
    ax.plot(np.maximum(roc.fpr, xmin), roc.tpr, lw=1.5, label=f"{result.name} ROC")
    for far, tar in zip(fars, result.tar_at_far.values()):
        if tar is not None and math.isfinite(tar):
            ax.plot([far], [tar], "o", ms=4, color="C1")
            ax.annotate(
                f"{tar:.3f}", (far, tar), textcoords="offset points", xytext=(3, -10), fontsize=7
            )
    if math.isfinite(result.eer) and result.eer > 0:
        ax.plot(
            [result.eer], [1 - result.eer], "s", ms=4, color="C2", label=f"EER {result.eer:.4f}"
        )
    ax.set_xscale("log")
    ax.set_xlim(xmin, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.grid(True, which="both", linestyle="--", linewidth=0.5)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(f"{result.name}: AUC {result.auc:.4f}, {result.num_pairs} pairs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    _atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def plot_rocs(results: Iterable[Result], plot_dir: PathLike) -> list[str]:
    """:func:`plot_roc` for every target into ``plot_dir/<name>_roc.png``."""
    written = []
    for r in results:
        out = plot_roc(r, os.path.join(os.fspath(plot_dir), f"{_plot_name(r.name)}_roc.png"))
        if out is not None:
            written.append(out)
    return written
