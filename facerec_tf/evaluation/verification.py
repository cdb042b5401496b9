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
so the numbers are identical (``tests/test_evaluate.py`` checks this against a literal loop
reimplementation).

On top of insightface's numbers, whole-set ROC figures are computed from the same distances
(one ROC over all pairs, no folds; score = ``-dist``, which orders pairs exactly as the cosine
similarity does since ``dist = 2 - 2 cos`` for unit vectors):

* AUC: area under the ROC (``sklearn.metrics.roc_curve`` + trapezoids).
* EER: the FAR at which FAR = FRR (= 1 - TAR), on the ROC's linear interpolation.
* TAR@FAR: :func:`tar_at_far`, insightface's IJB rule (the ROC point whose FAR is nearest the
  target, the highest TAR among equally near points; not an interpolation). With ``n``
  different-person pairs a FAR below ``1 / n`` cannot be measured; the value is then the TAR
  at the nearest ROC point (usually FAR = 0).

XNorm is insightface's: the mean L2 norm of the raw embeddings of the images *and* of their
flips. For a model whose output is already L2-normalised (our SavedModel and ONNX exports)
XNorm is 1 and the flip "sum then normalise" adds two unit vectors before normalising; for a
raw-embedding model (``.keras``, insightface ONNX) it adds the raw embeddings as insightface
does.

LFW-style ``pairs.txt`` lists (:func:`read_pairs_txt`) are read here too, so that users can
build a verification set from their own image folders.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from facerec_tf.errors import DataFormatError

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)

#: FAR targets of the whole-set TAR@FAR figures of a ``.bin`` target.
VERIFICATION_FARS = (1e-1, 1e-2, 1e-3, 1e-4)


def far_key(far: float) -> str:
    """The key of a FAR target in ``tar_at_far`` dicts and reports: ``1e-3`` -> ``"1e-3"``."""
    exponent = math.log10(far)
    if abs(exponent - round(exponent)) < 1e-9:
        return f"1e{round(exponent)}"
    return f"{far:g}"


