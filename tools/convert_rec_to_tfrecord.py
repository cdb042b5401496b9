#!/usr/bin/env python3
"""Convert an insightface ``.rec`` dataset (or an image-folder tree) into TFRecord shards.

Thin command-line wrapper over :mod:`facerec_tf.data.convert`; run ``--help`` for examples.
Does not import TensorFlow.

Exit status: 0 on success, 2 on bad input or bad options (the typed error, naming the file,
byte offset and key, is printed on stderr), 1 on any other failure, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

EPILOG = """\
examples:
  # insightface dataset folder (train.rec + train.idx + property) -> 16 shards
  python tools/convert_rec_to_tfrecord.py ~/datasets/faces_emore /data/emore_tfr --num-shards 16

  # a .rec file, ~256 MB shards, 4 worker processes, drop identities with < 10 images
  python tools/convert_rec_to_tfrecord.py ~/faces_webface_112x112/train.rec out/ \\
      --shard-size 256 --workers 4 --images-filter 10 --seed 7

  # an image folder with one sub-folder per identity (CASIA-WebFace style)
  python tools/convert_rec_to_tfrecord.py ~/CASIA-WebFace out/casia --num-shards 32

  # re-check a conversion: framing, CRCs, counts and sha256 of every shard
  python tools/convert_rec_to_tfrecord.py --verify /data/emore_tfr

The same INPUT, --seed and options always give byte-identical shards and manifest.json
(whatever --workers). A killed conversion can simply be run again. On bad input the
conversion stops with an error naming the file, byte offset and record key, and leaves no
shard, temp file or manifest in OUTPUT_DIR.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_rec_to_tfrecord.py",
        description=(
            "Convert an MXNet RecordIO face dataset (insightface or im2rec layout) or an "
            "image folder (one sub-folder per identity) into globally shuffled TFRecord "
            "shards plus manifest.json. JPEG bytes are copied untouched."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        nargs="?",
        metavar="INPUT",
        help="a .rec file, a folder with train.rec/train.idx[/property], or an image folder",
    )
    p.add_argument("output", nargs="?", metavar="OUTPUT_DIR", help="folder for the shards")
    p.add_argument(
        "--verify",
        metavar="OUTPUT_DIR",
        help="verify an existing conversion against its manifest.json instead of converting",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-shards", type=int, metavar="N", help="number of shards")
    size.add_argument(
        "--shard-size",
        type=float,
        metavar="MB",
        help="target shard size in MiB (default 256 when --num-shards is not given)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument(
        "--images-filter",
        type=int,
        default=0,
        metavar="N",
        help="drop identities with fewer than N images and relabel the rest 0.. (default 0)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        metavar="W",
        help="parallel writer processes (default min(4, CPUs)); does not change the output",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "insightface", "flat"),
        default="auto",
        help=".rec layout (default auto-detect)",
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        default=4096,
        metavar="PX",
        help="reject images whose JPEG header claims more pixels on a side (default 4096)",
    )
    p.add_argument(
        "--allow-mixed-sizes",
        action="store_true",
        help="accept images of different sizes (default: all must match property / the first)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.input is not None:
            parser.error("--verify takes only OUTPUT_DIR")
    elif args.input is None or args.output is None:
        parser.error("INPUT and OUTPUT_DIR are required (or --verify OUTPUT_DIR)")

    try:
        import facerec_tf  # noqa: F401
    except ImportError:  # run from a checkout whose package is not installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from facerec_tf.cli import run_main
    from facerec_tf.data.convert import ReencodeWarning, convert, verify_output
    from facerec_tf.errors import DataFormatError

    progress = False if args.no_progress else None

    def body() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReencodeWarning)
            if args.verify is not None:
                m = verify_output(args.verify, progress=progress)
                print(
                    f"OK: {len(m['shards'])} shards, {m['num_images']} images, "
                    f"{m['num_classes']} classes verified in {args.verify}"
                )
                return 0
            m = convert(
                args.input,
                args.output,
                num_shards=args.num_shards,
                shard_size_mb=args.shard_size,
                seed=args.seed,
                images_filter=args.images_filter,
                workers=args.workers,
                progress=progress,
                layout=args.layout,
                max_image_side=args.max_image_side,
                allow_mixed_sizes=args.allow_mixed_sizes,
            )
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        total = sum(s["bytes"] for s in m["shards"])
        print(
            f"wrote {m['num_images']} images of {m['num_classes']} classes into "
            f"{len(m['shards'])} shards ({total / 2**20:.1f} MiB) in {args.output}"
        )
        return 0

    return run_main(body, debug=args.debug, bad_input=(DataFormatError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
