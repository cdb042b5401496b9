"""Template-based 1:1 verification in the IJB-B / IJB-C style (insightface's ``eval_ijbc.py``).

Protocol, as insightface computes it by default (its modes F2, N1, D1):

1. Per image: the embedding of the image plus that of its horizontal flip (raw, not
   normalised; insightface's "norm score" mode keeps the norm as a quality weight), times the
   image's face score when face scores are given (detector-score mode).
2. Per media (a photo or the frames of one video) inside a template: the mean of its images'
   features (a single image is kept as is).
3. Per template: the *sum* of its media features, then L2-normalised. A video therefore
   counts as much as one photo, however many frames it has.
4. Per template pair ``(t1, t2, label)``: the cosine similarity of the two template features.
5. ROC over all pairs (``sklearn.metrics.roc_curve``, default options); TAR at FAR 1e-6 ...
   1e-1 with insightface's rule: the ROC point whose FAR is nearest the target (highest TAR
   among equally near points). It is a nearest-point read-out, not an interpolation.

Meta files (insightface's ``IJB_release/IJBC/meta``), whitespace-separated, no header:

* ``<name>_face_tid_mid.txt``: ``image_name template_id media_id`` per image;
* ``<name>_template_pair_label.txt``: ``template_id_1 template_id_2 label`` (1 = same);
* ``<name>_name_5pts_score.txt`` (optional): ``image_name x1 y1 ... x5 y5 face_score``; only
  the face score (last column) is used.

The images read by :func:`evaluate_ijb_folder` must already be aligned crops of the model's
input size (insightface aligns the ``loose_crop`` images with the 5 points first; that
alignment is not done here).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from facerec_tf.errors import DataFormatError
from facerec_tf.evaluation.verification import (
    RocCurve,
    l2_normalize,
    roc_summary,
)

__all__ = [
    "IJB_FARS",
    "IJBMeta",
    "IJBResult",
    "embed_files",
    "evaluate_ijb",
    "evaluate_ijb_folder",
    "image_features",
    "load_ijb_meta",
    "read_face_scores",
    "read_template_media_list",
    "read_template_pair_list",
    "template_features",
    "template_pair_scores",
]

#: FAR targets of insightface's IJB table.
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

PathLike = str | os.PathLike


@dataclasses.dataclass
class IJBResult:
    """Template verification figures of one IJB-style target."""

    name: str
    tar_at_far: dict[str, float]  # "1e-4" -> TAR
    auc: float
    eer: float
    num_pairs: int
    num_same: int
    num_diff: int
    num_templates: int
    num_images: int
    roc: RocCurve | None = dataclasses.field(default=None, repr=False, compare=False)
    scores: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def lines(self, step: int = 0) -> list[str]:
        """``[ijbc][0]TAR@FAR: 1e-6=... 1e-5=...`` plus AUC/EER and the counts."""
        head = f"[{self.name}][{step}]"
        cells = []
        for key, tar in self.tar_at_far.items():
            floor = float(key) * self.num_diff < 1
            cells.append(f"{key}={tar:1.5f}{'*' if floor else ''}")
        out = [
            f"{head}Templates: {self.num_templates}  Pairs: {self.num_pairs} "
            f"({self.num_same} same, {self.num_diff} different)  Images: {self.num_images}",
            f"{head}TAR@FAR: {' '.join(cells)}",
            f"{head}AUC: {self.auc:1.5f}  EER: {self.eer:1.5f}",
        ]
        if any(c.endswith("*") for c in cells):
            out.append(
                f"{head}  * FAR below 1/{self.num_diff} different pairs: TAR at the nearest "
                "measurable FAR"
            )
        return out

    def to_dict(self) -> dict:
        """Every field except the ROC and score arrays (JSON-serialisable)."""
        skip = {"roc", "scores"}
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        out["tar_at_far"] = dict(self.tar_at_far)
        return out


@dataclasses.dataclass(frozen=True)
class IJBMeta:
    """The lists of one IJB-style target."""

    name: str
    image_names: list[str]
    templates: np.ndarray  # [num_images] int64
    medias: np.ndarray  # [num_images] int64
    pair_t1: np.ndarray  # [num_pairs] int64
    pair_t2: np.ndarray
    labels: np.ndarray  # [num_pairs] bool
    face_scores: np.ndarray | None  # [num_images] float64, or None


# ----------------------------------------------------------------------------------------------
# Meta files


def _read_table(path: str, min_cols: int, what: str) -> list[tuple[int, list[str]]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read the {what}: {e}", path=path) from None
    rows = []
    for n, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < min_cols:
            raise DataFormatError(
                f"{len(tokens)} fields: {line[:80]!r}",
                path=path,
                key=f"line {n}",
                expected=f"at least {min_cols} whitespace-separated fields",
            )
        rows.append((n, tokens))
    if not rows:
        raise DataFormatError(f"the {what} is empty", path=path, expected="at least one line")
    return rows


def _int(token: str, path: str, lineno: int, column: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataFormatError(
            f"{column} {token!r} is not an integer", path=path, key=f"line {lineno}"
        ) from None


def read_template_media_list(path: PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``*_face_tid_mid.txt``: ``(image_names, template_ids, media_ids)``."""
    path = os.fspath(path)
    rows = _read_table(path, 3, "template/media list")
    names = [t[0] for _, t in rows]
    templates = np.array([_int(t[1], path, n, "template id") for n, t in rows], np.int64)
    medias = np.array([_int(t[2], path, n, "media id") for n, t in rows], np.int64)
    return names, templates, medias