@dataclasses.dataclass(frozen=True)
class RocCurve:
    """A ROC curve as ``sklearn.metrics.roc_curve`` returns it (default
    ``drop_intermediate=True``): FAR (false positive rate), TAR (true positive rate) and the
    score thresholds, FAR non-decreasing. Not part of ``to_dict()``: plot it or sample it."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_from_scores(scores, labels) -> RocCurve | None:
    """The ROC of similarity ``scores`` (higher = more alike) against boolean ``labels``.

    Returns None when ``labels`` has only one class (no ROC exists).
    """
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return None
    fpr, tpr, thresholds = roc_curve(labels, np.asarray(scores, np.float64))
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds)


def roc_auc(roc: RocCurve | None) -> float:
    """Area under the ROC (trapezoids, as ``sklearn.metrics.auc``); NaN without a ROC."""
    if roc is None:
        return float("nan")
    from sklearn.metrics import auc

    return float(auc(roc.fpr, roc.tpr))


def equal_error_rate(roc: RocCurve | None) -> float:
    """The error rate where FAR equals FRR (= 1 - TAR), on the linear interpolation of the ROC
    points (what ``brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1)`` finds); NaN without
    a ROC."""
    if roc is None:
        return float("nan")
    fpr, tpr = roc.fpr, roc.tpr
    gap = (1.0 - tpr) - fpr  # FRR - FAR: non-increasing along the curve, from 1 to -1
    j = int(np.argmax(gap <= 0))  # first point at or past the crossing
    if j == 0:
        return float(fpr[0])
    i = j - 1
    t = gap[i] / (gap[i] - gap[j])
    return float(fpr[i] + t * (fpr[j] - fpr[i]))


def tar_at_far(roc: RocCurve | None, far: float) -> float:
    """TAR at a FAR target with insightface's IJB rule: the ROC point whose FAR is nearest
    ``far``; among equally near points the one with the highest TAR. NaN without a ROC.

    (insightface flips the ROC arrays and takes ``min(zip(abs(fpr - far), index))``: the
    first minimum in the flipped order, i.e. the last one along the curve.)
    """
    if roc is None:
        return float("nan")
    distance = np.abs(roc.fpr[::-1] - far)
    return float(roc.tpr[::-1][int(np.argmin(distance))])


def roc_summary(
    scores, labels, fars: Sequence[float]
) -> tuple[RocCurve | None, float, float, dict[str, float]]:
    """``(roc, auc, eer, {far_key: tar})`` of similarity ``scores`` against ``labels``."""
    roc = roc_from_scores(scores, labels)
    tars = {far_key(f): tar_at_far(roc, f) for f in fars}
    return roc, roc_auc(roc), equal_error_rate(roc), tars


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
    xnorm: float | None = None  # mean norm of the raw embeddings (images and flips)
    auc: float = float("nan")  # whole-set ROC area
    eer: float = float("nan")  # whole-set equal error rate
    tar_at_far: dict[str, float] = dataclasses.field(default_factory=dict)  # "1e-3" -> TAR
    num_same: int | None = None  # same-person pairs
    num_diff: int | None = None  # different-person pairs
    flip: bool | None = None  # whether flip test-time augmentation was used
    roc: RocCurve | None = dataclasses.field(default=None, repr=False, compare=False)

    def line(self) -> str:
        """The line insightface prints, e.g. ``[lfw] Accuracy-Flip: 0.99817+-0.00229``."""
        return f"[{self.name}] Accuracy-Flip: {self.accuracy:1.5f}+-{self.accuracy_std:1.5f}"

    def lines(self, step: int = 0) -> list[str]:
        """Every figure as insightface's callback prints it (``[lfw][0]XNorm: 22.512346``,
        ``[lfw][0]Accuracy-Flip: 0.99817+-0.00229``), plus VAL, AUC, EER and TAR@FAR lines.

        A TAR whose FAR target is below ``1 / num_diff`` (not measurable on this set) is
        marked with ``*``.
        """
        head = f"[{self.name}][{step}]"
        acc = "Accuracy-Flip" if self.flip in (None, True) else "Accuracy"
        out = []
        if self.xnorm is not None:
            out.append(f"{head}XNorm: {self.xnorm:f}")
        out.append(f"{head}{acc}: {self.accuracy:1.5f}+-{self.accuracy_std:1.5f}")
        out.append(f"{head}Best-Threshold: {self.best_threshold:1.5f}")
        out.append(
            f"{head}VAL@FAR=1e-3: {self.val_at_far_1e3:1.5f}+-{self.val_std:1.5f} "
            f"(FAR {self.far:1.5f})"
        )
        out.append(f"{head}AUC: {self.auc:1.5f}  EER: {self.eer:1.5f}")
        if self.tar_at_far:
            cells = []
            for key, tar in self.tar_at_far.items():
                floor = self.num_diff is not None and float(key) * self.num_diff < 1
                cells.append(f"{key}={tar:1.5f}{'*' if floor else ''}")
            out.append(f"{head}TAR@FAR: {' '.join(cells)}")
            if any(c.endswith("*") for c in cells):
                out.append(
                    f"{head}  * FAR below 1/{self.num_diff} different pairs: TAR at the "
                    "nearest measurable FAR"
                )
        return out

    def to_dict(self) -> dict:
        """Every field except the ROC arrays (JSON-serialisable)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "roc"}
        out["tar_at_far"] = dict(self.tar_at_far)
        return out


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


def fold_val_far(dist, issame, train, test, thresholds, far_target, fallback):
    """One fold of insightface's VAL@FAR: the threshold at which the *train* pairs reach
    ``far_target`` (``fallback`` when no threshold does), applied to the *test* pairs;
    returns ``(val, far)`` on the test pairs."""
    _, far_train = _val_far(dist[train], issame[train], thresholds)
    if np.max(far_train) >= far_target:
        threshold = slinear_interp(far_train, thresholds, far_target)
    else:
        threshold = fallback
    v, fa = _val_far(dist[test], issame[test], np.array([threshold]))
    return v[0], fa[0]


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
        val[i], far[i] = fold_val_far(
            dist, issame, train, test, VAL_THRESHOLDS, far_target, fallback=0.0
        )
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
    """Row-wise L2 normalisation in float64 with ``sklearn.preprocessing.normalize`` itself
    (as insightface), so that the distances are bit-identical; zero rows stay zero."""
    from sklearn.preprocessing import normalize

    return normalize(np.array(x, np.float64))


def evaluate_embeddings(
    name, embeddings, flipped_embeddings, issame, num_folds=10, fars=VERIFICATION_FARS
):
    """Metrics for one target from raw embeddings of the ``2N`` images (pair i = 2i, 2i+1).

    ``flipped_embeddings`` (embeddings of the mirrored images) may be None for no-flip.
    XNorm is the mean norm over the embeddings and, with flip, the flipped embeddings too
    (insightface averages over both lists). ``fars`` are the whole-set TAR@FAR targets.
    """
    embeddings = np.asarray(embeddings, np.float64)
    issame = np.asarray(issame, bool)
    norms = np.linalg.norm(embeddings, axis=1)
    if flipped_embeddings is not None:
        flipped_embeddings = np.asarray(flipped_embeddings, np.float64)
        norms = np.concatenate([norms, np.linalg.norm(flipped_embeddings, axis=1)])
    xnorm = float(np.mean(norms))
    total = embeddings if flipped_embeddings is None else embeddings + flipped_embeddings
    total = l2_normalize(total)
    m = verification_metrics(total[0::2], total[1::2], issame, num_folds=num_folds)
    return result_from_metrics(
        name, m, -m["dist"], issame, xnorm, fars, flip=flipped_embeddings is not None
    )


