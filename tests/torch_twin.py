"""Torch twins of arcface_torch's ``iresnet`` and ``mobilefacenet`` for import tests.

Torch-only: never imported by the package or by a TensorFlow test process. Tests run it as a
subprocess with a Python that has torch (``FACEREC_TORCH_PYTHON``, by default the test venv's
own), through the ``torch_fixture`` factory of ``tests/conftest.py``.

The modules below are written here to give the **same module tree and state-dict names** as
arcface_torch's ``backbones/iresnet.py`` and ``backbones/mobilefacenet.py`` (so the ``.pth``
files it writes are laid out like the real ones), with one addition: ``se_ratio > 0`` gives an
IResNet unit a squeeze-excitation module ``se_module`` (``fc1``, ``fc2``: 1x1 convolutions
without bias, ReLU between, sigmoid after) applied after ``bn3``, which is the layout of
facerec_tf's IR-SE. arcface_torch has no IR-SE, so these keys are this project's convention.

Command line::

    python tests/torch_twin.py --arch iresnet10 --out DIR [--steps 3] [--seed 0] [--embedding 512]
        [--faces FACES.npy] [--no-onnx] [--float64]
    python tests/torch_twin.py --arch iresnet18 --out DIR --pth ARCH.pth --reference SPEC.npz

builds the network (seeded), takes ``--steps`` SGD steps (lr 0.1, momentum 0.9, weight decay
5e-4, cross-entropy through a linear classifier) on the training faces so that weights and
BatchNorm statistics move off their initial values, then writes into ``DIR``:

* ``ARCH.pth``: ``torch.save(net.state_dict())``, as arcface_torch's ``train_v2.py``;
* ``ARCH.onnx``: eval-mode ``torch.onnx.export`` as arcface_torch's ``torch2onnx.py`` (input
  ``data``, opset 11, dynamic batch, ``dynamo=False``);
* ``ARCH_probe.npy``: uint8 ``[8, 112, 112, 3]`` RGB probe faces;
* ``ARCH_eval.npy`` / ``ARCH_train.npy``: the net's output on the probe faces in eval mode and
  in train mode (BatchNorm batch statistics of the 8 probe faces), input
  ``(rgb - 127.5) / 127.5`` NCHW;
* ``ARCH.json``: what was built.

With ``--reference SPEC.npz --pth ARCH.pth`` it instead loads that state dict, runs a float64
training run (:func:`reference_run`) and writes ``ARCH_reference_SPEC.npz`` (losses, outputs and
step-1 gradients; ``SPEC`` is the spec file's name) for ``benchmarks/parity_arcface_torch.py``.

Faces: ``--faces`` is a uint8 ``[N, 112, 112, 3]`` array (N >= 8; the steps train on all of
them, the first 8 are the probe); without it, smooth random images drawn from ``--seed``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# IResNet (arcface_torch backbones/iresnet.py names)


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class SEModule(nn.Module):
    """Squeeze-excitation: mean over H, W; 1x1 conv C/ratio; ReLU; 1x1 conv C; sigmoid."""

    def __init__(self, channels, ratio):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // ratio, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // ratio, channels, kernel_size=1, bias=False)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class IBasicBlock(nn.Module):
    """BN, conv3x3, BN, PReLU, conv3x3 (stride here), BN (+ SE), plus the shortcut."""

    def __init__(self, cin, planes, stride=1, downsample=None, se_ratio=0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        if se_ratio:
            self.se_module = SEModule(planes, se_ratio)
        else:
            self.se_module = None
        self.downsample = downsample

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se_module is not None:
            y = self.se_module(y)
        shortcut = x if self.downsample is None else self.downsample(x)
        return y + shortcut


class IResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, dropout=0.0, num_features=512, se_ratio=0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (units, width) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
            downsample = nn.Sequential(
                nn.Conv2d(cin, width, kernel_size=1, stride=2, bias=False),
                nn.BatchNorm2d(width, eps=1e-5),
            )
            blocks = [IBasicBlock(cin, width, 2, downsample, se_ratio)]
            blocks += [IBasicBlock(width, width, 1, None, se_ratio) for _ in range(units - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


# ----------------------------------------------------------------------------------------------
# MobileFaceNet (arcface_torch backbones/mobilefacenet.py names)


class ConvBlock(nn.Module):
    """``layers``: conv (no bias), BN, PReLU; ``linear=True`` drops the PReLU."""

    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, linear=False):
        super().__init__()
        mods = [
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if not linear:
            mods.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 to ``groups`` channels, 3x3 depthwise (stride here), 1x1 linear to ``cout``."""

    def __init__(self, cin, cout, residual=False, stride=2, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, groups),
            ConvBlock(groups, groups, 3, stride, 1, groups=groups),
            ConvBlock(groups, cout, linear=True),
        )

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, channels, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(channels, channels, True, 1, groups) for _ in range(num_block)]
        )

    def forward(self, x):
        return self.layers(x)


class Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class GDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(512, 512, 7, 1, 0, groups=512, linear=True),
            Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        c64, c128 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c64, 3, 2, 1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c64, c64, 3, 1, 1, groups=64))
        else:
            self.layers.append(Residual(c64, blocks[0], 128))
        self.layers.extend(
            [
                DepthWise(c64, c64, stride=2, groups=128),
                Residual(c64, blocks[1], 128),
                DepthWise(c64, c128, stride=2, groups=256),
                Residual(c128, blocks[2], 256),
                DepthWise(c128, c128, stride=2, groups=512),
                Residual(c128, blocks[3], 256),
            ]
        )
        self.conv_sep = ConvBlock(c128, 512)
        self.features = GDC(num_features)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def get_mbf(fp16, num_features, blocks=(1, 4, 6, 2), scale=2):
    """arcface_torch's ``get_mbf`` signature (``fp16`` is ignored: CPU, float32)."""
    del fp16
    return MobileFaceNet(num_features, blocks, scale)


# ----------------------------------------------------------------------------------------------
# Architectures by name

IRESNET_LAYERS = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
MBF = {
    "mbf": {"blocks": (1, 4, 6, 2), "scale": 2},
    "mbf_small": {"blocks": (1, 4, 6, 2), "scale": 1},
    "mbf_large": {"blocks": (2, 8, 12, 4), "scale": 4},
    "mbf_s1_b2231": {"blocks": (2, 2, 3, 1), "scale": 1},
}


def build(arch: str, embedding: int = 512) -> tuple[nn.Module, str]:
    """The twin named ``arch`` and a description of how it was built."""
    for prefix, se in (("iresnet", 0), ("ir_se", 16)):
        if arch.startswith(prefix) and arch[len(prefix) :].isdigit():
            depth = int(arch[len(prefix) :])
            if depth not in IRESNET_LAYERS:
                break
            how = f"IResNet({IRESNET_LAYERS[depth]}, num_features={embedding}, se_ratio={se})"
            return IResNet(IRESNET_LAYERS[depth], num_features=embedding, se_ratio=se), how
    if arch in MBF:
        spec = MBF[arch]
        how = f"get_mbf(False, {embedding}, blocks={spec['blocks']}, scale={spec['scale']})"
        return get_mbf(False, embedding, **spec), how
    names = [f"iresnet{d}" for d in IRESNET_LAYERS] + [f"ir_se{d}" for d in IRESNET_LAYERS]
    raise SystemExit(f"unknown --arch {arch!r}; valid: {', '.join(names + list(MBF))}")


