"""Numerical parity of our backbones with arcface_torch's, on real faces.

Usage::

    python benchmarks/parity_arcface_torch.py                       # iresnet18 and mbf
    python benchmarks/parity_arcface_torch.py --arch mbf --json out.json
    FACEREC_TORCH_PYTHON=/path/to/python python benchmarks/parity_arcface_torch.py

Needs TensorFlow here and a Python with torch (``FACEREC_TORCH_PYTHON``, by default this
one): the torch side always runs in a subprocess, ``tests/torch_twin.py`` (twins of
arcface_torch's ``iresnet`` / ``mobilefacenet`` with the same state-dict names). For each
``--arch``:

1. **forward**: the twin takes ``--train-steps`` SGD steps on the faces (so weights and
   BatchNorm statistics are off their initial values), saves ``.pth`` and an eval-mode ONNX
   export; we import the ``.pth`` (:func:`facerec_tf.torch_import.load_arcface_torch_pth`) and
   the ONNX (:func:`facerec_tf.onnx_import.load_insightface_onnx`) and print
   max |ours - torch| / max |torch| of the embeddings in eval mode and in train mode (batch
   statistics).
2. **gradients**: from that ``.pth``, torch runs in **float64** (``--reference`` mode of the
   twin) and we in float32 (backbone without its preprocess layer, stem copied unscaled and
   fed torch's ``(x - 127.5) / 127.5``, so both parametrisations are identical). Loss heads
   (``--margin-gradient``, all three by default): ``none``, the softmax cross-entropy of
   ``embedding @ W`` for a fixed random ``W``; ``exact``, our ArcFace head (s 64, m 0.5, the
   columns of ``W`` as centres) with ``head.margin_gradient=exact`` against full-gradient
   ArcFace in torch; ``arcface_torch``, ours with ``head.margin_gradient=arcface_torch``
   against arcface_torch's ``CombinedMarginLoss`` (margin in place under ``no_grad``).
   Per layer: ||g_ours - g_torch|| / ||g_torch|| of the step-1 gradient, mapped onto our
   layout by :func:`facerec_tf.torch_import.keras_values`.
3. **steps**: the loss of each of ``--steps`` SGD steps (lr, momentum 0.9, coupled weight
   decay 5e-4, as torch's SGD), ours against torch's float64 run.

Parts 2-3 run our side twice, in float32 and in float64 (every layer but the ``features``
BatchNorm, which is float32 by design), and torch once more in float32: torch float32 against
torch float64 is the float32 rounding floor that ours-float32 should match, and ours-float64
shows that the mapping itself is exact.

Faces: ORL (``../shared/data/faces/orl``), ``--identities`` people x 2 images, 92x112 grey
resized bilinearly to 112x112 RGB (as ``../shared/tools/make_arcface_torch_fixtures.py``).

With both margin heads, each is also compared with the other's torch reference: how far
apart the two gradients are.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TWIN = ROOT / "tests" / "torch_twin.py"
ORL = ROOT.parent / "shared" / "data" / "faces" / "orl"
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
# A layer whose torch (float64) gradient norm is below this fraction of the largest layer's is
# zero in exact arithmetic (a BN shift followed by a train-mode BN): compared absolutely.
ZERO_GRADIENT = 1e-7


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["iresnet18", "mbf"], help="twin names")
    p.add_argument("--faces", default=str(ORL), help="ORL folder (s1..s40/N.pgm)")
    p.add_argument("--identities", type=int, default=8, help="people, 2 images each")
    p.add_argument("--train-steps", type=int, default=3, help="twin SGD steps before saving")
    p.add_argument("--steps", type=int, default=3, help="SGD steps compared")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument(
        "--margin-gradient",
        nargs="+",
        default=["none", "exact", "arcface_torch"],
        choices=sorted(HEADS),
        help="loss heads of the gradient and step comparison: plain softmax ('none'), ArcFace "
        "with head.margin_gradient=exact (against full-gradient ArcFace in torch) or "
        "=arcface_torch (against arcface_torch's CombinedMarginLoss)",
    )
    p.add_argument("--torch-python", default=os.environ.get("FACEREC_TORCH_PYTHON"))
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def orl_faces(folder: str, identities: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for i in range(identities):
        for k in (1, 2):
            path = os.path.join(folder, f"s{i + 1}", f"{k}.pgm")
            im = Image.open(path).convert("RGB").resize((112, 112), Image.BILINEAR)
            images.append(np.asarray(im, np.uint8))
            labels.append(i)
    return np.stack(images), np.array(labels, np.int64)


def run_twin(python: str, *args: str) -> dict:
    t = time.perf_counter()
    out = subprocess.run(
        [python, str(TWIN), *args], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if out.returncode != 0:
        raise SystemExit(f"torch twin failed ({' '.join(args)}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - t, 1)
    return result


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def norm_rel(a, b) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    b = np.asarray(b, np.float64)
    nb = float(np.linalg.norm(b))
    d = float(np.linalg.norm(np.asarray(a, np.float64) - b))
    return d / nb if nb else d


def softmax_head(embedding, labels, classifier):
    import tensorflow as tf

    logits = tf.matmul(embedding, tf.cast(classifier, embedding.dtype))
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )


def margin_head(margin_gradient):
    """ArcFace (s 64, m2 0.5) on the classifier's columns as class centres, our MarginHead
    with ``head.margin_gradient`` = ``margin_gradient``."""

    def head(embedding, labels, classifier):
        import tensorflow as tf

        from facerec_tf.heads import create_head

        layer = create_head("arcface", classifier.shape[1], margin_gradient=margin_gradient)
        layer.build((None, classifier.shape[0]))
        layer.centers.kernel.assign(tf.transpose(tf.cast(classifier, tf.float32)))
        logits = layer(tf.cast(embedding, tf.float32), labels, training=True)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        )

    return head


# --margin-gradient NAME -> (our loss head (embedding, labels, classifier) -> scalar, the twin's
# reference loss)
HEADS = {
    "none": (softmax_head, "softmax"),
    "exact": (margin_head("exact"), "arcface_exact"),
    "arcface_torch": (margin_head("arcface_torch"), "arcface_torch"),
}


def forward_parity(files: pathlib.Path, arch: str) -> dict:
    from facerec_tf.onnx_import import OnnxImportError, load_insightface_onnx
    from facerec_tf.torch_import import load_arcface_torch_pth

    ref_eval = np.load(files / f"{arch}_eval.npy")
    ref_train = np.load(files / f"{arch}_train.npy")
    probe = np.load(files / f"{arch}_probe.npy").astype(np.float32)
    model = load_arcface_torch_pth(files / f"{arch}.pth")
    result = {
        "pth_eval": rel(model(probe, training=False), ref_eval),
        "pth_train": rel(model(probe, training=True), ref_train),
    }
    try:
        onnx_model = load_insightface_onnx(files / f"{arch}.onnx")
        result["onnx_eval"] = rel(onnx_model(probe, training=False), ref_eval)
    except OnnxImportError as e:
        result["onnx_eval"] = f"not importable: {e.detail}"
    return result


def gradient_parity(
    pth, reference, faces, labels, classifier, head, steps, lr, dtype="float32"
) -> dict:
    import tensorflow as tf

    from facerec_tf.models import IResNetBackbone, create_backbone, list_backbones
    from facerec_tf.torch_import import (
        _infer,
        keras_values,
        load_arcface_torch_pth,
        read_torch_checkpoint,
    )

    state = read_torch_checkpoint(pth)
    name, kwargs = _infer(state, str(pth))  # the architecture of the file

    kwargs.update(include_preprocessing=False, dtype=dtype)
    if name in list_backbones():
        model = create_backbone(name, **kwargs)
    else:
        model = IResNetBackbone(name=name, **kwargs)
    load_arcface_torch_pth(pth, backbone=model, stem_scale=1.0)  # fed torch's input as is
    x = tf.constant(((faces.astype(np.float64) - 127.5) / 127.5).astype(dtype))
    y = tf.constant(labels.astype(np.int32))
    w = tf.constant(classifier.astype(dtype))
    torch_grads = {
        k[len("grad/") :]: reference[k] for k in reference.files if k.startswith("grad/")
    }
    grad_state = {k: torch_grads.get(k, np.zeros_like(v, np.float32)) for k, v in state.items()}
    grad_state = {k: v.astype(np.float32) for k, v in grad_state.items()}
    mapped = keras_values(grad_state, model, stem_scale=1.0)
    variables = model.trainable_variables
    buffers = [tf.Variable(tf.zeros_like(v)) for v in variables]
    forward = {
        "eval": rel(model(x, training=False), reference["eval"]),
        "train": rel(model(x, training=True), reference["train"]),
    }
    losses, per_layer, zero = [], {}, {}
    scale = max(float(np.linalg.norm(g)) for g in mapped.values())
    for step in range(steps):
        with tf.GradientTape() as tape:
            loss = head(model(x, training=True), y, w)
        grads = tape.gradient(loss, variables)
        if step == 0:
            for v, g in zip(variables, grads):
                ref = mapped[v.path]
                if np.linalg.norm(ref) < ZERO_GRADIENT * scale:  # e.g. a beta before a BN
                    zero[v.path] = float(np.linalg.norm(g.numpy() - ref)) / scale
                else:
                    per_layer[v.path] = norm_rel(g.numpy(), ref)
        for v, g, buf in zip(variables, grads, buffers):  # torch SGD: coupled decay, momentum
            g = g + WEIGHT_DECAY * v
            buf.assign(g if step == 0 else MOMENTUM * buf + g)
            v.assign_sub(lr * buf)
        losses.append(float(loss))
    worst = sorted(per_layer.items(), key=lambda kv: -kv[1])[:3]
    values = np.array(list(per_layer.values()))
    return {
        "grad_rel_median": float(np.median(values)),
        "grad_rel_max": float(values.max()),
        "grad_worst_layers": [[k, round(v, 8)] for k, v in worst],
        "layers": len(per_layer),
        "zero_gradient_layers": len(zero),
        "zero_gradient_max_over_scale": max(zero.values(), default=0.0),
        "forward_vs_torch_fp64": forward,
        "losses_ours": losses,
        "losses_torch": reference["losses"].tolist(),
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"])],
    }


def out_keys(reference) -> list[str]:
    return [k for k in reference.files if k.startswith("grad/")]


def torch_float32_floor(ref32, ref64, grad_keys: list[str]) -> dict:
    """torch float32 against torch float64 on the same run: the float32 rounding floor."""
    scale = max(float(np.linalg.norm(ref64[k])) for k in grad_keys)
    rels = [
        norm_rel(ref32[k], ref64[k])
        for k in grad_keys
        if np.linalg.norm(ref64[k]) >= ZERO_GRADIENT * scale
    ]
    return {
        "forward_eval": rel(ref32["eval"], ref64["eval"]),
        "forward_train": rel(ref32["train"], ref64["train"]),
        "grad_rel_median": float(np.median(rels)),
        "grad_rel_max": float(np.max(rels)),
        "losses": ref32["losses"].tolist(),
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(ref32["losses"], ref64["losses"])],
    }


def report_forward(arch: str, params: int, fwd: dict) -> None:
    onnx = fwd["onnx_eval"]
    print(f"\n== {arch} ({params:,} parameters)")
    print(
        "forward vs torch float32, max|ours - torch| / max|torch|: "
        f".pth eval {fwd['pth_eval']:.1e}, .pth train {fwd['pth_train']:.1e}, ONNX eval "
        + (f"{onnx:.1e}" if isinstance(onnx, float) else onnx)
    )


def report(head: str, torch_loss: str, runs: dict, floor: dict) -> None:
    print(f"-- loss head: ours --margin-gradient {head}, torch {torch_loss}")
    for dtype, g in runs.items():
        f = g["forward_vs_torch_fp64"]
        print(
            f"ours {dtype} vs torch float64: forward eval {f['eval']:.1e}, train {f['train']:.1e}; "
            f"step-1 gradients ||diff|| / ||torch|| over {g['layers']} variables: median "
            f"{g['grad_rel_median']:.1e}, max {g['grad_rel_max']:.1e} "
            f"({', '.join(f'{k} {v:.1e}' for k, v in g['grad_worst_layers'][:2])}); "
            f"{g['zero_gradient_layers']} variables with zero exact gradient, "
            f"max ||diff|| / largest layer gradient {g['zero_gradient_max_over_scale']:.1e}"
        )
        losses = ", ".join(
            f"{a:.6f} / {b:.6f} ({r:.0e})"
            for a, b, r in zip(g["losses_ours"], g["losses_torch"], g["loss_rel"])
        )
        print(f"    per-step loss ours / torch (relative difference): {losses}")
    print(
        f"torch float32 vs torch float64 (the float32 floor): forward eval "
        f"{floor['forward_eval']:.1e}, train {floor['forward_train']:.1e}; step-1 gradients "
        f"median {floor['grad_rel_median']:.1e}, max {floor['grad_rel_max']:.1e}; per-step loss "
        + ", ".join(f"{r:.0e}" for r in floor["loss_rel"])
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    python = args.torch_python or sys.executable
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, check=False)
    if check.returncode != 0:
        print(f"error: torch is not importable by {python} (set FACEREC_TORCH_PYTHON)")
        return 2
    if not os.path.isdir(args.faces):
        print(f"error: ORL faces not found at {args.faces}")
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    faces, labels = orl_faces(args.faces, args.identities)
    rng = np.random.default_rng(0)
    results = {"load_average": os.getloadavg(), "faces": len(faces), "archs": {}}
    print(
        f"{len(faces)} ORL faces of {args.identities} people; load average "
        f"{os.getloadavg()[0]:.1f}; loss head: {args.margin_gradient}; SGD lr {args.lr}, "
        f"momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}"
    )
    with tempfile.TemporaryDirectory(prefix="parity_arcface_torch_") as tmp:
        face_file = os.path.join(tmp, "faces.npy")
        np.save(face_file, faces)
        for arch in args.arch:
            out = os.path.join(tmp, arch)
            twin = run_twin(
                python,
                "--arch",
                arch,
                "--out",
                out,
                "--faces",
                face_file,
                "--steps",
                str(args.train_steps),
                "--threads",
                str(args.threads),
            )
            fwd = forward_parity(pathlib.Path(out), arch)
            emb = 512
            classifier = rng.normal(0, 0.05, size=(emb, args.identities))
            pth = os.path.join(out, f"{arch}.pth")
            entry = {"params": twin["params"], "forward_vs_torch_fp32": fwd, "heads": {}}
            references = {}
            report_forward(arch, twin["params"], fwd)
            for head in args.margin_gradient:
                ours, torch_loss = HEADS[head]
                refs = {}
                for ref_dtype in ("float64", "float32"):
                    spec = os.path.join(tmp, f"{arch}_{head}_{ref_dtype}.npz")
                    np.savez(
                        spec,
                        faces=faces,
                        labels=labels,
                        classifier=classifier,
                        lr=args.lr,
                        momentum=MOMENTUM,
                        weight_decay=WEIGHT_DECAY,
                        steps=args.steps,
                        float32=ref_dtype == "float32",
                        loss=torch_loss,
                    )
                    ref = run_twin(python, "--arch", arch, "--out", out, "--pth", pth,
                                   "--reference", spec, "--threads", str(args.threads))  # fmt: skip
                    refs[ref_dtype] = np.load(ref["reference"])
                reference = references[head] = refs["float64"]
                floor = torch_float32_floor(refs["float32"], reference, out_keys(reference))
                runs = {
                    dtype: gradient_parity(
                        pth,
                        reference,
                        faces,
                        labels,
                        classifier,
                        ours,
                        args.steps,
                        args.lr,
                        dtype=dtype,
                    )
                    for dtype in ("float32", "float64")
                }
                entry["heads"][head] = {
                    "torch_loss": torch_loss,
                    "ours_float32_vs_torch_float64": runs["float32"],
                    "ours_float64_vs_torch_float64": runs["float64"],
                    "torch_float32_vs_torch_float64": floor,
                }
                report(head, torch_loss, runs, floor)
            if {"exact", "arcface_torch"} <= set(references):
                # each mode against the other mode's reference: how far apart the two are
                cross = {
                    f"ours {a} vs torch {HEADS[b][1]}": gradient_parity(
                        pth,
                        references[b],
                        faces,
                        labels,
                        classifier,
                        HEADS[a][0],
                        1,
                        args.lr,
                        dtype="float64",
                    )["grad_rel_median"]
                    for a, b in (("exact", "arcface_torch"), ("arcface_torch", "exact"))
                }
                entry["cross"] = cross
                print(
                    "the two margin gradients apart (step-1 gradients, ours float64, median "
                    "||diff|| / ||torch||): " + "; ".join(f"{k} {v:.1e}" for k, v in cross.items())
                )
            results["archs"][arch] = entry
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