def result_from_metrics(name, m, scores, issame, xnorm, fars, *, flip) -> VerificationResult:
    """A :class:`VerificationResult` from 10-fold metrics ``m`` (accuracy per fold, best
    thresholds, VAL/FAR) and per-pair similarity ``scores`` (higher = same) for the ROC."""
    issame = np.asarray(issame, bool)
    roc, auc, eer, tars = roc_summary(scores, issame, fars)
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
        auc=auc,
        eer=eer,
        tar_at_far=tars,
        num_same=int(np.sum(issame)),
        num_diff=int(np.sum(~issame)),
        flip=flip,
        roc=roc,
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


# ----------------------------------------------------------------------------------------------
# LFW-style pairs.txt lists


def _pair_index(token: str, path: str, lineno: int) -> int:
    try:
        index = int(token)
    except ValueError:
        raise DataFormatError(
            f"image number {token!r} is not an integer",
            path=path,
            key=f"line {lineno}",
            expected="'name i j' or 'name1 i name2 j' with integer image numbers",
        ) from None
    if index < 0:
        raise DataFormatError(f"image number {index} is negative", path=path, key=f"line {lineno}")
    return index


def read_pairs_txt(
    pairs_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    pattern: str = "{name}/{name}_{index:04d}.jpg",
) -> list[tuple[str, str, bool]]:
    """Read an LFW ``pairs.txt`` into ``(image_a, image_b, issame)`` file pairs.

    Format: an optional header line (``"10 300"``: folds and pairs per fold and kind, or a
    single count), then one pair per line: ``name i j`` (same person, images ``i`` and
    ``j``) or ``name1 i name2 j`` (different people). Tokens are separated by whitespace;
    blank lines and lines starting with ``#`` are ignored. Image ``i`` of ``name`` is
    ``images_dir / pattern.format(name=name, index=i)`` (LFW: ``name/name_0001.jpg``).

    Raises:
        DataFormatError: unreadable file, a malformed line (naming its number), a header
            that disagrees with the number of pairs, no pairs at all, or image files that do
            not exist (naming the first one and the line that uses it).
    """
    pairs_path = os.fspath(pairs_path)
    images_dir = os.fspath(images_dir)
    try:
        with open(pairs_path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read the pairs list: {e}", path=pairs_path) from None
    rows = [
        (n, line.split())
        for n, line in enumerate(raw, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    expected_pairs = None
    if rows and len(rows[0][1]) in (1, 2) and all(t.isdigit() for t in rows[0][1]):
        counts = [int(t) for t in rows[0][1]]
        expected_pairs = counts[0] if len(counts) == 1 else 2 * counts[0] * counts[1]
        rows = rows[1:]
    pairs = []
    missing: list[tuple[str, int]] = []
    for lineno, tokens in rows:
        if len(tokens) == 3:
            name_a, name_b = tokens[0], tokens[0]
            index_a, index_b = tokens[1], tokens[2]
            same = True
        elif len(tokens) == 4:
            name_a, index_a, name_b, index_b = tokens
            same = False
        else:
            raise DataFormatError(
                f"{len(tokens)} fields: {' '.join(tokens)[:80]!r}",
                path=pairs_path,
                key=f"line {lineno}",
                expected="'name i j' (same person) or 'name1 i name2 j' (different people)",
            )
        files = []
        for name, token in ((name_a, index_a), (name_b, index_b)):
            index = _pair_index(token, pairs_path, lineno)
            file = os.path.join(images_dir, pattern.format(name=name, index=index))
            if not os.path.isfile(file):
                missing.append((file, lineno))
            files.append(file)
        pairs.append((files[0], files[1], same))
    if not pairs:
        raise DataFormatError(
            "the pairs list is empty", path=pairs_path, expected="at least one pair line"
        )
    if expected_pairs is not None and expected_pairs != len(pairs):
        raise DataFormatError(
            f"the header line announces {expected_pairs} pairs but {len(pairs)} follow",
            path=pairs_path,
            key="line 1",
        )
    if missing:
        file, lineno = missing[0]
        more = f" (and {len(missing) - 1} more missing images)" if len(missing) > 1 else ""
        raise DataFormatError(
            f"image {file} does not exist{more}",
            path=pairs_path,
            key=f"line {lineno}",
            expected=f"images at {os.path.join(images_dir, pattern)}",
        )
    return pairs
