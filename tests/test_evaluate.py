"""Evaluation: insightface parity of the verification protocol, ROC figures, model loading,
IJB-style template verification, reports and the ``evaluate.py`` command line.

The parity tests compare :mod:`facerec_tf.evaluation.verification` with a literal
loop-over-thresholds, loop-over-folds reimplementation of insightface's ``calculate_roc`` /
``calculate_accuracy`` / ``calculate_val`` / ``calculate_val_far`` written below (``ref_*``),
whose ``interp1d(kind="slinear")`` step is reproduced the way SciPy computed it before it
refused repeated x: a degree-1 ``BSpline`` on the stably sorted points with knots
``[x0, x..., xn]`` (SciPy's ``make_interp_spline`` special case for k=1).
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy.interpolate import BSpline, interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from facerec_tf.errors import DataFormatError, FacerecError
from facerec_tf.evaluation import ijb, report, verification
from facerec_tf.evaluation.models import (
    ModelInputError,
    ModelLoadError,
    load_embedding_model,
    load_images,
    resolve_model_path,
)
from facerec_tf.evaluation.verification import (
    ACC_THRESHOLDS,
    evaluate_embeddings,
    read_pairs_txt,
    verification_metrics,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Literal reimplementation of insightface's verification loops (reference for parity)


def ref_accuracy(threshold, dist, issame):
    """tpr, fpr, acc at one threshold (insightface ``calculate_accuracy``)."""
    accept = np.less(dist, threshold)
    tp = np.sum(np.logical_and(accept, issame))
    fp = np.sum(np.logical_and(accept, np.logical_not(issame)))
    tn = np.sum(np.logical_and(np.logical_not(accept), np.logical_not(issame)))
    fn = np.sum(np.logical_and(np.logical_not(accept), issame))
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def ref_roc(thresholds, e1, e2, issame, folds=10):
    """insightface ``calculate_roc`` (pca=0), also returning each fold's best threshold."""
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    tprs = np.zeros((folds, len(thresholds)))
    fprs = np.zeros((folds, len(thresholds)))
    accuracy = np.zeros(folds)
    best = np.zeros(folds)
    splits = KFold(n_splits=folds, shuffle=False).split(np.arange(len(issame)))
    for f, (train, test) in enumerate(splits):
        acc_train = np.zeros(len(thresholds))
        for t, threshold in enumerate(thresholds):
            acc_train[t] = ref_accuracy(threshold, dist[train], issame[train])[2]
        b = np.argmax(acc_train)
        for t, threshold in enumerate(thresholds):
            tprs[f, t], fprs[f, t], _ = ref_accuracy(threshold, dist[test], issame[test])
        accuracy[f] = ref_accuracy(thresholds[b], dist[test], issame[test])[2]
        best[f] = thresholds[b]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best


def ref_val_far(threshold, dist, issame):
    """insightface ``calculate_val_far``."""
    accept = np.less(dist, threshold)
    ta = np.sum(np.logical_and(accept, issame))
    fa = np.sum(np.logical_and(accept, np.logical_not(issame)))
    return float(ta) / float(np.sum(issame)), float(fa) / float(np.sum(np.logical_not(issame)))


def old_scipy_slinear(x, y):
    """``interp1d(x, y, kind="slinear")`` as SciPy < 1.9-ish built it (repeated x allowed)."""
    order = np.argsort(x, kind="mergesort")
    xs, ys = np.asarray(x, float)[order], np.asarray(y, float)[order]
    spline = BSpline(np.r_[xs[0], xs, xs[-1]], ys, 1)

    def f(q):
        assert xs[0] <= q <= xs[-1], "interp1d would raise: out of range"
        return spline(q)

    return f


def ref_val(thresholds, e1, e2, issame, far_target, folds=10):
    """insightface ``calculate_val``: (val_mean, val_std, far_mean)."""
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    val = np.zeros(folds)
    far = np.zeros(folds)
    splits = KFold(n_splits=folds, shuffle=False).split(np.arange(len(issame)))
    for f, (train, test) in enumerate(splits):
        far_train = np.zeros(len(thresholds))
        for t, threshold in enumerate(thresholds):
            _, far_train[t] = ref_val_far(threshold, dist[train], issame[train])
        if np.max(far_train) >= far_target:
            threshold = old_scipy_slinear(far_train, thresholds)(far_target)
        else:
            threshold = 0.0
        val[f], far[f] = ref_val_far(threshold, dist[test], issame[test])
    return np.mean(val), np.std(val), np.mean(far)


def ref_evaluate(embeddings, issame):
    """insightface ``evaluate`` on normalised embeddings (pair i = rows 2i, 2i+1)."""
    issame = np.asarray(issame)
    e1, e2 = embeddings[0::2], embeddings[1::2]
    tpr, fpr, acc, best = ref_roc(np.arange(0, 4, 0.01), e1, e2, issame)
    val, val_std, far = ref_val(np.arange(0, 4, 0.001), e1, e2, issame, 1e-3)
    return {"tpr": tpr, "fpr": fpr, "accuracy": acc, "best": best, "val": val,
            "val_std": val_std, "far": far}  # fmt: skip


