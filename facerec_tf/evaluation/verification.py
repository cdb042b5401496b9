"""The insightface verification protocol on ``.bin`` pair sets, computed exactly as
``recognition/arcface_torch/eval/verification.py`` does.

* Embeddings of each image and of its horizontal flip are summed, then L2-normalised
  (``flip=False`` uses the image alone, normalised).
* Distance: squared L2 between the two normalised embeddings of a pair (0 to 4).
* Accuracy: 10-fold ``KFold`` without shuffle; thresholds ``arange(0, 4, 0.01)``; on each
  fold the threshold with the best *train-fold* accuracy (first one on ties) is applied to
  the test fold; report mean and std of the 10 test accuracies.
* VAL@FAR=1e-3: thresholds ``arange(0, 4, 0.001)``; on each train fold the threshold giving
  FAR = 1e-3 is found by ``scipy.interpolate.interp1d(far, thresholds, kind="slinear")``
  (0 when the target FAR is never reached); VAL and FAR are measured on the test fold.
  Recent SciPy refuses that call because ``far`` repeats values (many thresholds share a
  FAR); :func:`slinear_interp` reproduces what older SciPy computed (stable sort by FAR, the
  last point at or below the target and the first point above it).

The per-threshold loops of insightface are vectorised here; the comparisons are the same,
so the numbers are identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


@dataclasses.dataclass
class VerificationResult:
    """Metrics of one verification target (all fractions in [0, 1])."""

    name: str
    accuracy: float
    accuracy_std: float
    best_threshold: float
    val_at_far_1e3: float
    val_std: float
    far: float
    num_pairs: int
    xnorm: float | None = None  # mean norm of the raw (un-normalised) embeddings

    def line(self) -> str:
        """The line insightface prints, e.g. ``[lfw] Accuracy-Flip: 0.99817+-0.00229``."""
        return f"[{self.name}] Accuracy-Flip: {self.accuracy:1.5f}+-{self.accuracy_std:1.5f}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _confusion(dist, issame, thresholds):
    """tp, fp, tn, fn for every threshold at once: arrays ``[len(thresholds)]``."""
    predict = dist[None, :] < thresholds[:, None]
    same = issame[None, :]
    tp = np.sum(predict & same, axis=1)
    fp = np.sum(predict & ~same, axis=1)
    tn = np.sum(~predict & ~same, axis=1)
    fn = np.sum(~predict & same, axis=1)
    return tp, fp, tn, fn


def _accuracy(dist, issame, thresholds):
    tp, fp, tn, fn = _confusion(dist, issame, thresholds)
    acc = (tp + tn).astype(np.float64) / dist.size
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
        fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    return tpr, fpr, acc


def _val_far(dist, issame, thresholds):
    tp, fp, _, _ = _confusion(dist, issame, thresholds)
    n_same = np.sum(issame)
    n_diff = np.sum(~issame)
    return tp / float(n_same), fp / float(n_diff)


def slinear_interp(x, y, q):
    """``interp1d(x, y, kind="slinear")(q)`` as SciPy computed it when ``x`` may repeat."""
    order = np.argsort(x, kind="mergesort")
    xs, ys = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    if not xs[0] <= q <= xs[-1]:
        raise ValueError(f"{q} is outside the interpolation range [{xs[0]}, {xs[-1]}]")
    j = int(np.searchsorted(xs, q, side="right"))  # first point strictly above q
    i = j - 1  # last point at or below q
    if j >= len(xs):
        return float(ys[i])
    return float(ys[i] + (ys[j] - ys[i]) * (q - xs[i]) / (xs[j] - xs[i]))


def _folds(n, num_folds):
    from sklearn.model_selection import KFold

    return list(KFold(n_splits=num_folds, shuffle=False).split(np.arange(n)))


def verification_metrics(embeddings1, embeddings2, issame, num_folds=10, far_target=1e-3):
    """insightface's ``evaluate``: returns a dict of tpr, fpr, accuracy (per fold), best
    thresholds (per fold), val, val_std, far, and the distances.

    Args:
        embeddings1, embeddings2: ``[N, D]`` L2-normalised embeddings of the two sides.
        issame: ``[N]`` booleans.
    """
    e1 = np.asarray(embeddings1, np.float64)
    e2 = np.asarray(embeddings2, np.float64)
    issame = np.asarray(issame, bool)
    if e1.shape != e2.shape or e1.shape[0] != issame.shape[0]:
        raise ValueError(f"shape mismatch: {e1.shape}, {e2.shape}, issame {issame.shape}")
    if e1.shape[0] < num_folds:
        raise ValueError(f"{e1.shape[0]} pairs cannot be split into {num_folds} folds")
    dist = np.sum(np.square(e1 - e2), axis=1)
    folds = _folds(len(dist), num_folds)

    tprs = np.zeros((num_folds, len(ACC_THRESHOLDS)))
    fprs = np.zeros((num_folds, len(ACC_THRESHOLDS)))
    accuracy = np.zeros(num_folds)
    best_thresholds = np.zeros(num_folds)
    val = np.zeros(num_folds)
    far = np.zeros(num_folds)
    for i, (train, test) in enumerate(folds):
        _, _, acc_train = _accuracy(dist[train], issame[train], ACC_THRESHOLDS)
        best = int(np.argmax(acc_train))
        best_thresholds[i] = ACC_THRESHOLDS[best]
        tprs[i], fprs[i], _ = _accuracy(dist[test], issame[test], ACC_THRESHOLDS)
        accuracy[i] = _accuracy(dist[test], issame[test], ACC_THRESHOLDS[best : best + 1])[2][0]

        _, far_train = _val_far(dist[train], issame[train], VAL_THRESHOLDS)
        if np.max(far_train) >= far_target:
            threshold = slinear_interp(far_train, VAL_THRESHOLDS, far_target)
        else:
            threshold = 0.0
        v, fa = _val_far(dist[test], issame[test], np.array([threshold]))
        val[i], far[i] = v[0], fa[0]
    return {
        "tpr": tprs.mean(0),
        "fpr": fprs.mean(0),
        "accuracy": accuracy,
        "best_thresholds": best_thresholds,
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "dist": dist,
    }


def l2_normalize(x):
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)  # sklearn.preprocessing.normalize semantics


def evaluate_embeddings(name, embeddings, flipped_embeddings, issame, num_folds=10):
    """Metrics for one target from raw embeddings of the ``2N`` images (pair i = 2i, 2i+1).

    ``flipped_embeddings`` (embeddings of the mirrored images) may be None for no-flip.
    """
    embeddings = np.asarray(embeddings, np.float64)
    xnorm = float(np.mean(np.linalg.norm(embeddings, axis=1)))
    total = (
        embeddings if flipped_embeddings is None else embeddings + np.asarray(flipped_embeddings)
    )
    total = l2_normalize(total)
    m = verification_metrics(total[0::2], total[1::2], issame, num_folds=num_folds)
    return VerificationResult(
        name=name,
        accuracy=float(np.mean(m["accuracy"])),
        accuracy_std=float(np.std(m["accuracy"])),
        best_threshold=float(np.mean(m["best_thresholds"])),
        val_at_far_1e3=m["val"],
        val_std=m["val_std"],
        far=m["far"],
        num_pairs=len(issame),
        xnorm=xnorm,
    )


def embed_pairs(embed_fn, images, batch_size=64, flip=True, progress=False):
    """Run ``embed_fn`` (uint8/float ``[b, H, W, 3]`` -> ``[b, D]``) over images and, when
    ``flip``, over their horizontal mirrors. Returns ``(embeddings, flipped or None)``."""
    images = np.asarray(images)
    outs, flips = [], []
    batches = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="embedding", unit="batch", leave=False)
    for start in batches:
        batch = images[start : start + batch_size]
        outs.append(np.asarray(embed_fn(batch)))
        if flip:
            flips.append(np.asarray(embed_fn(np.ascontiguousarray(batch[:, :, ::-1]))))
    return np.concatenate(outs), (np.concatenate(flips) if flip else None)