def read_template_pair_list(path: PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``*_template_pair_label.txt``: ``(t1, t2, labels)`` (labels as bool)."""
    path = os.fspath(path)
    rows = _read_table(path, 3, "template pair list")
    t1 = np.array([_int(t[0], path, n, "template id") for n, t in rows], np.int64)
    t2 = np.array([_int(t[1], path, n, "template id") for n, t in rows], np.int64)
    labels = []
    for n, t in rows:
        label = _int(t[2], path, n, "label")
        if label not in (0, 1):
            raise DataFormatError(f"label {label}", path=path, key=f"line {n}", expected="0 or 1")
        labels.append(bool(label))
    return t1, t2, np.array(labels, bool)


def read_face_scores(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Read ``*_name_5pts_score.txt``: ``(image_names, face_scores)`` (last column)."""
    path = os.fspath(path)
    rows = _read_table(path, 2, "face score list")
    scores = []
    for n, t in rows:
        try:
            scores.append(float(t[-1]))
        except ValueError:
            raise DataFormatError(
                f"face score {t[-1]!r} is not a number", path=path, key=f"line {n}"
            ) from None
    return [t[0] for _, t in rows], np.array(scores, np.float64)


def load_ijb_meta(meta_dir: PathLike, name: str, use_face_scores: bool = True) -> IJBMeta:
    """Read ``<meta_dir>/<name>_face_tid_mid.txt``, ``<name>_template_pair_label.txt`` and,
    when present and ``use_face_scores``, ``<name>_name_5pts_score.txt`` (``name`` is
    lower-cased, as insightface's ``IJBC`` -> ``ijbc``).

    Raises:
        DataFormatError: a missing or malformed file, a face score list that does not list
            the same images in the same order, or a pair naming an unknown template.
    """
    meta_dir = os.fspath(meta_dir)
    stem = name.lower()
    tid_mid = os.path.join(meta_dir, f"{stem}_face_tid_mid.txt")
    pair_file = os.path.join(meta_dir, f"{stem}_template_pair_label.txt")
    for p in (tid_mid, pair_file):
        if not os.path.isfile(p):
            raise DataFormatError(
                "file not found", path=p, expected=f"the IJB meta files of {stem!r} in {meta_dir}"
            )
    names, templates, medias = read_template_media_list(tid_mid)
    t1, t2, labels = read_template_pair_list(pair_file)
    known = set(templates.tolist())
    for i, (a, b) in enumerate(zip(t1.tolist(), t2.tolist())):
        for t in (a, b):
            if t not in known:
                raise DataFormatError(
                    f"template {t} has no image in {tid_mid}",
                    path=pair_file,
                    key=f"pair {i} (line {i + 1})",
                )
    scores = None
    score_file = os.path.join(meta_dir, f"{stem}_name_5pts_score.txt")
    if use_face_scores and os.path.isfile(score_file):
        score_names, scores = read_face_scores(score_file)
        if score_names != names:
            first = next(
                (i for i, (a, b) in enumerate(zip(score_names, names)) if a != b),
                min(len(score_names), len(names)),
            )
            raise DataFormatError(
                f"lists {len(score_names)} images and differs from {tid_mid} ({len(names)} "
                f"images) first at line {first + 1}",
                path=score_file,
                expected="the same images in the same order as the template/media list",
            )
    return IJBMeta(stem, names, templates, medias, t1, t2, labels, scores)


# ----------------------------------------------------------------------------------------------
# Features and scores


def image_features(
    embeddings, flipped_embeddings=None, face_scores=None, normalize: bool = False
) -> np.ndarray:
    """Per-image features: embedding (+ flipped embedding), optionally L2-normalised
    (insightface's N0 mode; default N1 keeps the norm), times the face score if given."""
    feats = np.asarray(embeddings, np.float64)
    if flipped_embeddings is not None:
        feats = feats + np.asarray(flipped_embeddings, np.float64)
    if normalize:
        feats = l2_normalize(feats)
    if face_scores is not None:
        feats = feats * np.asarray(face_scores, np.float64)[:, None]
    return feats


def template_features(features, templates, medias) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate image features into L2-normalised template features.

    Within each template, images of one media are averaged; the template is the sum of its
    media features, then L2-normalised.

    Returns:
        ``(template_feats [T, D], template_ids [T])``, ids sorted ascending.
    """
    features = np.asarray(features, np.float64)
    templates = np.asarray(templates)
    medias = np.asarray(medias)
    if not len(features) == len(templates) == len(medias):
        raise ValueError(
            f"{len(features)} features, {len(templates)} template ids, {len(medias)} media ids"
        )
    # Mean per (template, media) group, then sum per template: one pass with np.add.at.
    groups, group_index = np.unique(
        np.stack([templates, medias], axis=1), axis=0, return_inverse=True
    )
    group_index = group_index.reshape(-1)
    sums = np.zeros((len(groups), features.shape[1]))
    np.add.at(sums, group_index, features)
    media_feats = sums / np.bincount(group_index, minlength=len(groups))[:, None]
    template_ids, template_index = np.unique(groups[:, 0], return_inverse=True)
    template_feats = np.zeros((len(template_ids), features.shape[1]))
    np.add.at(template_feats, template_index.reshape(-1), media_feats)
    return l2_normalize(template_feats), template_ids


def template_pair_scores(template_feats, template_ids, t1, t2) -> np.ndarray:
    """Cosine similarity of each template pair (features already L2-normalised).

    Raises:
        DataFormatError: a pair names a template id that has no feature.
    """
    template_ids = np.asarray(template_ids)
    t1, t2 = np.asarray(t1), np.asarray(t2)
    rows = []
    for side in (t1, t2):
        idx = np.searchsorted(template_ids, side)
        idx = np.minimum(idx, len(template_ids) - 1)
        bad = template_ids[idx] != side
        if np.any(bad):
            i = int(np.argmax(bad))
            raise DataFormatError(
                f"template {int(side[i])} has no image",
                key=f"pair {i}",
                expected="templates listed in the template/media list",
            )
        rows.append(idx)
    feats = np.asarray(template_feats, np.float64)
    return np.einsum("ij,ij->i", feats[rows[0]], feats[rows[1]])


def evaluate_ijb(
    name: str,
    embeddings,
    templates,
    medias,
    t1,
    t2,
    labels,
    flipped_embeddings=None,
    face_scores=None,
    normalize_images: bool = False,
    fars: Sequence[float] = IJB_FARS,
) -> IJBResult:
    """IJB-style template verification from per-image embeddings.

    Args:
        name: target name for reports.
        embeddings: ``[num_images, D]`` raw embeddings, in the order of ``templates``.
        templates, medias: ``[num_images]`` template and media id of each image.
        t1, t2, labels: the template pairs and whether each is one person.
        flipped_embeddings: embeddings of the mirrored images, summed in (flip test).
        face_scores: ``[num_images]`` weights (detector face scores), or None.
        normalize_images: L2-normalise image features before aggregation (insightface N0).
        fars: TAR@FAR targets.
    """
    feats = image_features(embeddings, flipped_embeddings, face_scores, normalize_images)
    template_feats, template_ids = template_features(feats, templates, medias)
    scores = template_pair_scores(template_feats, template_ids, t1, t2)
    labels = np.asarray(labels, bool)
    roc, auc, eer, tars = roc_summary(scores, labels, fars)
    return IJBResult(
        name=name,
        tar_at_far=tars,
        auc=auc,
        eer=eer,
        num_pairs=len(labels),
        num_same=int(np.sum(labels)),
        num_diff=int(np.sum(~labels)),
        num_templates=len(template_ids),
        num_images=len(feats),
        roc=roc,
        scores=scores,
    )


def embed_files(
    embed_fn: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[str],
    image_size: tuple[int, int] | None,
    batch_size: int = 128,
    flip: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Embed image files batch by batch (never all images in memory at once): returns
    ``(embeddings, flipped embeddings or None)``."""
    from facerec_tf.evaluation.models import load_images

    outs, flips = [], []
    starts = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="embedding", unit="batch", leave=False)
    for start in starts:
        batch = load_images(paths[start : start + batch_size], image_size)
        outs.append(np.asarray(embed_fn(batch)))
        if flip:
            flips.append(np.asarray(embed_fn(np.ascontiguousarray(batch[:, :, ::-1]))))
    return np.concatenate(outs), (np.concatenate(flips) if flip else None)


