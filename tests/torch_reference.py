"""torch side of tests/test_torch_parity.py: run with a Python that has torch (no TensorFlow).

    python tests/torch_reference.py IN.npz OUT.npz

Reads embeddings ``x``, centres ``w``, labels ``y`` and BatchNorm inputs ``bn4`` (NHWC) and
``bn2``; writes what arcface_torch computes:

* ``loss``, ``gx``, ``gw``: mean cross entropy of arcface_torch's ``CombinedMarginLoss``
  ArcFace branch (s = 64, m = (1, 0.5, 0)) on ``F.linear(normalize(x), normalize(w))``, and
  its gradients. As there, the margin goes in place under ``torch.no_grad()``: ``arccos``,
  ``+ m2`` on the targets, ``cos``, so autograd sees ``s * cos``;
* ``rm4``, ``rv4``, ``rm2``, ``rv2``: running mean and variance of ``BatchNorm2d`` /
  ``BatchNorm1d`` (eps 1e-5, momentum 0.1) after one training forward.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F


def main(src: str, dst: str) -> int:
    d = np.load(src)
    x = torch.tensor(d["x"], requires_grad=True)
    w = torch.tensor(d["w"], requires_grad=True)
    y = torch.tensor(d["y"], dtype=torch.int64)
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    rows = torch.where(y != -1)[0]
    with torch.no_grad():
        angles = logits.arccos()
        angles[rows, y[rows]] += 0.5
        logits.copy_(angles.cos())  # in place: the autograd graph still ends at `linear`
    loss = F.cross_entropy(logits * 64.0, y)
    loss.backward()
    bn4 = torch.nn.BatchNorm2d(d["bn4"].shape[-1], eps=1e-5, momentum=0.1).train()
    bn4(torch.tensor(d["bn4"]).permute(0, 3, 1, 2))
    bn2 = torch.nn.BatchNorm1d(d["bn2"].shape[-1], eps=1e-5, momentum=0.1).train()
    bn2(torch.tensor(d["bn2"]))
    np.savez(
        dst,
        loss=loss.item(),
        gx=x.grad.numpy(),
        gw=w.grad.numpy(),
        rm4=bn4.running_mean.numpy(),
        rv4=bn4.running_var.numpy(),
        rm2=bn2.running_mean.numpy(),
        rv2=bn2.running_var.numpy(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