def ref_embed_and_evaluate(emb, flipped, issame):
    """insightface ``test()`` after the forward passes: XNorm over both lists, sum, normalise."""
    lists = [emb] if flipped is None else [emb, flipped]
    norms = [np.linalg.norm(e[i]) for e in lists for i in range(e.shape[0])]
    total = lists[0] if flipped is None else lists[0] + lists[1]
    out = ref_evaluate(normalize(total), issame)
    out["xnorm"] = sum(norms) / len(norms)
    return out


def ref_tar_at_far(labels, scores, far):
    """insightface IJB table cell: flipped ROC, ``min(zip(abs(fpr - x), range))``."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(zip(abs(fpr - far), range(len(fpr))))
    return tpr[i]


def assert_parity(result, ref, m=None):
    """Our VerificationResult (and raw metrics dict ``m``) equal the reference exactly."""
    assert result.accuracy == np.mean(ref["accuracy"])
    assert result.accuracy_std == np.std(ref["accuracy"])
    assert result.best_threshold == np.mean(ref["best"])
    assert result.val_at_far_1e3 == ref["val"]
    assert result.val_std == ref["val_std"]
    assert result.far == ref["far"]
    if m is not None:
        np.testing.assert_array_equal(m["accuracy"], ref["accuracy"])
        np.testing.assert_array_equal(m["best_thresholds"], ref["best"])
        np.testing.assert_array_equal(m["tpr"], ref["tpr"])
        np.testing.assert_array_equal(m["fpr"], ref["fpr"])


def unit(angle):
    return np.array([math.cos(angle), math.sin(angle)])


def pairs_at(dists, dim=2):
    """Normalised embeddings ``[2N, dim]`` whose pair i is at squared distance dists[i]."""
    rows = []
    for d in dists:
        angle = math.acos(1 - d / 2)  # |a - b|^2 = 2 - 2 cos(angle)
        rows += [np.r_[unit(0.0), np.zeros(dim - 2)], np.r_[unit(angle), np.zeros(dim - 2)]]
    return np.array(rows)


# ----------------------------------------------------------------------------------------------
# Parity: hand-built sets with known answers


def test_parity_perfectly_separable():
    issame = np.array([i % 2 == 0 for i in range(300)])
    d_same, negatives = 0.8, np.linspace(1.5, 3.5, 150)
    dists = np.where(issame, d_same, 0.0)
    dists[~issame] = negatives
    emb = pairs_at(dists)
    result = evaluate_embeddings("sep", emb, None, issame)
    m = verification_metrics(emb[0::2], emb[1::2], issame)
    ref = ref_embed_and_evaluate(emb, None, issame)
    assert_parity(result, ref, m)
    real_d_same = float(np.sum((emb[0] - emb[1]) ** 2))
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert result.best_threshold == pytest.approx(ACC_THRESHOLDS[ACC_THRESHOLDS > real_d_same][0])
    # VAL: every same pair is below the FAR=1e-3 threshold. FAR: fold 0 holds the 15 closest
    # different pairs (1.5..1.69), all below the threshold learned on folds 1-9 (just under
    # their closest negative, 1.70): FAR 1 on fold 0, 0 on the others, mean 0.1.
    assert result.val_at_far_1e3 == 1.0 and result.far == pytest.approx(0.1, abs=1e-15)
    assert (result.auc, result.eer) == (1.0, 0.0)
    assert result.tar_at_far == {"1e-1": 1.0, "1e-2": 1.0, "1e-3": 1.0, "1e-4": 1.0}
    assert result.xnorm == pytest.approx(1.0)


def test_parity_exactly_k_wrong_pairs():
    # 300 pairs = 10 folds of 30; same pairs at distance 0.8, different pairs at 1.5..3.5, and
    # 5 same-person pairs pushed to 3.9 (2 in fold 0, 3 in fold 3): those and only those
    # are wrong at the best threshold 0.81.
    issame = np.array([i % 2 == 0 for i in range(300)])
    dists = np.where(issame, 0.8, 0.0)
    dists[~issame] = np.linspace(1.5, 3.5, 150)
    wrong = [0, 2, 90, 92, 94]
    dists[wrong] = 3.9
    emb = pairs_at(dists)
    result = evaluate_embeddings("k", emb, None, issame)
    ref = ref_embed_and_evaluate(emb, None, issame)
    assert_parity(result, ref, verification_metrics(emb[0::2], emb[1::2], issame))
    per_fold = np.ones(10)
    per_fold[0], per_fold[3] = 28 / 30, 27 / 30
    real_d_same = float(np.sum((emb[8] - emb[9]) ** 2))  # pair 4: a correct same pair
    assert result.accuracy == pytest.approx(1 - 5 / 300, abs=1e-15)
    assert result.accuracy_std == pytest.approx(np.std(per_fold), abs=1e-15)
    assert result.best_threshold == pytest.approx(ACC_THRESHOLDS[ACC_THRESHOLDS > real_d_same][0])
    # ROC: 145 of 150 same pairs are closer than every different pair, 5 farther than all.
    assert result.tar_at_far["1e-4"] == pytest.approx(145 / 150)
    assert result.auc == pytest.approx(145 / 150)
    assert result.eer == pytest.approx(5 / 150)


def test_parity_val_threshold_lands_past_tied_negatives():
    # All different pairs at one distance: FAR jumps 0 -> 1 between two grid thresholds, so
    # the interpolated FAR=1e-3 threshold lands 1e-6 above that distance and accepts every
    # different pair of the test fold: insightface reports FAR = 1 here, and so must we.
    issame = np.array([i % 2 == 0 for i in range(200)])
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]] * 100)  # 0.8 / exactly 2
    assert 2.0 in verification.VAL_THRESHOLDS  # the negatives sit exactly on a grid point
    result = evaluate_embeddings("tied", emb, None, issame)
    ref = ref_embed_and_evaluate(emb, None, issame)
    assert_parity(result, ref)
    assert result.val_at_far_1e3 == 1.0 and result.far == 1.0


# ----------------------------------------------------------------------------------------------
# Parity: random sets


@pytest.mark.parametrize(
    ("seed", "n_pairs", "flip"), [(0, 600, True), (1, 257, False), (2, 300, True)]
)
def test_parity_random_sets(seed, n_pairs, flip):
    rng = np.random.default_rng(seed)
    dim = 16
    issame = rng.random(n_pairs) < 0.5
    base = rng.normal(size=(n_pairs, dim))
    other = np.where(issame[:, None], base + rng.normal(scale=0.9, size=base.shape),
                     rng.normal(size=base.shape))  # fmt: skip
    emb = np.empty((2 * n_pairs, dim), np.float32)
    emb[0::2], emb[1::2] = base * 7, other * 7
    flipped = (emb + rng.normal(scale=2.0, size=emb.shape)).astype(np.float32) if flip else None
    result = evaluate_embeddings("rand", emb, flipped, issame)
    emb64 = emb.astype(np.float64)
    flipped64 = None if flipped is None else flipped.astype(np.float64)
    ref = ref_embed_and_evaluate(emb64, flipped64, issame)
    assert_parity(result, ref)
    assert result.xnorm == pytest.approx(ref["xnorm"], rel=1e-12)
    # whole-set ROC figures against sklearn / the usual brentq EER / insightface's IJB rule
    total = normalize(emb64 if flipped64 is None else emb64 + flipped64)
    dist = np.sum(np.square(total[0::2] - total[1::2]), 1)
    assert result.auc == pytest.approx(roc_auc_score(issame, -dist), abs=1e-12)
    fpr, tpr, _ = roc_curve(issame, -dist)
    eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert result.eer == pytest.approx(eer, abs=1e-9)
    for key, far in zip(["1e-1", "1e-2", "1e-3", "1e-4"], [1e-1, 1e-2, 1e-3, 1e-4]):
        assert result.tar_at_far[key] == ref_tar_at_far(issame, -dist, far)
    assert 0.5 < result.accuracy < 1.0  # an informative, imperfect set


def test_roc_figures_hand_computed():
    roc = verification.roc_from_scores([0.9, 0.8, 0.7, 0.6], [True, False, True, False])
    assert verification.roc_auc(roc) == 0.75
    assert verification.equal_error_rate(roc) == 0.5
    assert verification.tar_at_far(roc, 0.1) == 0.5  # nearest FAR is 0, best TAR there
    assert verification.roc_from_scores([0.1, 0.2], [True, True]) is None
    assert math.isnan(verification.equal_error_rate(None))
    assert [verification.far_key(f) for f in (1e-1, 1e-4, 1e-6, 5e-3)] == [
        "1e-1", "1e-4", "1e-6", "0.005"]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Real faces: the Yale pairs, raw pixels as embeddings


@pytest.fixture(scope="module")
def yale_pairs(rec_dir):
    from facerec_tf.data.verification_bin import decode_pairs, load_bin

    vset = load_bin(rec_dir / "yale_pairs_py2.bin")
    return decode_pairs(vset), vset.issame


def test_parity_yale_pairs_raw_pixels(yale_pairs):
    images, issame = yale_pairs

    def pixels(x):  # 4x4-pooled raw pixels: 28x28x3 = 2352-d "embeddings"
        return x.reshape(len(x), 28, 4, 28, 4, 3).mean(axis=(2, 4)).reshape(len(x), -1)

    emb, flipped = pixels(images.astype(np.float64)), pixels(images[:, :, ::-1].astype(float))
    result = evaluate_embeddings("yale", emb, flipped, issame)
    ref = ref_embed_and_evaluate(emb, flipped, issame)
    assert_parity(result, ref)
    assert result.xnorm == pytest.approx(ref["xnorm"], rel=1e-12)
    assert 0.6 < result.accuracy < 0.95
    assert (result.num_pairs, result.num_same, result.num_diff) == (300, 150, 150)


# ----------------------------------------------------------------------------------------------
# pairs.txt


def _touch_lfw(root, names_counts):
    for name, count in names_counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(b"\xff\xd8\xff")


def test_read_pairs_txt(tmp_path):
    _touch_lfw(tmp_path / "img", {"Alice_A": 3, "Bob_B": 2})
    text = "1\t1\nAlice_A\t1\t3\nAlice_A 2 Bob_B 1\n\n# comment\n"
    (tmp_path / "pairs.txt").write_text(text)
    pairs = read_pairs_txt(tmp_path / "pairs.txt", tmp_path / "img")
    img = str(tmp_path / "img")
    assert pairs == [
        (f"{img}/Alice_A/Alice_A_0001.jpg", f"{img}/Alice_A/Alice_A_0003.jpg", True),
        (f"{img}/Alice_A/Alice_A_0002.jpg", f"{img}/Bob_B/Bob_B_0001.jpg", False),
    ]
    (tmp_path / "noheader.txt").write_text("Alice_A 1 2\nBob_B 1 2\n")
    assert len(read_pairs_txt(tmp_path / "noheader.txt", tmp_path / "img")) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Alice_A 1 9\n", r"line 1: image .*Alice_A_0009\.jpg does not exist"),
        ("Alice_A 1 2\nAlice_A 1 2 3 4 5\n", r"line 2: 6 fields"),
        ("Alice_A one 2\n", r"line 1: image number 'one' is not an integer"),
        ("1 5\nAlice_A 1 2\n", r"header line announces 10 pairs but 1 follow"),
        ("\n# nothing\n", r"the pairs list is empty"),
    ],
)
def test_read_pairs_txt_errors(tmp_path, text, message):
    _touch_lfw(tmp_path / "img", {"Alice_A": 3})
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(DataFormatError, match=message) as e:
        read_pairs_txt(tmp_path / "pairs.txt", tmp_path / "img")
    assert str(tmp_path / "pairs.txt") in str(e.value)


# ----------------------------------------------------------------------------------------------
# Reports


def _result(name="lfw", seed=0):
    rng = np.random.default_rng(seed)
    issame = np.arange(100) % 2 == 0
    emb = rng.normal(size=(200, 8))
    emb[1::2] = np.where(issame[:, None], emb[0::2] + rng.normal(size=(100, 8)), emb[1::2])
    return evaluate_embeddings(name, emb, None, issame)


def test_report_json_keys_and_roc_png(tmp_path):
    r = _result()
    written = report.write_report(tmp_path / "out" / "report.json", [r], meta={"model": "m"})
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data == written
    entry = data["lfw"]
    for key in ("accuracy", "accuracy_std", "best_threshold", "val_at_far_1e-3", "auc", "eer",
                "tar_at_far", "num_pairs", "xnorm"):  # fmt: skip
        assert key in entry, key
    assert entry["accuracy"] == r.accuracy and entry["num_pairs"] == 100
    assert set(entry["tar_at_far"]) == {"1e-1", "1e-2", "1e-3", "1e-4"}
    assert data["_meta"] == {"model": "m"}
    assert "roc" not in r.to_dict() and json.dumps(r.to_dict())  # trainer's metrics.json
    paths = report.plot_rocs([r], tmp_path / "plots")
    png = pathlib.Path(paths[0])
    assert png.name == "lfw_roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert not list((tmp_path / "plots").glob(".tmp-*"))
    with pytest.raises(ValueError, match="two evaluation targets are named 'lfw'"):
        report.build_report([r, _result()])


def test_report_nan_is_null():
    r = _result()
    r.auc = float("nan")
    assert report.build_report([r])["lfw"]["auc"] is None


# ----------------------------------------------------------------------------------------------
# IJB-style template verification


def test_ijb_media_average_then_template_sum():
    ex, ey = np.eye(2)
    emb = np.array([ex, ex, ex, ey, ex])  # template 1: media 10 (3 x ex), media 11 (ey)
    templates, medias = [1, 1, 1, 1, 2], [10, 10, 10, 11, 20]
    feats, ids = ijb.template_features(emb, templates, medias)
    np.testing.assert_allclose(feats[0], [1 / math.sqrt(2)] * 2, rtol=1e-15)  # not (3, 1)
    assert ids.tolist() == [1, 2]
    scores = ijb.template_pair_scores(feats, ids, [1], [2])
    assert scores[0] == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    # face scores weight images before the media mean: media 11 becomes 3 ey
    w = ijb.image_features(emb, face_scores=[1, 1, 1, 3, 1])
    feats, ids = ijb.template_features(w, templates, medias)
    assert ijb.template_pair_scores(feats, ids, [1], [2])[0] == pytest.approx(1 / math.sqrt(10))
    # the raw norm weights images (N1) unless normalize=True (N0)
    raw = np.array([ex, ex, ex, 3 * ey, ex])
    feats, _ = ijb.template_features(ijb.image_features(raw), templates, medias)
    assert feats[0] @ ex == pytest.approx(1 / math.sqrt(10))
    feats, _ = ijb.template_features(ijb.image_features(raw, normalize=True), templates, medias)
    assert feats[0] @ ex == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(DataFormatError, match="template 7 has no image"):
        ijb.template_pair_scores(feats, ids, [1], [7])


def test_ijb_separable_templates():
    # 6 identities with orthogonal features, 2 templates each, 2 media per template.
    ids = np.repeat(np.arange(6), 8)
    emb = np.eye(6)[ids] * np.linspace(1, 3, len(ids))[:, None]
    templates = ids * 2 + (np.arange(len(ids)) % 8 >= 4)
    medias = np.arange(len(ids)) // 2
    t = np.unique(templates)
    t1, t2 = np.array([(a, b) for a in t for b in t if a < b]).T
    labels = t1 // 2 == t2 // 2
    r = ijb.evaluate_ijb("synthetic", emb, templates, medias, t1, t2, labels)
    assert (r.num_templates, r.num_pairs, r.num_same, r.num_diff) == (12, 66, 6, 60)
    np.testing.assert_allclose(r.scores, labels.astype(float), atol=1e-12)
    assert r.auc == 1.0 and r.eer == 0.0
    assert r.tar_at_far == {k: 1.0 for k in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")}
    assert any("TAR@FAR: 1e-6=1.00000*" in line for line in r.lines())


def ref_ijb(emb, flipped, scores_w, templates, medias, t1, t2, labels):
    """insightface eval_ijbc.py steps (F2, N1, D1): loops per template and per media."""
    feats = emb + flipped if flipped is not None else emb
    if scores_w is not None:
        feats = feats * scores_w[:, np.newaxis]
    unique_t = np.unique(templates)
    tfeats = np.zeros((len(unique_t), feats.shape[1]))
    for c, uqt in enumerate(unique_t):
        (ind_t,) = np.where(templates == uqt)
        f_t, m_t = feats[ind_t], medias[ind_t]
        media_feats = []
        for u, ct in zip(*np.unique(m_t, return_counts=True)):
            (ind_m,) = np.where(m_t == u)
            media_feats.append(f_t[ind_m] if ct == 1 else np.mean(f_t[ind_m], 0, keepdims=True))
        tfeats[c] = np.sum(np.array(media_feats), axis=0)
    tfeats = normalize(tfeats)
    lookup = np.zeros((max(unique_t) + 1, 1), dtype=int)
    for c, uqt in enumerate(unique_t):
        lookup[uqt] = c
    score = np.sum(tfeats[lookup[t1]] * tfeats[lookup[t2]], -1).flatten()
    return score, {f: ref_tar_at_far(labels, score, f) for f in ijb.IJB_FARS}


def test_ijb_random_against_insightface_loops():
    rng = np.random.default_rng(3)
    n = 400
    ident = rng.integers(0, 20, n)
    emb = rng.normal(size=(20, 32))[ident] + rng.normal(scale=1.5, size=(n, 32))
    flipped = emb + rng.normal(scale=0.3, size=emb.shape)
    templates = ident * 10 + rng.integers(0, 3, n)  # up to 3 templates per identity
    medias = rng.integers(0, 40, n)
    weights = rng.uniform(0.5, 1.0, n)
    t = np.unique(templates)
    t1, t2 = np.array([(a, b) for a in t for b in t if a < b]).T
    labels = (t1 // 10) == (t2 // 10)
    r = ijb.evaluate_ijb("r", emb, templates, medias, t1, t2, labels, flipped, weights)
    score, tars = ref_ijb(emb, flipped, weights, templates, medias, t1, t2, labels)
    np.testing.assert_allclose(r.scores, score, rtol=0, atol=1e-12)
    assert list(r.tar_at_far.values()) == [tars[f] for f in ijb.IJB_FARS]
    assert r.auc == pytest.approx(roc_auc_score(labels, score), abs=1e-12)


def test_ijb_meta_errors(tmp_path):
    (tmp_path / "x_face_tid_mid.txt").write_text("a.jpg 1 5\nb.jpg 2 6\n")
    (tmp_path / "x_template_pair_label.txt").write_text("1 2 0\n1 3 1\n")
    with pytest.raises(DataFormatError, match=r"pair 1 \(line 2\): template 3 has no image"):
        ijb.load_ijb_meta(tmp_path, "X")
    (tmp_path / "x_template_pair_label.txt").write_text("1 2 0\n1 2 7\n")
    with pytest.raises(DataFormatError, match=r"line 2: label 7 \(expected 0 or 1\)"):
        ijb.load_ijb_meta(tmp_path, "x")
    (tmp_path / "x_template_pair_label.txt").write_text("1 2 0\n")
    (tmp_path / "x_name_5pts_score.txt").write_text("a.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n")
    with pytest.raises(DataFormatError, match=r"differs from .*first at line 2"):
        ijb.load_ijb_meta(tmp_path, "x")
    assert ijb.load_ijb_meta(tmp_path, "x", use_face_scores=False).face_scores is None
    with pytest.raises(DataFormatError, match="file not found"):
        ijb.load_ijb_meta(tmp_path, "ijbb")


# ----------------------------------------------------------------------------------------------
# Real faces as LFW-layout folders (pairs.txt and IJB templates)


class RawPixels:
    """A deterministic "model": the raw pixels, flattened."""

    input_size = (112, 112)

    def __call__(self, images):
        return np.asarray(images, np.float64).reshape(len(images), -1)


@pytest.fixture(scope="module")
def yale_lfw(yale_dir, tmp_path_factory):
    """Yale faces as ``subjectNN/subjectNN_%04d.jpg`` 112x112 crops (centre 200x200 crop)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("yale_lfw")
    people: dict[str, list[str]] = {}
    for src in sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject")):
        subject = src.name.split(".")[0]
        files = people.setdefault(subject, [])
        img = Image.open(src).convert("RGB")
        left, top = (img.width - 200) // 2, (img.height - 200) // 2
        img = img.crop((left, top, left + 200, top + 200)).resize((112, 112), Image.BILINEAR)
        rel = f"{subject}/{subject}_{len(files) + 1:04d}.jpg"
        (root / subject).mkdir(exist_ok=True)
        img.save(root / rel, quality=95)
        files.append(rel)
    return root, people


