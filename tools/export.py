#!/usr/bin/env python3
"""Export a trained embedding model as a SavedModel (TF Serving), ONNX or ``.keras`` file.

Thin command-line wrapper over :func:`facerec_tf.export.export_model`; run ``--help`` for
examples. TensorFlow is imported only once the options and the model path are checked.

Exit status: 0 on success, 2 on bad input or bad options (missing model, an ONNX graph the
importer cannot map, existing serving version, missing optional package...), 1 on any other
failure, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
MODEL is a .keras file, a training run folder (RUN/best/backbone.keras is used if present,
else RUN/export/backbone.keras) or, with --from-insightface-onnx, an arcface_torch ONNX
backbone (IResNet r18-r200, IR-SE, MobileFaceNet mbf / mbf_large / insightface's w600k_mbf)
whose weights are imported; the architecture is read from the graph.

examples:
  # SavedModel for TF Serving: serving/facerec/3/saved_model.pb (signatures serving_default
  # and serve_jpeg, output key "embedding", L2-normalised)
  python tools/export.py --model runs/r50_ms1mv3 --output serving --format saved_model \\
      --model-name facerec --version 3

  # a plain SavedModel folder
  python tools/export.py --model runs/r50_ms1mv3/best/backbone.keras --output r50_sm \\
      --format saved_model

  # the same computing in bfloat16 (float32 in and out; fast on CPUs with AVX512-BF16/AMX)
  python tools/export.py --model runs/r50_ms1mv3 --output r50_sm_bf16 --format saved_model \\
      --precision bfloat16

  # ONNX, NHWC float RGB 0..255 in, L2-normalised embedding out (dynamic batch, opset 15)
  python tools/export.py --model runs/r50_ms1mv3 --output r50.onnx --format onnx

  # ONNX with insightface's interface (NCHW (x-127.5)/127.5 in, raw embedding out),
  # loadable by insightface.model_zoo
  python tools/export.py --model runs/r50_ms1mv3 --output r50_insightface.onnx \\
      --format onnx --insightface-onnx

  # import an arcface_torch model-zoo ONNX into Keras (then train, evaluate or serve it)
  python tools/export.py --model ms1mv3_arcface_r100.onnx --from-insightface-onnx \\
      --output r100.keras --format keras

  # insightface's buffalo_s / buffalo_sc recognition model (MobileFaceNet) to TF Serving
  python tools/export.py --model buffalo_s/w600k_mbf.onnx --from-insightface-onnx \\
      --output serving --format saved_model --model-name mbf --version 1
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export.py",
        description=(
            "Export a face-embedding model to a SavedModel (plain or TF Serving layout), "
            "ONNX, or a .keras file."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help=".keras file, training run folder, or insightface .onnx (with --from-insightface-onnx)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help=(
            "saved_model: the SavedModel folder, or the TF Serving model repository with "
            "--model-name/--version; onnx/keras: the .onnx/.keras file, or a folder that "
            "receives <model-name or backbone>.onnx/.keras"
        ),
    )
    p.add_argument(
        "--format",
        required=True,
        choices=("saved_model", "onnx", "keras"),
        help="export format",
    )
    p.add_argument(
        "--insightface-onnx",
        action="store_true",
        help="onnx only: insightface's interface (input 'data' NCHW (x-127.5)/127.5, raw output)",
    )
    p.add_argument(
        "--opset", type=int, default=None, metavar="N", help="onnx only: opset (default 15)"
    )
    p.add_argument(
        "--from-insightface-onnx",
        action="store_true",
        help="MODEL is an arcface_torch ONNX IResNet, IR-SE or MobileFaceNet: import its weights",
    )
    p.add_argument(
        "--model-name",
        metavar="NAME",
        help="saved_model: TF Serving model name (default facerec when --version is given)",
    )
    p.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="saved_model: TF Serving version folder (default 1 when --model-name is given)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="saved_model with --model-name/--version: replace an existing version folder",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default=None,
        help="saved_model only: compute precision of the backbone (default float32; input "
        "and output stay float32)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--verbose", action="store_true", help="also show TensorFlow's own log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.format != "onnx" and (args.insightface_onnx or args.opset is not None):
        parser.error("--insightface-onnx and --opset apply to --format onnx only")
    if args.format != "saved_model" and (args.version is not None or args.overwrite):
        parser.error("--version and --overwrite apply to --format saved_model only")
    if args.format != "saved_model" and args.precision is not None:
        parser.error("--precision applies to --format saved_model only")

    try:
        import facerec_tf  # noqa: F401
    except ImportError:  # run from a checkout whose package is not installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from facerec_tf.cli import quiet_tensorflow, run_main

    quiet_tensorflow(args.verbose)
    from facerec_tf.errors import FacerecError
    from facerec_tf.export import export_model, resolve_model_path

    def body() -> int:
        resolve_model_path(args.model)  # fails fast, before TensorFlow is imported
        options: dict = {}
        if args.format == "saved_model":
            if args.model_name is not None or args.version is not None:
                options.update(model_name=args.model_name, version=args.version)
                options["overwrite"] = args.overwrite
            if args.precision is not None:
                options["precision"] = args.precision
        elif args.model_name is not None:
            options["model_name"] = args.model_name
        if args.format == "onnx":
            options["insightface_interface"] = args.insightface_onnx
            if args.opset is not None:
                options["opset"] = args.opset
        written = export_model(
            args.model,
            args.output,
            args.format,
            from_insightface_onnx=args.from_insightface_onnx,
            **options,
        )
        print(f"wrote {args.format} export to {written}")
        return 0

    return run_main(body, debug=args.debug, bad_input=(FileNotFoundError, FacerecError))


if __name__ == "__main__":
    sys.exit(main())