def evaluate_ijb_folder(
    model,
    meta_dir: PathLike,
    image_dir: PathLike,
    name: str = "ijbc",
    batch_size: int = 128,
    flip: bool = True,
    use_face_scores: bool = True,
    normalize_images: bool = False,
    progress: bool = False,
) -> IJBResult:
    """Run ``model`` (an :class:`~facerec_tf.evaluation.models.EmbeddingModel`, or any
    callable on ``[N, H, W, 3]`` with an ``input_size`` attribute) over the images listed
    in ``<meta_dir>/<name>_face_tid_mid.txt`` (files ``image_dir/<image_name>``, aligned
    crops) and evaluate the template pairs.

    Raises:
        DataFormatError: malformed meta files, or listed images that do not exist (checked
            before anything is embedded).
        ImageError: an image that cannot be decoded or has the wrong size (checked as the
            images are read, batch by batch).
    """
    meta = load_ijb_meta(meta_dir, name, use_face_scores=use_face_scores)
    image_dir = os.fspath(image_dir)
    paths = [os.path.join(image_dir, n) for n in meta.image_names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataFormatError(
            f"image {missing[0]} does not exist"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            path=os.path.join(os.fspath(meta_dir), f"{meta.name}_face_tid_mid.txt"),
            expected=f"every listed image in {image_dir}",
        )
    emb, flipped = embed_files(
        model, paths, getattr(model, "input_size", None), batch_size, flip, progress
    )
    return evaluate_ijb(
        meta.name,
        emb,
        meta.templates,
        meta.medias,
        meta.pair_t1,
        meta.pair_t2,
        meta.labels,
        flipped_embeddings=flipped,
        face_scores=meta.face_scores,
        normalize_images=normalize_images,
    )
