#!/usr/bin/env python
"""evaluate.py: verification of a face-embedding model with insightface-exact metrics.

A thin wrapper over :mod:`facerec_tf.evaluation`: load the model, read the targets, embed
(with flip test-time augmentation unless ``--no-flip``), print insightface's lines plus
VAL@FAR, AUC, EER and TAR@FAR, optionally write a JSON report and ROC plots.
Bad input (missing model, malformed .bin, wrongly sized image, empty pairs list...) ends with
one ``evaluate.py: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from facerec_tf.cli import VERBOSE_HELP, quiet_tensorflow

EXAMPLES = """\
examples:
  # insightface targets with a trained run (best/backbone.keras, else export/backbone.keras)
  python evaluate.py --model runs/r50 --bin data/lfw.bin data/cfp_fp.bin data/agedb_30.bin

  # a .keras backbone on the Yale pairs shipped with the test data, JSON report + ROC plots
  python evaluate.py --model backbone.keras --bin ../shared/data/rec/yale_pairs_py2.bin \\
      --report report.json --plot-dir plots

  # your own images: an LFW-style pairs.txt ("name i j" / "name1 i name2 j") over
  # DIR/name/name_0001.jpg aligned 112x112 crops; SavedModel or ONNX models work the same
  python evaluate.py --model export/saved_model --pairs pairs.txt --images lfw-112x112
  python evaluate.py --model w600k_r50.onnx --bin lfw.bin --no-flip --batch-size 32

  # MagFace: also print each target's feature-norm distribution (the quality score)
  python evaluate.py --model runs/magface --bin lfw.bin --quality

  # PFE: score pairs with the mutual likelihood score (run dir with export/pfe.keras)
  python evaluate.py --model runs/pfe --bin lfw.bin --pfe

  # IJB-C 1:1 verification (meta/ijbc_face_tid_mid.txt, ijbc_template_pair_label.txt and
  # optional ijbc_name_5pts_score.txt; images already aligned to the model's input size)
  python evaluate.py --model runs/r50 --ijb-meta IJBC/meta --ijb-images IJBC/aligned \\
      --ijb-name IJBC --report ijbc.json

models: .keras file | SavedModel dir | training run dir | .onnx (ours NHWC 0..255, or
insightface's NCHW (x-127.5)/127.5, told apart by the input shape)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a face-embedding model on insightface .bin verification sets,\n"
        "LFW-style pairs lists and IJB-style template sets: insightface-exact accuracy and\n"
        "VAL@FAR=1e-3, plus AUC, EER and TAR@FAR.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help=".keras file, SavedModel dir, training run dir or .onnx file",
    )
    p.add_argument(
        "--bin",
        nargs="+",
        default=[],
        metavar="FILE",
        help="insightface verification .bin files (target name = file stem)",
    )
    p.add_argument("--pairs", metavar="PAIRS.txt", help="LFW-style pairs list (needs --images)")
    p.add_argument(
        "--images", metavar="DIR", help="image folder of --pairs: DIR/name/name_%%04d.jpg"
    )
    p.add_argument(
        "--no-flip",
        action="store_true",
        help="do not add the embedding of the mirrored image (flip is the default)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="images per model call (default 64)"
    )
    p.add_argument(
        "--quality",
        action="store_true",
        help="print the feature norms of each target's images (MagFace quality scores)",
    )
    p.add_argument(
        "--pfe",
        action="store_true",
        help="the model is a PFE model (images -> [embedding, log variance]; a run dir means "
        "its export/pfe.keras): score pairs with the mutual likelihood score",
    )
    p.add_argument("--report", metavar="REPORT.json", help="write a JSON report here")
    p.add_argument("--plot-dir", metavar="DIR", help="write <target>_roc.png files here")
    p.add_argument("--ijb-meta", metavar="DIR", help="folder of the IJB meta files")
    p.add_argument("--ijb-images", metavar="DIR", help="folder of the aligned IJB images")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument(
        "--ijb-name",
        default="IJBC",
        metavar="NAME",
        help="IJB target: meta files are <name lower-cased>_*.txt (default IJBC)",
    )
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not (args.bin or args.pairs or args.ijb_meta):
        parser.error("nothing to evaluate: give --bin, --pairs/--images or --ijb-meta/--ijb-images")
    if bool(args.pairs) != bool(args.images):
        parser.error("--pairs and --images go together")
    if bool(args.ijb_meta) != bool(args.ijb_images):
        parser.error("--ijb-meta and --ijb-images go together")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.pfe and args.ijb_meta:
        parser.error("--pfe scores .bin and --pairs targets, not IJB templates")


