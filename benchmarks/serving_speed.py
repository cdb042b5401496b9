"""Serving speed of the exported SavedModel on CPU, against onnxruntime and a PyTorch twin.

Usage::

    python benchmarks/serving_speed.py                          # iresnet50, batches 1, 16, 64
    python benchmarks/serving_speed.py --batch-sizes 1,16 --torch-python /path/to/torch/python

What is measured (``--model``, random weights, inputs RGB in [0, 255], ``--steps`` timed calls
after ``--warmup`` untimed ones, median; batch 1 is reported as latency, larger batches as
images per second):

* **SavedModel fp32 / bf16**: ``tools/export.py``'s SavedModel (``export_saved_model``,
  inference-optimised; ``precision="bfloat16"`` for bf16) loaded with
  ``tf.saved_model.load`` and called through its ``serving_default`` signature, as TF Serving
  runs it;
* **Keras graph**: ``tf.function(model(x, training=False))``, the graph before optimisation;
* **onnxruntime fp32**: this project's own ONNX export (``export_onnx``) of the same model on
  the CPU execution provider with ``--threads`` intra-op threads;
* **torch fp32 / bf16 NCHW / bf16 channels_last**: arcface_torch's ``iresnet`` written out in
  ``backbone_speed.py`` (same parameter count), eval mode under ``torch.inference_mode()``,
  bf16 under ``torch.autocast("cpu", torch.bfloat16)``. It runs in a subprocess with
  ``--torch-python`` (default: this interpreter), since facerec_tf never depends on torch;
  without torch the column is skipped with a message.

bf16 rows need a CPU with ``amx_bf16`` or ``avx512_bf16``; elsewhere they are skipped (TF and
torch would emulate bf16, slower than fp32). The header lists the CPU's flags, the threads
and the load average; each line gives the share of the machine's CPU that *other* processes
took during its timed calls (``/proc/stat``; trust figures at "others 0%"). Ratios are between
figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import backbone_speed as bs  # noqa: E402  (stdlib-only at import)

# the bars, as ratios of figures measured in the same run
TARGETS = {
    "latency_fp32_vs_ort": 1.2,
    "latency_bf16_vs_ort": 1.2,
    "bf16_vs_fp32_savedmodel": 1.5,
    "bf16_vs_torch_channels_last": 0.8,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="iresnet50", help="facerec_tf backbone name")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--latency-steps", type=int, default=20, help="timed calls at batch 1")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime/torch")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-keras", action="store_true", help="skip the unoptimised Keras graph")
    p.add_argument(
        "--torch-python",
        default=sys.executable,
        metavar="PYTHON",
        help="interpreter with torch for the twin (default: this one)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--torch-worker", metavar="JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(fn, batch, args):
    steps = args.latency_steps if batch == 1 else args.steps
    return bs.summarize(bs.time_steps(fn, steps, args.warmup), batch)


# --------------------------------------------------------------------------- torch (subprocess)


def torch_worker(spec: dict) -> dict:
    """Runs in the torch interpreter: times the twin and returns the results."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = bs.build_torch_iresnet(tuple(spec["layers"])).eval()
    out = {"version": torch.__version__, "threads": torch.get_num_threads(), "rows": {}}
    out["params"] = sum(p.numel() for p in model.parameters())
    args = argparse.Namespace(**spec["timing"])
    variants = [("torch fp32", None, False)]
    if spec["bf16"]:
        variants += [("torch bf16 NCHW", torch.bfloat16, False)]
        variants += [("torch bf16 channels_last", torch.bfloat16, True)]
    for batch in spec["batch_sizes"]:
        x = torch.rand(batch, 3, 112, 112) * 255.0
        for name, dtype, channels_last in variants:
            m = model.to(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

            def call(m=m, xx=xx, dtype=dtype):
                with (
                    torch.inference_mode(),
                    torch.autocast("cpu", dtype, enabled=dtype is not None),
                ):
                    return m(xx).float().sum().item()

            out["rows"][f"{name}|{batch}"] = measure(call, batch, args)
    return out


def run_torch(args, layers, batch_sizes, bf16) -> dict | None:
    spec = {
        "threads": args.threads,
        "layers": list(layers),
        "batch_sizes": batch_sizes,
        "bf16": bf16,
        "timing": {
            "steps": args.steps,
            "latency_steps": args.latency_steps,
            "warmup": args.warmup,
        },
    }
    return bs.run_torch_worker(args.torch_python, __file__, spec)


# --------------------------------------------------------------------------- report


def fmt(name, batch, r):
    if batch == 1:
        line = f"  {name:<28} batch  1 {r['median_s'] * 1e3:8.1f} ms (best {r['min_s'] * 1e3:6.1f})"
    else:
        line = f"  {name:<28} batch {batch:2d} {r['img_per_s']:8.2f} img/s (best {r['best_img_per_s']:6.2f})"
    line += f" {r['cpu_s_per_step']:5.2f} cpu-s"
    if r["others_cpu_share"] is not None:
        line += f" others {100 * r['others_cpu_share']:3.0f}%"
    return line


def main(argv=None):
    args = parse_args(argv)
    if args.torch_worker:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit(3)
        print(json.dumps(torch_worker(json.loads(args.torch_worker))))
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from facerec_tf.export import export_onnx, export_saved_model
    from facerec_tf.models import IRESNET_STAGES, create_backbone

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    bf16 = bs.bf16_flags()
    load = os.getloadavg()[0]
    print(f"facerec_tf serving speed: {args.model}, 112x112, batches {batch_sizes}")
    print(
        f"  python {platform.python_version()}, tensorflow {tf.__version__}, {os.cpu_count()} "
        f"CPUs, load average {load:.2f}, TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset (on)')}"
    )
    isa = [f for f in bs.cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    print(f"  CPU: {platform.processor() or platform.machine()}, flags {' '.join(isa)}")
    print(
        "  bf16: "
        + (f"native ({', '.join(bf16)})" if bf16 else "UNSUPPORTED on this CPU: bf16 rows skipped")
    )
    print(
        f"  {args.latency_steps} timed calls at batch 1, {args.steps} above, after {args.warmup} "
        "warm-up; median; others = CPU share other processes took during the timed calls"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {load:.1f}: other processes share the cores")
    sys.stdout.flush()

    model = create_backbone(args.model)
    rows: dict[str, dict] = {}
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ["float32"] + (["bfloat16"] if bf16 else []):
            path = export_saved_model(model, os.path.join(tmp, precision), precision=precision)
            fn = tf.saved_model.load(path).signatures["serving_default"]
            short = "fp32" if precision == "float32" else "bf16"
            engines[f"SavedModel {short}"] = lambda x, fn=fn: fn(images=x)["embedding"].numpy()
        if not args.no_keras:
            graph = tf.function(lambda x: model(x, training=False))
            engines["Keras graph fp32"] = lambda x: graph(x).numpy()
        if not args.no_onnx:
            try:
                import onnxruntime as ort

                onnx_path = export_onnx(model, os.path.join(tmp, "model.onnx"))
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                session = ort.InferenceSession(
                    onnx_path, options, providers=["CPUExecutionProvider"]
                )
                engines["onnxruntime fp32"] = lambda x: session.run(None, {"images": x})[0]
                print(f"  onnxruntime {ort.__version__}, {args.threads} intra-op threads")
            except ImportError as e:
                print(f"  onnxruntime comparison skipped: {e}")
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            x = rng.uniform(0, 255, (batch, 112, 112, 3)).astype(np.float32)
            xt = tf.constant(x)
            print(f"\nbatch {batch}:")
            for name, engine in engines.items():
                arg = x if name.startswith("onnx") else xt
                rows[f"{name}|{batch}"] = r = measure(lambda e=engine, a=arg: e(a), batch, args)
                print(fmt(name, batch, r), flush=True)

    torch_res = None
    depth = args.model.removeprefix("iresnet")
    if args.no_torch:
        print("\nPyTorch comparison skipped (--no-torch)")
    elif not depth.isdigit() or int(depth) not in IRESNET_STAGES:
        print(f"\nPyTorch comparison skipped: no torch twin for {args.model!r}")
    else:
        torch_res = run_torch(args, IRESNET_STAGES[int(depth)], batch_sizes, bool(bf16))
        if torch_res:
            print(
                f"\nPyTorch {torch_res['version']} twin ({torch_res['threads']} threads, eager, "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
                f"{torch_res['params']:,} parameters):"
            )
            for key, r in torch_res["rows"].items():
                name, batch = key.split("|")
                print(fmt(name, int(batch), r))
            rows.update(torch_res["rows"])

    ratios = {}

    def ratio(key, num, den, latency=False):
        if num in rows and den in rows:
            a, b = rows[num]["median_s"], rows[den]["median_s"]
            ratios[key] = a / b if latency else b / a

    ratio("latency_fp32_vs_ort", "SavedModel fp32|1", "onnxruntime fp32|1", latency=True)
    ratio("latency_bf16_vs_ort", "SavedModel bf16|1", "onnxruntime fp32|1", latency=True)
    ratio("bf16_vs_fp32_savedmodel", "SavedModel bf16|16", "SavedModel fp32|16")
    ratio("bf16_vs_torch_channels_last", "SavedModel bf16|16", "torch bf16 channels_last|16")
    ratio("fp32_vs_keras_graph_b16", "SavedModel fp32|16", "Keras graph fp32|16")
    ratio("fp32_vs_torch_b16", "SavedModel fp32|16", "torch fp32|16")
    if ratios:
        print("\nratios (same run):")
        for key, value in ratios.items():
            target = TARGETS.get(key)
            bar = ""
            if target is not None:
                ok = value <= target if key.startswith("latency") else value >= target
                bar = f"  (target {'<=' if key.startswith('latency') else '>='} {target}: " + (
                    "met)" if ok else "NOT met)"
                )
            print(
                f"  {key:<30} {value:5.2f}{' x latency' if key.startswith('latency') else ' x'}{bar}"
            )
    end_load = os.getloadavg()[0]
    print(f"\nload average at end {end_load:.2f}")
    results = {
        "model": args.model,
        "tensorflow_version": tf.__version__,
        "bf16_flags": bf16,
        "load_average": [load, end_load],
        "rows": rows,
        "ratios": ratios,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
