"""Fine-tuning a pretrained MobileFaceNet on real faces: before, after, and from scratch.

What it measures (all with ``train.py`` and ``evaluate.py``'s library code, on the real faces
in ``../shared/data``):

1. **pretrain** (skipped with ``--pretrained FILE``): a MobileFaceNet (arcface_torch ``mbf``)
   trained from scratch on a stand-in for a model-zoo dataset made from the Yale faces: 240
   identities, the 15 Yale subjects plus each subject under 15 fixed smooth geometric warps
   (face proportions changed, so a new face), 11 images each in 3 jittered copies (small shift,
   rotation and zoom); 112x112 crops framed like ORL's.
2. ORL faces (40 identities, 10 images each, 92x112 grey resized to 112x112): identities
   s1-s30 form the fine-tuning set; s31-s40 are **held out** and only ever appear in the
   verification pairs ``orl_holdout.bin`` (every same-identity pair, 450, and 450 random
   different-identity pairs). No ORL image is seen in pre-training.
3. **before**: the pretrained model on ``orl_holdout``.
4. **finetune**: ``train.py --config finetune --set model.pretrained=PRETRAINED`` on the 30
   identities (the preset's recipe; ``--finetune-set KEY=VALUE ...`` adds overrides).
5. **scratch**: the same steps, batch, head and schedule from random weights
   (``model.backbone=mobilefacenet``, the full learning rate from the first step).

Prints the 10-fold accuracy and VAL@FAR=1e-3 on the held-out pairs for each. Run::

    python benchmarks/finetune_real_faces.py [--workdir DIR] [--steps 150]
        [--pretrain-steps 800] [--pretrained w600k_mbf.onnx] [--finetune-set KEY=VALUE ...]

With ``--workdir`` finished phases are kept and reused (a run's folder names its steps, batch
and overrides). MobileFaceNet trains at about 25 images/s on 2 idle CPU cores (``train.py``'s
log), so the 800 pre-training steps of 64 images take about 35 minutes and each 150-step run
of 32 about 3.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import pathlib
import random
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FACEREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _orl_jpeg(path: pathlib.Path) -> bytes:
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((112, 112), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# Yale images are 320x243 with the head roughly centred; this box frames it like ORL's 92x112.
YALE_FACE_BOX = (80, 30, 240, 225)


def _identity_warp(rng, size: int):
    """A fixed change of face proportions: anisotropic scale and a smooth 4x4 displacement
    field (about 3.5 px)."""
    from scipy import ndimage

    scale = rng.uniform(0.88, 1.12, 2)
    field = np.stack([ndimage.zoom(g, size / 4, order=3) for g in rng.normal(0.0, 3.5, (2, 4, 4))])
    return scale, field


def _render(face, warp, rng):
    """One jittered view (shift +-3 px, rotation +-5 degrees, zoom +-5%) of a warped face."""
    from scipy import ndimage

    size = face.shape[0]
    (sx, sy), field = warp
    angle = np.deg2rad(rng.uniform(-5.0, 5.0))
    zoom = rng.uniform(0.95, 1.05)
    ty, tx = rng.uniform(-3.0, 3.0, 2)
    centre = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - centre
    cos, sin = np.cos(angle), np.sin(angle)
    y = (cos * yy - sin * xx) * sy * zoom + ty + field[0] + centre
    x = (sin * yy + cos * xx) * sx * zoom + tx + field[1] + centre
    out = ndimage.map_coordinates(face, [y, x], order=1, mode="reflect")
    return np.clip(out, 0, 255).astype(np.uint8)


def prepare_pretraining(work: pathlib.Path, warps: int, copies: int, seed: int) -> pathlib.Path:
    """The pre-training stand-in: every Yale subject as itself and under ``warps - 1`` fixed
    geometric warps (each a new identity), ``copies`` jittered views of each image; converted
    to TFRecords. Returns the TFRecord folder."""
    from PIL import Image

    yale = SHARED / "faces" / "yale"
    subjects = sorted({p.name.split(".")[0] for p in yale.glob("subject*")})
    rng = np.random.default_rng(seed)
    folder = work / "pretrain_images"
    size = 112
    for subject in subjects:
        faces = [
            np.asarray(
                Image.open(path)
                .convert("L")
                .crop(YALE_FACE_BOX)
                .resize((size, size), Image.BILINEAR),
                np.float32,
            )
            for path in sorted(yale.glob(subject + ".*"))
        ]
        for j in range(warps):
            warp = ((1.0, 1.0), np.zeros((2, size, size))) if j == 0 else _identity_warp(rng, size)
            out = folder / f"{subject}_w{j:02d}"
            out.mkdir(parents=True, exist_ok=True)
            for i, face in enumerate(faces):
                for k in range(copies):
                    image = Image.fromarray(_render(face, warp, rng)).convert("RGB")
                    image.save(out / f"{i:02d}_{k}.jpg", quality=95)
    tfrecords = work / "pretrain_data"
    _convert(folder, tfrecords, shards=4)
    return tfrecords


def _convert(source: pathlib.Path, output: pathlib.Path, shards: int) -> None:
    tool = ROOT / "tools" / "convert_rec_to_tfrecord.py"
    _run(
        [
            sys.executable,
            str(tool),
            str(source),
            str(output),
            "--num-shards",
            str(shards),
            "--no-progress",
        ]
    )


def prepare_orl(work: pathlib.Path, train_ids: int, seed: int) -> pathlib.Path:
    """Image folder of the first ``train_ids`` ORL identities, converted to TFRecords, plus
    ``orl_holdout.bin`` of the others. Returns the TFRecord folder."""
    from facerec_tf.data.verification_bin import write_bin

    orl = SHARED / "faces" / "orl"
    subjects = sorted((p for p in orl.iterdir() if p.is_dir()), key=lambda p: int(p.name[1:]))
    folder = work / "orl_train_images"
    for subject in subjects[:train_ids]:
        out = folder / subject.name
        out.mkdir(parents=True, exist_ok=True)
        for image in sorted(subject.glob("*.pgm")):
            (out / f"{image.stem}.jpg").write_bytes(_orl_jpeg(image))
    tfrecords = work / "orl_train"
    _convert(folder, tfrecords, shards=2)
    held = {s.name: [_orl_jpeg(p) for p in sorted(s.glob("*.pgm"))] for s in subjects[train_ids:]}
    rng = random.Random(seed)
    same = [(a, b) for imgs in held.values() for a, b in itertools.combinations(imgs, 2)]
    names = sorted(held)
    different = []
    while len(different) < len(same):
        x, y = rng.sample(names, 2)
        different.append((rng.choice(held[x]), rng.choice(held[y])))
    pairs = [(a, b, True) for a, b in same] + [(a, b, False) for a, b in different]
    rng.shuffle(pairs)  # 10 folds, each with both kinds
    images = [img for a, b, _ in pairs for img in (a, b)]
    write_bin(tfrecords / "orl_holdout.bin", images, [s for _, _, s in pairs])
    return tfrecords


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train(output: pathlib.Path, config: str, data: pathlib.Path, sets: list[str]) -> None:
    overrides = [arg for item in sets for arg in ("--set", item)]
    _run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            config,
            "--data",
            str(data),
            "--output",
            str(output),
            *overrides,
        ]
    )


def evaluate(model: pathlib.Path, bin_path: pathlib.Path) -> tuple[float, float, float]:
    from facerec_tf.data.verification_bin import decode_pairs, load_bin
    from facerec_tf.evaluation.models import load_embedding_model
    from facerec_tf.evaluation.verification import embed_pairs, evaluate_embeddings

    embedder = load_embedding_model(model)
    vset = load_bin(bin_path)
    images = decode_pairs(vset, image_size=(112, 112))
    emb, flipped = embed_pairs(embedder, images, batch_size=32, flip=True)
    r = evaluate_embeddings("orl_holdout", emb, flipped, vset.issame)
    return r.accuracy, r.accuracy_std, r.val_at_far_1e3


def _exported(run: pathlib.Path) -> pathlib.Path:
    return run / "export" / "backbone.keras"


def _folder_name(overrides: list[str]) -> str:
    """``optimizer.backbone_lr_mult=0.3`` -> ``_backbone_lr_mult-0.3``."""
    parts = (item.partition("=") for item in overrides)
    return "".join(f"_{key.rsplit('.', 1)[-1]}-{value}" for key, _, value in parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="keep the data and runs here (default: a temp folder)")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument(
        "--pretrained",
        help="fine-tune this model-zoo file (.onnx, .pth, .keras) instead of the stand-in",
    )
    p.add_argument("--steps", type=int, default=150, help="fine-tuning and scratch steps")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning and scratch batch")
    p.add_argument(
        "--finetune-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for the fine-tuning run (e.g. optimizer.backbone_lr_mult=0.3)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (SHARED / "faces" / "orl").is_dir():
        print(f"error: real faces not found at {SHARED}", file=sys.stderr)
        return 2
    if args.pretrained and not pathlib.Path(args.pretrained).exists():
        print(f"error: {args.pretrained}: no such file", file=sys.stderr)
        return 2
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="facerec_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    orl = work / "orl_train"
    if not (orl / "orl_holdout.bin").exists():
        orl = prepare_orl(work, 30, args.seed)
    common = [
        "data.verification_targets=[orl_holdout]",
        f"data.verification_dir={orl}",
        "runtime.log_every=25",
        f"runtime.seed={args.seed}",
    ]
    from_scratch = [
        "model.backbone=mobilefacenet",
        "model.embedding_size=512",
        "optimizer.backbone_lr_mult=1",
        "optimizer.freeze_backbone_epochs=0",
    ]
    if args.pretrained:
        pretrained = before = pathlib.Path(args.pretrained).resolve()
        before_label = f"{pretrained.name} (before fine-tuning)"
    else:
        pretrained = work / f"pretrain_{args.pretrain_steps}"
        before = _exported(pretrained)
        before_label = f"stand-in, {args.pretrain_steps} steps (before fine-tuning)"
        if not before.exists():
            data = work / "pretrain_data"
            if not (data / "manifest.json").exists():
                data = prepare_pretraining(work, warps=16, copies=3, seed=args.seed)
            train(
                pretrained,
                "finetune",
                data,
                [
                    *common,
                    *from_scratch,
                    "data.batch_size=64",
                    f"schedule.total_steps={args.pretrain_steps}",
                    # prints the held-out accuracy as it learns; "before" is the final model
                    "runtime.verify_every=200",
                ],
            )
    steps = [
        f"data.batch_size={args.batch_size}",
        f"schedule.total_steps={args.steps}",
        "runtime.verify_every=0",  # the held-out pairs are scored once, at the end
    ]
    run = f"{args.steps}x{args.batch_size}"
    finetune = work / f"finetune_{run}{_folder_name(args.finetune_set)}"
    if args.pretrained:
        finetune = finetune.with_name(finetune.name + "_" + pretrained.stem)
    scratch = work / f"scratch_{run}"
    if not _exported(finetune).exists():
        train(
            finetune,
            "finetune",
            orl,
            [*common, *steps, f"model.pretrained={pretrained}", *args.finetune_set],
        )
    if not _exported(scratch).exists():
        train(scratch, "finetune", orl, [*common, *steps, *from_scratch])
    holdout = orl / "orl_holdout.bin"
    print(f"\nheld-out ORL identities s31-s40, {holdout} (10-fold):")
    print(f"{'model':<52} {'accuracy':>17} {'VAL@FAR=1e-3':>13}")
    for label, model in (
        (before_label, before),
        (f"fine-tuned on ORL s1-s30 ({args.steps} steps)", _exported(finetune)),
        (f"from scratch on ORL s1-s30 ({args.steps} steps)", _exported(scratch)),
    ):
        acc, std, val = evaluate(model, holdout)
        print(f"{label:<52} {acc:.4f} +- {std:.4f} {val:>13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