def to_torch(u8: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """arcface_torch's transform: ``(rgb - 127.5) / 127.5``, NHWC uint8 -> NCHW."""
    x = (u8.astype(np.float64) - 127.5) / 127.5
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def random_faces(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth random uint8 images (low-frequency noise upsampled 8x): BN statistics see
    image-like spatial correlation rather than white noise."""
    low = rng.uniform(0, 255, size=(n, 14, 14, 3))
    big = low.repeat(8, axis=1).repeat(8, axis=2)
    big += rng.normal(0, 12, size=big.shape)
    return np.clip(big, 0, 255).astype(np.uint8)


def reference_loss(kind: str, embedding, classifier, labels):
    """The mean cross-entropy of the ``--reference`` run's head, ``classifier`` ``[E, C]``:

    * ``softmax``: of ``embedding @ classifier``;
    * ``arcface_torch``: arcface_torch's ``CombinedMarginLoss`` ArcFace branch (s 64, m2 0.5) on
      the cosines to the normalised columns: the margin goes in place under ``no_grad``
      (``arccos``, ``+ m2`` on the targets, ``cos``), so autograd sees ``s * cos``;
    * ``arcface_exact``: the same value with the margin differentiated (full-gradient
      ArcFace), insightface's ``cos - m2 sin(m2)`` past ``theta + m2 > pi``.
    """
    if kind == "softmax":
        return nn.functional.cross_entropy(embedding @ classifier, labels)
    s, m2 = 64.0, 0.5
    cos = nn.functional.linear(
        nn.functional.normalize(embedding), nn.functional.normalize(classifier.t())
    ).clamp(-1, 1)
    rows = torch.arange(len(labels))
    if kind == "arcface_torch":
        with torch.no_grad():
            angles = cos.arccos()
            angles[rows, labels] += m2
            cos.copy_(angles.cos())
        return nn.functional.cross_entropy(cos * s, labels)
    if kind != "arcface_exact":
        raise SystemExit(f"unknown reference loss {kind!r}")
    target = cos[rows, labels]
    theta = torch.atan2(torch.sqrt(torch.clamp(1 - target**2, min=1e-12)), target)
    fallback = target - math.sin(math.pi - m2) * m2
    new = torch.where(target > math.cos(math.pi - m2), torch.cos(theta + m2), fallback)
    onehot = nn.functional.one_hot(labels, cos.shape[1]).to(cos.dtype)
    logits = cos * (1 - onehot) + new[:, None] * onehot
    return nn.functional.cross_entropy(logits * s, labels)


def reference_run(net: nn.Module, spec_path: str, out_path: str) -> dict:
    """A float64 training run for gradient comparisons (``--reference``).

    ``spec_path`` is a ``.npz`` with ``faces`` (uint8 NHWC), ``labels`` (int), ``classifier``
    (``[E, C]``, fixed), ``lr``, ``momentum``, ``weight_decay``, ``steps`` and optionally
    ``float32`` (true: run in float32 instead, to measure float32 rounding), and ``loss`` (see
    :func:`reference_loss`; default ``softmax``). Train mode; SGD as torch's.
    Writes ``losses`` (one per step, before its update), ``eval`` and ``train`` (outputs of
    the starting weights) and ``grad/NAME`` (step-1 gradient of every parameter) to
    ``out_path``.
    """
    spec = np.load(spec_path)
    dtype = torch.float32 if "float32" in spec.files and bool(spec["float32"]) else torch.float64
    net = net.to(dtype)
    x = to_torch(spec["faces"], dtype)
    y = torch.from_numpy(spec["labels"].astype(np.int64))
    w = torch.from_numpy(spec["classifier"]).to(dtype)
    with torch.no_grad():
        train_out = copy.deepcopy(net).train()(x).numpy()
        eval_out = copy.deepcopy(net).eval()(x).numpy()
    opt = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=float(spec["lr"]),
        momentum=float(spec["momentum"]),
        weight_decay=float(spec["weight_decay"]),
    )
    net.train()
    losses, grads = [], {}
    head = str(spec["loss"]) if "loss" in spec.files else "softmax"
    for step in range(int(spec["steps"])):
        loss = reference_loss(head, net(x), w, y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {
                f"grad/{name}": p.grad.numpy().copy()
                for name, p in net.named_parameters()
                if p.grad is not None
            }
        opt.step()
        losses.append(loss.item())
    np.savez(out_path, losses=np.array(losses), eval=eval_out, train=train_out, **grads)
    return {"losses": losses, "reference": out_path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, help="iresnet10..200, ir_se10..200, mbf, mbf_large...")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=3, help="SGD steps before saving")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedding", type=int, default=512, help="num_features")
    ap.add_argument("--faces", help="uint8 [N,112,112,3] .npy (N >= 8); default: random")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX export")
    ap.add_argument("--float64", action="store_true", help="build and run in float64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pth", help="with --reference: the state dict to start from")
    ap.add_argument(
        "--reference",
        metavar="SPEC.npz",
        help="instead of training and saving: a float64 run from --pth (see reference_run), "
        "written to OUT/ARCH_reference_SPEC.npz",
    )
    args = ap.parse_args(argv)
    if args.reference:
        if not args.pth:
            raise SystemExit("--reference needs --pth")
        torch.set_num_threads(args.threads)
        net, _ = build(args.arch, args.embedding)
        net.load_state_dict(torch.load(args.pth, weights_only=True))
        os.makedirs(args.out, exist_ok=True)
        spec_name = os.path.splitext(os.path.basename(args.reference))[0]
        out = os.path.join(args.out, f"{args.arch}_reference_{spec_name}.npz")
        print(json.dumps(reference_run(net, args.reference, out)))
        return 0

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    dtype = torch.float64 if args.float64 else torch.float32
    if args.faces:
        faces = np.load(args.faces)
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (112, 112, 3):
            raise SystemExit(f"{args.faces}: {faces.dtype} {faces.shape}, want uint8 [N,112,112,3]")
        if len(faces) < 8:
            raise SystemExit(f"{args.faces}: {len(faces)} faces, want at least 8")
    else:
        faces = random_faces(rng, 16)
    probe = faces[:8]
    net, how = build(args.arch, args.embedding)
    net = net.to(dtype)
    classes = max(2, len(faces) // 2)
    labels = torch.arange(len(faces)) % classes
    head = nn.Linear(args.embedding, classes).to(dtype)
    opt = torch.optim.SGD(
        list(net.parameters()) + list(head.parameters()),
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
    )
    net.train()
    losses = []
    for _ in range(args.steps):
        loss = nn.functional.cross_entropy(head(net(to_torch(faces, dtype))), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.arch)
    torch.save(net.state_dict(), stem + ".pth")
    with torch.no_grad():
        train_out = copy.deepcopy(net).train()(to_torch(probe, dtype)).numpy()
        net.eval()
        eval_out = net(to_torch(probe, dtype)).numpy()
    if not (np.isfinite(train_out).all() and np.isfinite(eval_out).all()):
        raise SystemExit(f"{args.arch}: non-finite embeddings after {args.steps} steps")
    if args.onnx:
        torch.onnx.export(
            net,
            to_torch(probe[:1], dtype),
            stem + ".onnx",
            input_names=["data"],
            keep_initializers_as_inputs=False,
            opset_version=11,
            dynamo=False,
            dynamic_axes={"data": {0: "None"}},
        )
    np.save(stem + "_probe.npy", probe)
    np.save(stem + "_eval.npy", eval_out)
    np.save(stem + "_train.npy", train_out)
    meta = {
        "arch": args.arch,
        "built_with": how,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "steps": args.steps,
        "losses": losses,
        "seed": args.seed,
        "faces": args.faces or "random",
        "params": int(sum(p.numel() for p in net.parameters())),
        "normalisation": "(rgb - 127.5) / 127.5, NCHW",
    }
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