@pytest.fixture(scope="module")
def yale_ijb(yale_lfw, tmp_path_factory):
    """IJB-style meta files over the Yale crops: per subject two templates (images 1-5 and
    6-11), each of two media; every template pair; random face scores."""
    root, people = yale_lfw
    meta = tmp_path_factory.mktemp("yale_meta")
    lines, media = [], 0
    for s, (_, files) in enumerate(sorted(people.items())):
        for half, chunk in enumerate((files[:5], files[5:])):
            cut = 2 if half == 0 else 3
            for group in (chunk[:cut], chunk[cut:]):
                media += 1
                lines.append([(f, 100 + 2 * s + half, media) for f in group])
    rows = [row for group in lines for row in group]
    (meta / "yale_face_tid_mid.txt").write_text("".join(f"{f} {t} {m}\n" for f, t, m in rows))
    t = sorted({row[1] for row in rows})
    pairs = [(a, b, int(a // 2 == b // 2)) for a in t for b in t if a < b]
    (meta / "yale_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {y}\n" for a, b, y in pairs)
    )
    weights = np.random.default_rng(0).uniform(0.5, 1.0, len(rows))
    (meta / "yale_name_5pts_score.txt").write_text(
        "".join(f"{r[0]} {' '.join(['1'] * 10)} {float(w)!r}\n" for r, w in zip(rows, weights))
    )
    return meta, root, rows, pairs, weights


def test_ijb_on_yale_templates(yale_ijb):
    meta, root, rows, pairs, weights = yale_ijb
    r = ijb.evaluate_ijb_folder(RawPixels(), meta, root, "Yale", batch_size=50)
    assert (r.num_templates, r.num_images, r.num_pairs, r.num_same) == (30, 164, 435, 15)
    # reference: same decoded pixels, insightface's loops for the aggregation
    images = load_images([root / row[0] for row in rows], (112, 112))
    emb, flipped = RawPixels()(images), RawPixels()(images[:, :, ::-1])
    t1, t2, y = (np.array(c) for c in zip(*pairs))
    templates, medias = (np.array([row[k] for row in rows]) for k in (1, 2))
    score, tars = ref_ijb(emb, flipped, weights, templates, medias, t1, t2, y.astype(bool))
    np.testing.assert_allclose(r.scores, score, rtol=0, atol=1e-12)
    assert list(r.tar_at_far.values()) == [tars[f] for f in ijb.IJB_FARS]
    assert r.auc > 0.8  # raw pixels of the same person under different light: informative


# ----------------------------------------------------------------------------------------------
# Model loading


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    """A small random MobileFaceNet (64-d) saved as ``.keras``: untrained, fast on CPU."""
    import keras

    from facerec_tf.models import create_backbone

    keras.utils.set_random_seed(0)
    model = create_backbone(
        "mobilefacenet", embedding_size=64, stage_units=(1, 1, 1, 1), width_scale=1
    )
    path = tmp_path_factory.mktemp("tiny") / "backbone.keras"
    model.save(str(path))
    return path, model


@pytest.fixture(scope="module")
def fast_keras(tmp_path_factory):
    """A very small plain Keras embedding model (0..255 input, normalisation inside, ~6
    MFLOPs per image) for the command-line tests that embed hundreds of images."""
    import keras

    keras.utils.set_random_seed(0)
    images = keras.Input((112, 112, 3), name="images")
    x = keras.layers.Rescaling(1 / 128, offset=-127.5 / 128)(images)
    x = keras.layers.Conv2D(16, 7, strides=4, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = keras.layers.Dense(64)(keras.layers.Flatten()(x))
    path = tmp_path_factory.mktemp("fast") / "fast.keras"
    keras.Model(images, x, name="fast").save(str(path))
    return path


def test_load_keras_and_run_dir(tiny_keras, tmp_path):
    path, keras_model = tiny_keras
    m = load_embedding_model(path)
    assert (m.kind, m.input_size, m.embedding_size, m.normalized_output) == (
        "keras", (112, 112), 64, False)  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    want = keras_model(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(m(images), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelInputError, match=r"100x100 but the model .* expects 112x112"):
        m(np.zeros((1, 100, 100, 3), np.uint8))
    # training run directory: best/ wins over export/
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    shutil.copy(path, run / "export" / "backbone.keras")
    assert resolve_model_path(run) == (str(run / "export" / "backbone.keras"), "keras")
    (run / "best").mkdir()
    shutil.copy(path, run / "best" / "backbone.keras")
    assert resolve_model_path(run) == (str(run / "best" / "backbone.keras"), "keras")


def test_load_saved_model(tmp_path):
    import tensorflow as tf

    w = np.random.default_rng(1).normal(size=(112 * 112 * 3, 8)).astype(np.float32)

    class Module(tf.Module):
        def __init__(self):
            self.w = tf.Variable(w)

        @tf.function(input_signature=[tf.TensorSpec([None, 112, 112, 3], tf.float32)])
        def serve(self, images):
            x = tf.reshape(images / 255.0, [-1, 112 * 112 * 3]) @ self.w
            return {"embedding": tf.math.l2_normalize(x, axis=1), "raw": x}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    m = load_embedding_model(tmp_path / "sm")
    assert (m.kind, m.input_size, m.embedding_size, m.normalized_output) == (
        "saved_model", (112, 112), 8, True)  # fmt: skip
    images = np.random.default_rng(2).integers(0, 256, (5, 112, 112, 3)).astype(np.uint8)
    want = normalize(images.reshape(5, -1) / 255.0 @ w)
    np.testing.assert_allclose(m(images), want, rtol=1e-4, atol=1e-5)


def _onnx_model(path, input_shape, normalize_output):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).normal(size=(112 * 112 * 3, 8)).astype(np.float32) / 100
    nodes = [
        helper.make_node("Flatten", ["data"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["raw" if normalize_output else "fc1"]),
    ]
    out = "fc1"
    if normalize_output:
        nodes.append(helper.make_node("LpNormalization", ["raw"], ["embedding"], axis=1, p=2))
        out = "embedding"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [input_shape[0], 8])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def test_load_onnx_both_interfaces(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (3, 112, 112, 3)).astype(np.uint8)
    x = images.astype(np.float32)
    # insightface: NCHW, (x - 127.5) / 127.5, raw output, dynamic batch
    w = _onnx_model(tmp_path / "if.onnx", ["N", 3, 112, 112], normalize_output=False)
    m = load_embedding_model(tmp_path / "if.onnx")
    assert (m.kind, m.input_size, m.normalized_output) == ("onnx-insightface", (112, 112), False)
    want = ((x - 127.5) / 127.5).transpose(0, 3, 1, 2).reshape(3, -1) @ w
    np.testing.assert_allclose(m(images), want, rtol=1e-4, atol=1e-4)
    # ours: NHWC 0..255, L2-normalised output, fixed batch 2 (3 images -> padded chunks)
    w = _onnx_model(tmp_path / "ours.onnx", [2, 112, 112, 3], normalize_output=True)
    m = load_embedding_model(tmp_path / "ours.onnx")
    assert (m.kind, m.input_size, m.normalized_output) == ("onnx", (112, 112), True)
    np.testing.assert_allclose(m(images), normalize(x.reshape(3, -1) @ w), rtol=1e-4, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory") as e:
        load_embedding_model(tmp_path / "missing.keras")
    assert "missing.keras" in str(e.value)
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"unknown model format \(file suffix '.h5'\)"):
        load_embedding_model(tmp_path / "model.h5")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ModelLoadError, match=r"neither a SavedModel .* nor a training run"):
        load_embedding_model(tmp_path / "empty_run")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="cannot load the Keras model"):
        load_embedding_model(tmp_path / "broken.keras")
    assert issubclass(ModelLoadError, FacerecError)


# ----------------------------------------------------------------------------------------------
# evaluate.py


def _cli_module():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_cli_end_to_end_yale_bin(rec_dir, fast_keras, tmp_path, capsys):
    # In-process (the TensorFlow import is shared with the other tests); the subprocess
    # tests below check the real exit code and stderr of the script.
    rc = _cli_module().main(
        ["--model", str(fast_keras), "--bin", str(rec_dir / "yale_pairs_py2.bin"),
         "--report", str(tmp_path / "report.json"), "--plot-dir", str(tmp_path / "plots"),
         "--batch-size", "100"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    out = captured.out.splitlines()
    t = re.escape("[yale_pairs_py2][0]")
    patterns = [
        t + r"XNorm: \d+\.\d{6}",
        t + r"Accuracy-Flip: (0|1)\.\d{5}\+-0\.\d{5}",
        t + r"VAL@FAR=1e-3: [01]\.\d{5}\+-0\.\d{5} \(FAR 0\.\d{5}\)",
        t + r"AUC: 0\.\d{5}  EER: 0\.\d{5}",
        t + r"TAR@FAR: 1e-1=[01]\.\d{5} 1e-2=[01]\.\d{5} 1e-3=[01]\.\d{5}\* 1e-4=[01]\.\d{5}\*",
    ]
    for pattern in patterns:
        assert any(re.fullmatch(pattern, line) for line in out), (pattern, out)
    assert "embedding" in captured.err  # the tqdm bar
    data = json.loads((tmp_path / "report.json").read_text())
    entry = data["yale_pairs_py2"]
    acc_line = next(line for line in out if "Accuracy-Flip" in line)
    assert f"{entry['accuracy']:1.5f}+-{entry['accuracy_std']:1.5f}" in acc_line
    assert entry["num_pairs"] == 300 and entry["flip"] is True
    assert data["_meta"]["normalized_output"] is False
    png = tmp_path / "plots" / "yale_pairs_py2_roc.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_pairs_txt_in_process(yale_lfw, fast_keras, tmp_path, capsys):
    root, people = yale_lfw
    subjects = sorted(people)
    lines = ["1 10"]  # same and different lines interleaved: every fold holds both kinds
    for s, (a, b) in zip(subjects[:10], itertools.pairwise(subjects[:11])):
        lines += [f"{s} 1 2", f"{a} 3 {b} 4"]
    (tmp_path / "mypairs.txt").write_text("\n".join(lines) + "\n")
    cli = _cli_module()
    rc = cli.main(["--model", str(fast_keras), "--pairs", str(tmp_path / "mypairs.txt"),
                   "--images", str(root), "--no-flip"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^\[mypairs\]\[0\]Accuracy: [01]\.\d{5}\+-0\.\d{5}$", out, re.M), out


def test_cli_ijb_in_process(yale_ijb, fast_keras, tmp_path, capsys):
    meta, root = yale_ijb[:2]
    rc = _cli_module().main(
        ["--model", str(fast_keras), "--ijb-meta", str(meta), "--ijb-images", str(root),
         "--ijb-name", "YALE", "--report", str(tmp_path / "r.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "[yale][0]Templates: 30  Pairs: 435 (15 same, 420 different)  Images: 164" in out
    assert re.search(r"^\[yale\]\[0\]TAR@FAR: 1e-6=[01]\.\d{5}\* 1e-5=", out, re.M), out
    entry = json.loads((tmp_path / "r.json").read_text())["yale"]
    assert entry["type"] == "ijb" and set(entry["tar_at_far"]) == {
        "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}  # fmt: skip


def test_cli_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as e:
        _cli_module().main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "python evaluate.py --model" in text and "--ijb-meta" in text and "pairs.txt" in text


def test_cli_bad_inputs_exit_2(rec_dir, fast_keras, tmp_path):
    model, yale_bin = fast_keras, rec_dir / "yale_pairs_py2.bin"
    (tmp_path / "garbage.bin").write_bytes(b"this is not a pickle")
    (tmp_path / "empty.txt").write_text("# no pairs\n")
    cases = [
        (["--model", tmp_path / "nope.keras", "--bin", yale_bin],
         [r"nope\.keras", "no such file or directory"]),
        (["--model", model, "--bin", tmp_path / "garbage.bin"],
         [r"garbage\.bin", "not a readable pickle"]),
        (["--model", model, "--pairs", tmp_path / "empty.txt", "--images", tmp_path],
         [r"empty\.txt", "the pairs list is empty"]),
    ]  # fmt: skip
    for args, messages in cases:
        proc = _run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("evaluate.py: error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        for message in messages:
            assert re.search(message, proc.stderr), (message, proc.stderr)


def test_cli_wrong_image_size_exit_2(fast_keras, tmp_path, capsys):
    from PIL import Image

    from facerec_tf.data.verification_bin import write_bin

    buf = io.BytesIO()
    Image.fromarray(np.full((100, 100, 3), 90, np.uint8)).save(buf, format="JPEG")
    write_bin(tmp_path / "small.bin", [buf.getvalue()] * 40, [True, False] * 10)
    rc = _cli_module().main(["--model", str(fast_keras), "--bin", str(tmp_path / "small.bin")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("evaluate.py: error: ") and "Traceback" not in err
    assert "small.bin" in err and "100x100" in err and "112x112" in err


def test_no_tensorflow_at_import():
    code = (
        "import sys, facerec_tf.evaluation.models, facerec_tf.evaluation.ijb, "
        "facerec_tf.evaluation.report; "
        "assert not {'tensorflow', 'matplotlib', 'onnxruntime'} & set(sys.modules), sorted("
        "m for m in sys.modules if m in {'tensorflow', 'matplotlib', 'onnxruntime'})"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
