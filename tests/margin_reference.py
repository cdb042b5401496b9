"""NumPy float64 reference of the margin softmax and its gradients, both gradient modes.

Used by tests/test_heads.py and tests/partial_fc_check.py. Written from the formulas:

* ``exact``: logit_y = s cos(theta_y + m2) - s m3 (insightface's ``cos - m2 sin m2`` once
  ``theta_y + m2 >= pi``), d logit_y / d cos_y = s sin(theta_y + m2) / sin(theta_y) (s on the
  fallback);
* ``arcface_torch``: logit_y = s cos(theta_y + m2) - s m3 with no fallback and
  d logit_y / d cos_y = s (arcface_torch's in-place ``arccos_``/``cos_`` under no_grad);

every other logit is s cos_j (zero, with no gradient, when inter-class filtering drops it).
The loss is the mean softmax cross entropy; the cosines come from L2-normalised embeddings
and centres, and the chain rule through the normalisation is
``d/dx = (g - x_hat (x_hat . g)) / ||x||``.
"""

from __future__ import annotations

import math

import numpy as np


def margin_loss_and_grads(
    emb, centers, labels, s=64.0, m2=0.5, m3=0.0, mode="exact", threshold=0.0
):
    """``(loss, d loss / d emb, d loss / d centers)`` in float64 (m1 = 1, every label valid)."""
    x = np.asarray(emb, np.float64)
    w = np.asarray(centers, np.float64)
    labels = np.asarray(labels)
    xn_norm = np.linalg.norm(x, axis=1, keepdims=True)
    wn_norm = np.linalg.norm(w, axis=1, keepdims=True)
    xn, wn = x / xn_norm, w / wn_norm
    cos = xn @ wn.T
    logits = cos.copy()
    factor = np.ones_like(cos)  # d (logit / s) / d cos
    if threshold > 0:
        dropped = cos > threshold
        logits[dropped] = 0.0
        factor[dropped] = 0.0
    rows = np.arange(len(labels))
    for i, y in zip(rows, labels):
        c = min(1.0, max(-1.0, cos[i, y]))
        theta = math.acos(c)
        if mode == "arcface_torch":
            value = math.cos(theta + m2) if m2 > 0 else c
            slope = 1.0
        elif theta + m2 < math.pi:
            value = math.cos(theta + m2)
            slope = math.sin(theta + m2) / math.sin(theta) if m2 > 0 else 1.0
        else:
            value = c - math.sin(math.pi - m2) * m2
            slope = 1.0
        logits[i, y] = value - m3
        factor[i, y] = slope
    logits *= s
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    loss = float(np.mean(-np.log(p[rows, labels])))
    d_logits = p.copy()
    d_logits[rows, labels] -= 1.0
    d_logits /= len(labels)
    d_cos = s * factor * d_logits
    g_xn = d_cos @ wn
    g_wn = d_cos.T @ xn
    d_x = (g_xn - xn * np.sum(xn * g_xn, axis=1, keepdims=True)) / xn_norm
    d_w = (g_wn - wn * np.sum(wn * g_wn, axis=1, keepdims=True)) / wn_norm
    return loss, d_x, d_w