def _check_pairs(name: str, source: str, issame, folds: int = 10) -> None:
    """Raise on sets the 10-fold protocol cannot evaluate; warn on folds with one kind of
    pair (VAL@FAR is then NaN on that fold; insightface would divide by zero)."""
    import numpy as np
    from sklearn.model_selection import KFold

    from facerec_tf.errors import DataFormatError

    flags = np.asarray(issame, bool)
    n, same = len(flags), int(flags.sum())
    if n < folds:
        raise DataFormatError(
            f"{n} pairs for target {name!r}",
            path=source,
            expected=f"at least {folds} pairs (10-fold protocol)",
        )
    if same == 0 or same == n:
        kind = "same-person" if same else "different-person"
        raise DataFormatError(
            f"all {n} pairs of target {name!r} are {kind} pairs",
            path=source,
            expected="both same-person and different-person pairs",
        )
    split = KFold(n_splits=folds, shuffle=False).split(flags)
    one_kind = [
        k for k, (_, test) in enumerate(split) if flags[test].all() or not flags[test].any()
    ]
    if one_kind:
        print(
            f"evaluate.py: warning: {source}: folds {one_kind} (of {folds} consecutive slices "
            "of the list) hold only one kind of pair, so VAL@FAR is undefined there; list "
            "same and different pairs in every tenth of the file, as LFW's pairs.txt does",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    """Evaluate every target; raises FacerecError on bad input."""
    import numpy as np

    from facerec_tf.data.verification_bin import decode_pairs, load_bin
    from facerec_tf.errors import DataFormatError
    from facerec_tf.evaluation import ijb, models, report, verification

    flip = not args.no_flip
    # 1. Cheap checks of every input before the model (and TensorFlow) is loaded.
    models.resolve_model_path(args.model)
    sets = [load_bin(path) for path in args.bin]
    targets: list[tuple[str, str, object]] = [(s.name, s.path, s) for s in sets]
    if args.pairs:
        pair_list = verification.read_pairs_txt(args.pairs, args.images)
        name = os.path.splitext(os.path.basename(args.pairs))[0]
        targets.append((name, args.pairs, pair_list))
    names = [t[0] for t in targets] + ([args.ijb_name.lower()] if args.ijb_meta else [])
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataFormatError(
            f"several targets are named {duplicates[0]!r}", expected="distinct file stems"
        )
    for name, source, content in targets:
        issame = content.issame if hasattr(content, "issame") else [p[2] for p in content]
        _check_pairs(name, source, issame)
    if args.ijb_meta:
        ijb.load_ijb_meta(args.ijb_meta, args.ijb_name)  # validate before the model loads

    # 2. The model.
    if args.pfe:
        model = models.load_pfe_model(args.model)
    else:
        model = models.load_embedding_model(args.model)
    size = model.input_size or (112, 112)
    print(f"model: {model.description}", flush=True)
    if model.normalized_output:
        print(
            "note: the model returns L2-normalised embeddings: XNorm is 1 and the flip test "
            "sums two unit vectors before normalising",
            flush=True,
        )

    # 3. Targets.
    results = []
    qualities: dict[str, dict] = {}
    for name, _, content in targets:
        start = time.perf_counter()
        if hasattr(content, "issame"):
            images, issame = decode_pairs(content, image_size=size), content.issame
        else:
            files = [f for a, b, _ in content for f in (a, b)]
            images = models.load_images(files, size)
            issame = np.array([p[2] for p in content], bool)
        emb, flipped = verification.embed_pairs(
            model, images, args.batch_size, flip=flip, progress=True
        )
        if args.pfe:
            from facerec_tf.evaluation.quality import evaluate_pfe

            d = model.embedding_size
            result = evaluate_pfe(
                name,
                emb[:, :d],
                emb[:, d:],
                issame,
                None if flipped is None else flipped[:, :d],
                None if flipped is None else flipped[:, d:],
            )
            emb = emb[:, :d]
        else:
            result = verification.evaluate_embeddings(name, emb, flipped, issame)
        results.append(result)
        for line in result.lines():
            print(line)
        if args.quality:
            from facerec_tf.evaluation.quality import feature_norms, summarize_quality

            summary = summarize_quality(name, feature_norms(emb))
            qualities[name] = summary.to_dict()
            print(summary.line().replace("] quality", "] quality (feature norm)"))
        print(
            f"[{name}][0]Time: {time.perf_counter() - start:.1f} s for {len(images)} images"
            f"{' (+ flips)' if flip else ''}",
            flush=True,
        )
    if args.ijb_meta:
        start = time.perf_counter()
        result = ijb.evaluate_ijb_folder(
            model,
            args.ijb_meta,
            args.ijb_images,
            args.ijb_name,
            batch_size=args.batch_size,
            flip=flip,
            progress=True,
        )
        results.append(result)
        for line in result.lines():
            print(line)
        print(f"[{result.name}][0]Time: {time.perf_counter() - start:.1f} s", flush=True)

    # 4. Outputs.
    if args.report:
        meta = {
            "model": model.path,
            "model_description": model.description,
            "normalized_output": model.normalized_output,
            "flip": flip,
            "pfe": bool(args.pfe),
        }
        if qualities:
            meta["quality"] = qualities
        report.write_report(args.report, results, meta=meta)
        print(f"report: {args.report}")
    if args.plot_dir:
        for path in report.plot_rocs(results, args.plot_dir):
            print(f"plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    quiet_tensorflow(args.verbose)
    from facerec_tf.errors import FacerecError
    from facerec_tf.evaluation import models

    if args.verbose:
        models.ONNXRUNTIME_LOG_SEVERITY = 2

    try:
        return run(args)
    except FacerecError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
