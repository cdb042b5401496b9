"""Fine-tuning a pretrained MobileFaceNet on real faces: before, after, and from scratch.

What it measures (all with ``train.py`` and ``evaluate.py``'s library code, on the real faces
in ``../shared/data``):

1. **pretrain**: a MobileFaceNet (arcface_torch ``mbf``) trained from scratch on the Yale
   faces (15 identities, ``../shared/data/rec/yale112``, converted with
   ``tools/convert_rec_to_tfrecord.py``). This stands in for a model-zoo network.
2. ORL faces (40 identities, 10 images each, 92x112 grey resized to 112x112): identities
   s1-s30 form the fine-tuning set; s31-s40 are **held out** and only ever appear in the
   verification pairs ``orl_holdout.bin`` (every same-identity pair, 450, and 450 random
   different-identity pairs).
3. **before**: the pretrained model on ``orl_holdout``.
4. **finetune**: ``train.py --config finetune --set model.pretrained=PRETRAIN_RUN`` on the 30
   identities (head-only warm-up, then the backbone at a tenth of the learning rate).
5. **scratch**: the same number of steps, same head and schedule, from random weights
   (``model.backbone=mobilefacenet``, full learning rate, no warm-up).

Prints the 10-fold accuracy and VAL@FAR=1e-3 on the held-out pairs for each. Run::

    python benchmarks/finetune_real_faces.py [--workdir DIR] [--steps 150] [--pretrain-steps 300]

A few minutes per phase on 2 CPU cores.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FACEREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _orl_jpeg(path: pathlib.Path) -> bytes:
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((112, 112), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


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
    _run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_rec_to_tfrecord.py"),
            str(folder),
            str(tfrecords),
            "--num-shards",
            "2",
            "--no-progress",
        ]
    )
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="keep the data and runs here (default: a temp folder)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning and scratch steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (SHARED / "faces" / "orl").is_dir():
        print(f"error: real faces not found at {SHARED}", file=sys.stderr)
        return 2
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="facerec_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    yale = work / "yale_train"
    if not (yale / "manifest.json").exists():
        _run(
            [
                sys.executable,
                str(ROOT / "tools" / "convert_rec_to_tfrecord.py"),
                str(SHARED / "rec" / "yale112"),
                str(yale),
                "--num-shards",
                "2",
                "--no-progress",
            ]
        )
    orl = work / "orl_train"
    if not (orl / "orl_holdout.bin").exists():
        orl = prepare_orl(work, 30, args.seed)
    b = args.batch_size
    common = [
        f"data.batch_size={b}",
        "data.verification_targets=[orl_holdout]",
        f"data.verification_dir={orl}",
        "runtime.verify_every=0",
        "runtime.log_every=25",
        f"runtime.seed={args.seed}",
    ]
    pretrain = work / "pretrain"
    if not (pretrain / "export" / "backbone.keras").exists():
        train(
            pretrain,
            "finetune",
            yale,
            [
                *common,
                "model.backbone=mobilefacenet",
                "model.embedding_size=512",
                "optimizer.backbone_lr_mult=1",
                "optimizer.freeze_backbone_epochs=0",
                f"schedule.total_steps={args.pretrain_steps}",
            ],
        )
    finetune, scratch = work / f"finetune_{args.steps}", work / f"scratch_{args.steps}"
    if not (finetune / "export" / "backbone.keras").exists():
        train(
            finetune,
            "finetune",
            orl,
            [*common, f"model.pretrained={pretrain}", f"schedule.total_steps={args.steps}"],
        )
    if not (scratch / "export" / "backbone.keras").exists():
        train(
            scratch,
            "finetune",
            orl,
            [
                *common,
                "model.backbone=mobilefacenet",
                "model.embedding_size=512",
                "optimizer.backbone_lr_mult=1",
                "optimizer.freeze_backbone_epochs=0",
                f"schedule.total_steps={args.steps}",
            ],
        )
    holdout = orl / "orl_holdout.bin"
    print(f"\nheld-out ORL identities s31-s40, {holdout} (10-fold):")
    print(f"{'model':<44} {'accuracy':>17} {'VAL@FAR=1e-3':>13}")
    for label, run in (
        (f"pretrained on Yale ({args.pretrain_steps} steps)", pretrain),
        (f"fine-tuned on ORL s1-s30 ({args.steps} steps)", finetune),
        (f"from scratch on ORL s1-s30 ({args.steps} steps)", scratch),
    ):
        acc, std, val = evaluate(run / "export" / "backbone.keras", holdout)
        print(f"{label:<44} {acc:.4f} +- {std:.4f} {val:>13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
