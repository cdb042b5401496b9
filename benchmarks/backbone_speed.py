"""Training and inference speed of a facerec_tf backbone on CPU, against a PyTorch twin.

Usage::

    python benchmarks/backbone_speed.py                      # iresnet50, batch 16
    python benchmarks/backbone_speed.py --no-torch --steps 10 --json out.json

What is measured (all float32, batch ``--batch-size``, inputs RGB in [0, 255]; the backbones
normalise them internally, and so does the torch twin):

* **train step**: forward, backward and an SGD update (lr 0.01, momentum 0.9) of the backbone
  plus a 1000-class ``Dense`` classifier on the 512-d embedding, loss = mean softmax
  cross-entropy against random labels (a plain softmax head: ArcFace's margin costs nothing
  measurable next to the backbone). Once as a ``tf.function`` and once as a
  ``tf.function(jit_compile=True)`` (XLA).
* **inference**: ``model(x, training=False)`` in a ``tf.function`` (and with XLA).
* every figure is ``batch_size / median(step time)`` over ``--steps`` timed steps, after
  ``--warmup`` untimed ones (tracing and XLA compilation happen there); "best" is the fastest
  timed step;
* **GFLOP/s**: forward FLOPs from :func:`facerec_tf.models.flops` (multiply-adds x 2 of convs
  and dense layers; 12.62 GFLOPs per 112x112 image for iresnet50); a training step is counted
  as 3x the forward FLOPs (forward + gradient w.r.t. inputs + gradient w.r.t. weights);
* the fraction of the machine's fp32 matmul rate: the median GFLOP/s of a 2048x2048 @
  2048x2048 ``tf.matmul`` measured in the same run (and of ``torch.matmul`` when torch runs).
* if ``torch`` is importable (and ``--no-torch`` is not given), the same architecture written
  below in PyTorch (insightface arcface_torch ``iresnet``) is timed the same way with
  ``torch.set_num_threads(2)`` (``--torch-threads``), NCHW, eager mode, and the TF/torch
  ratios are printed. torch is not a dependency of facerec_tf: without it the comparison is
  skipped with a message; ``--torch-python PYTHON`` runs the torch half in a subprocess of
  another interpreter (one with torch, without TensorFlow).
* **bf16** (on a CPU with ``amx_bf16`` or ``avx512_bf16``; skipped elsewhere, and with
  ``--no-bf16``): the same train step and inference under Keras' ``mixed_bfloat16`` policy
  (loss in float32), a bf16 ``tf.matmul``, and torch under ``torch.autocast("cpu",
  torch.bfloat16)`` in NCHW and in ``channels_last`` memory format.

Each line also gives the share of the machine's CPU that *other* processes took during its
timed steps (from ``/proc/stat``: a figure measured at "others 0%" is trustworthy, at 50% it is
roughly half the idle speed) and the median *process CPU seconds* per step (all threads). On an
idle 2-core machine wall time is about half of the CPU seconds; on a shared one the wall-clock
figures drop while TF's CPU seconds barely move, so they are the steadier way to compare TF
variants. They are not for torch: its OpenMP threads spin-wait while a sibling thread is
descheduled, which burns CPU and also makes torch lose far more wall time than TF on a busy
machine (``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` to see torch's work-limited speed
there). So compare on an idle machine: the header prints the load average and warns when it is
high.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

NUM_CLASSES = 1000
LEARNING_RATE = 0.01
MOMENTUM = 0.9
MATMUL_N = 2048
IRESNET50_TORCH_PARAMS = 43_590_848
TRAIN_FLOPS_FACTOR = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="iresnet50", help="facerec_tf backbone name")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--no-jit", action="store_true", help="skip the XLA measurements")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="set OMP_WAIT_POLICY=PASSIVE before importing torch: fairer torch figures on a "
        "busy machine (its OpenMP threads stop spin-waiting), a little slower on an idle one",
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 measurements")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a per-op-type profile (TF profiler) of one mixed_bfloat16 train step",
    )
    parser.add_argument(
        "--torch-python",
        metavar="PYTHON",
        help="run the torch half with this interpreter (one that has torch) in a subprocess",
    )
    parser.add_argument("--torch-worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-reps", type=int, default=10)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def machine_busy_seconds():
    """CPU seconds the whole machine has spent busy (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def time_steps(step, steps, warmup):
    """Run ``step()`` ``warmup`` times untimed then ``steps`` times.

    ``step`` must block until its work is done (fetch a result to host memory). Returns the
    wall-clock times, the process CPU times (user + system, all threads) of the timed steps
    and the CPU seconds other processes used meanwhile (None where /proc/stat is missing).
    """
    for _ in range(warmup):
        step()
    wall, cpu, others = [], [], []
    for _ in range(steps):
        busy_start = machine_busy_seconds()
        cpu_start = time.process_time()
        start = time.perf_counter()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        busy = machine_busy_seconds()
        others.append(None if busy is None else max(0.0, busy - busy_start - cpu[-1]))
    return wall, cpu, others


def summarize(times, batch_size, flops_per_image=None, matmul_gflops=None):
    wall, cpu, others = times
    median = statistics.median(wall)
    result = {
        "median_s": median,
        "min_s": min(wall),
        "max_s": max(wall),
        "img_per_s": batch_size / median,
        "best_img_per_s": batch_size / min(wall),
        "cpu_s_per_step": statistics.median(cpu),
        # share of the machine's CPU capacity taken by other processes during the timed steps
        "others_cpu_share": None
        if None in others
        else sum(others) / (sum(wall) * (os.cpu_count() or 1)),
    }
    if flops_per_image:
        result["gflop_per_s"] = flops_per_image * batch_size / median / 1e9
        if matmul_gflops:
            result["fraction_of_matmul"] = result["gflop_per_s"] / matmul_gflops
    return result


# --------------------------------------------------------------------------- TensorFlow


def cpu_flags() -> list[str]:
    """The CPU flags listed in /proc/cpuinfo (empty when it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []


def bf16_flags() -> list[str]:
    """The CPU's native bf16 flags (``amx_bf16``, ``avx512_bf16``)."""
    flags = set(cpu_flags())
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def tf_matmul_gflops(reps, n=MATMUL_N, dtype="float32"):
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n), seed=1), dtype)
    b = tf.cast(tf.random.normal((n, n), seed=2), dtype)
    matmul = tf.function(tf.matmul)
    times = time_steps(lambda: matmul(a, b).numpy(), reps, warmup=2)[0]
    return 2 * n**3 / statistics.median(times) / 1e9


def benchmark_tf(args, matmul_gflops):
    import keras
    import tensorflow as tf

    from facerec_tf.models import count_parameters, create_backbone, flops

    model = create_backbone(args.model)
    params = count_parameters(model)
    forward_flops = flops(model)
    train_flops = TRAIN_FLOPS_FACTOR * forward_flops
    classifier = keras.layers.Dense(NUM_CLASSES, name="classifier")
    classifier.build((None, model.output.shape[-1]))

    rng = tf.random.Generator.from_seed(0)
    images = rng.uniform((args.batch_size, *model.input.shape[1:]), 0.0, 255.0)
    labels = rng.uniform((args.batch_size,), 0, NUM_CLASSES, dtype=tf.int32)

    def make_infer(jit_compile):
        return tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)

    results = {"params": params, "forward_gflops_per_image": forward_flops / 1e9}
    variants = [False] if args.no_jit else [False, True]
    for jit in variants:
        suffix = "_xla" if jit else ""
        train_step = make_train_step(model, classifier, jit)
        times = time_steps(lambda s=train_step: s(images, labels).numpy(), args.steps, args.warmup)
        results[f"train{suffix}"] = summarize(times, args.batch_size, train_flops, matmul_gflops)
        infer = make_infer(jit)
        times = time_steps(lambda f=infer: f(images).numpy(), args.steps, args.warmup)
        results[f"infer{suffix}"] = summarize(times, args.batch_size, forward_flops, matmul_gflops)
    if args.bf16:
        results.update(benchmark_tf_bf16(args, images, labels, forward_flops, matmul_gflops))
    return results


def run_torch_worker(python: str, script: str, spec: dict) -> dict | None:
    """``python script --torch-worker SPEC``: its JSON result (the last stdout line), or None
    after printing why (exit code 3: torch is not importable there)."""
    cmd = [python, os.path.abspath(script), "--torch-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 3:
        print(f"\nPyTorch comparison skipped: torch is not importable by {python}")
        return None
    if proc.returncode != 0:
        print(f"\nPyTorch comparison failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_train_step(model, classifier, jit_compile):
    """One SGD step (momentum) of ``model`` + ``classifier`` under softmax cross entropy,
    computed in float32 whatever the policy."""
    import keras
    import tensorflow as tf

    variables = model.trainable_variables + classifier.trainable_variables
    optimizer = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.cast(classifier(model(x, training=True)), tf.float32)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return train_step


def benchmark_tf_bf16(args, images, labels, forward_flops, matmul_gflops):
    """Train step and inference under the ``mixed_bfloat16`` policy (loss in float32)."""
    import keras
    import tensorflow as tf

    from facerec_tf.models import create_backbone

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = create_backbone(args.model)
        classifier = keras.layers.Dense(NUM_CLASSES, name="classifier")
        classifier.build((None, model.output.shape[-1]))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    train_step = make_train_step(model, classifier, jit_compile=False)
    infer = tf.function(lambda x: model(x, training=False))
    out = {}
    times = time_steps(lambda: train_step(images, labels).numpy(), args.steps, args.warmup)
    train_flops = TRAIN_FLOPS_FACTOR * forward_flops
    out["train_bf16"] = summarize(times, args.batch_size, train_flops, matmul_gflops)
    times = time_steps(lambda: infer(images).numpy(), args.steps, args.warmup)
    out["infer_bf16"] = summarize(times, args.batch_size, forward_flops, matmul_gflops)
    if args.profile:
        out["train_bf16_profile"] = profile_op_types(lambda: train_step(images, labels).numpy())
    return out


def profile_op_types(step, top=14):
    """Self time per TF op type of one ``step()`` (TF profiler's framework_op_stats)."""
    import collections
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        step()
        tf.profiler.experimental.stop()
        files = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        data, ok = plugin.xspace_to_tools_data(files, "framework_op_stats", {})
    if not ok:
        return {}
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    self_us = collections.Counter()
    for row in table["rows"]:
        values = dict(zip(cols, [c.get("v") if c else None for c in row["c"]]))
        if values["type"] != "IDLE":
            self_us[values["type"]] += values["total_self_time"]
    total = sum(self_us.values())
    print(f"  per-op self time of one mixed_bfloat16 train step ({total / 1e3:.0f} ms busy):")
    for op, us in self_us.most_common(top):
        print(f"    {op:<36} {us / 1e3:8.1f} ms {100 * us / total:5.1f}%")
    return {op: us / total for op, us in self_us.items()}


# --------------------------------------------------------------------------- PyTorch


def build_torch_iresnet(layers=(3, 4, 14, 3), embedding_size=512, image_size=112):
    """insightface arcface_torch ``IResNet`` (``backbones/iresnet.py``), fp32, dropout 0.

    The input is RGB in [0, 255] NCHW and the model applies ``(x - 127.5) / 128`` first, like
    the facerec_tf backbones. Same modules, shapes and parameter count as arcface_torch
    (43,590,848 for ``layers=(3, 4, 14, 3)``).
    """
    import torch
    from torch import nn

    def conv3x3(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    class IBasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
            self.conv1 = conv3x3(inplanes, planes)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
            self.prelu = nn.PReLU(planes)
            self.conv2 = conv3x3(planes, planes, stride)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn1(x)
            out = self.conv1(out)
            out = self.bn2(out)
            out = self.prelu(out)
            out = self.conv2(out)
            out = self.bn3(out)
            return out + identity

    class IResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = conv3x3(3, 64)
            self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
            self.prelu = nn.PReLU(64)
            stages = []
            inplanes = 64
            for num_blocks, planes in zip(layers, (64, 128, 256, 512)):
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=2, bias=False),
                    nn.BatchNorm2d(planes, eps=1e-05),
                )
                blocks = [IBasicBlock(inplanes, planes, 2, downsample)]
                blocks += [IBasicBlock(planes, planes) for _ in range(1, num_blocks)]
                stages.append(nn.Sequential(*blocks))
                inplanes = planes
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
            self.dropout = nn.Dropout(p=0.0)
            side = image_size // 16
            self.fc = nn.Linear(512 * side * side, embedding_size)
            self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    # He normal (fan-out) like facerec_tf, not arcface_torch's N(0, 0.1), so that
                    # the untrained net stays finite in eval mode (no inf / NaN timings).
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = (x - 127.5) / 128.0
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(self.bn2(x))
            x = self.fc(torch.flatten(x, 1))
            return self.features(x)

    return IResNet()


def torch_matmul_gflops(reps, n=MATMUL_N, dtype=None):
    import torch

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    times = time_steps(lambda: torch.matmul(a, b), reps, warmup=2)[0]
    return 2 * n**3 / statistics.median(times) / 1e9


def benchmark_torch(args, forward_flops, matmul_gflops, layers):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    model = build_torch_iresnet(tuple(layers))
    params = sum(p.numel() for p in model.parameters())
    classifier = torch.nn.Linear(512, NUM_CLASSES)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trainable + list(classifier.parameters()), lr=LEARNING_RATE, momentum=MOMENTUM
    )
    images = torch.rand(args.batch_size, 3, 112, 112) * 255.0
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,))
    train_flops = TRAIN_FLOPS_FACTOR * forward_flops

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(classifier(model(images)), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    def infer():
        with torch.inference_mode():
            return model(images).sum().item()

    model.train()
    times = time_steps(train_step, args.steps, args.warmup)
    results = {
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": params,
        "matmul_gflop_per_s": torch_matmul_gflops(args.matmul_reps),
        "train": summarize(times, args.batch_size, train_flops, matmul_gflops),
    }
    model.eval()
    times = time_steps(infer, args.steps, args.warmup)
    results["infer"] = summarize(times, args.batch_size, forward_flops, matmul_gflops)
    if not args.bf16:
        return results
    results["matmul_bf16_gflop_per_s"] = torch_matmul_gflops(args.matmul_reps, dtype=torch.bfloat16)
    for suffix, memory_format in (("", torch.contiguous_format), ("_cl", torch.channels_last)):
        model.to(memory_format=memory_format)
        x = images.contiguous(memory_format=memory_format)

        def train_bf16(x=x):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(classifier(model(x)).float(), labels)
            loss.backward()
            optimizer.step()
            return loss.item()

        def infer_bf16(x=x):
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
                return model(x).float().sum().item()

        model.train()
        times = time_steps(train_bf16, args.steps, args.warmup)
        results[f"train_bf16{suffix}"] = summarize(
            times, args.batch_size, train_flops, matmul_gflops
        )
        model.eval()
        times = time_steps(infer_bf16, args.steps, args.warmup)
        results[f"infer_bf16{suffix}"] = summarize(
            times, args.batch_size, forward_flops, matmul_gflops
        )
    model.to(memory_format=torch.contiguous_format)
    return results


# --------------------------------------------------------------------------- report


def fmt(name, r, matmul_name="tf.matmul"):
    line = f"  {name:<20} {r['img_per_s']:5.2f} img/s (best {r['best_img_per_s']:5.2f})"
    line += f" {r['median_s'] * 1e3:6.0f} ms/step {r['cpu_s_per_step']:5.1f} cpu-s"
    if r["others_cpu_share"] is not None:
        line += f" others {100 * r['others_cpu_share']:3.0f}%"
    if "gflop_per_s" in r:
        line += f" {r['gflop_per_s']:6.1f} GFLOP/s"
    if "fraction_of_matmul" in r:
        line += f" = {100 * r['fraction_of_matmul']:3.0f}% of {matmul_name}"
    return line


def print_header(args, tf):
    load = os.getloadavg()[0]
    print(f"facerec_tf backbone speed: {args.model}, batch {args.batch_size}, float32")
    print(
        f"  python {platform.python_version()}, tensorflow {tf.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load:.2f}"
    )
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (on)")
    print(
        f"  TF threads intra={intra} inter={inter} (0 = all cores), TF_ENABLE_ONEDNN_OPTS={onednn}"
    )
    print(
        f"  {args.steps} timed steps after {args.warmup} warm-up, median; loss: softmax "
        f"cross-entropy, {NUM_CLASSES}-class dense head; SGD momentum {MOMENTUM}"
    )
    print(
        f"  training FLOPs = {TRAIN_FLOPS_FACTOR} x forward; best = fastest timed step; cpu-s = "
        "median CPU seconds of this process per step; others = CPU share other processes took"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"  WARNING: load average {load:.1f} on {os.cpu_count()} CPUs: other processes "
            "share the cores, wall-clock figures are low and torch's (OpenMP spin-waits) "
            "suffer most"
        )
    sys.stdout.flush()


def compare(tf_res, torch_res, key):
    """TF / torch img/s for ``key`` ("train" / "infer"): median steps, fastest steps, and the
    faster of plain / XLA TF."""
    best = max((tf_res[k]["img_per_s"], k) for k in (key, f"{key}_xla") if k in tf_res)
    reference = torch_res[key]["img_per_s"]
    return {
        key: tf_res[key]["img_per_s"] / reference,
        f"{key}_fastest_steps": tf_res[key]["best_img_per_s"] / torch_res[key]["best_img_per_s"],
        f"{key}_best": best[0] / reference,
        f"{key}_best_variant": best[1],
    }


def run_torch(args, tf_res, matmul):
    """The torch half; returns its results or None (with a message) when skipped."""
    if args.no_torch:
        print("\nPyTorch comparison skipped (--no-torch)")
        return None
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads libgomp
    from facerec_tf.models import IRESNET_STAGES

    depth = re.fullmatch(r"iresnet(\d+)", args.model)
    if not depth or int(depth[1]) not in IRESNET_STAGES:
        print(
            f"\nPyTorch comparison skipped: no torch twin for {args.model!r} (iresnet<depth> only)"
        )
        return None
    layers = IRESNET_STAGES[int(depth[1])]
    start = time.perf_counter()
    fwd = tf_res["forward_gflops_per_image"] * 1e9
    if args.torch_python:
        spec = {"args": dict(vars(args)), "fwd": fwd, "matmul": matmul, "layers": list(layers)}
        torch_res = run_torch_worker(args.torch_python, __file__, spec)
        if torch_res is None:
            return None
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("\nPyTorch comparison skipped: torch is not installed (see --torch-python)")
            return None
        torch_res = benchmark_torch(args, fwd, matmul, layers)
    expected = tf_res["params"]["total"]
    ok = torch_res["params"] == expected
    if args.model == "iresnet50":
        ok = ok and torch_res["params"] == IRESNET50_TORCH_PARAMS
    print(
        f"\nPyTorch {torch_res['version']} twin ({torch_res['threads']} threads, NCHW, eager, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
        f"{time.perf_counter() - start:.0f} s: {torch_res['params']:,} parameters "
        f"({'matches' if ok else 'DIFFERS FROM'} TF {expected:,})"
    )
    print(f"  fp32 {MATMUL_N}^3 torch.matmul: {torch_res['matmul_gflop_per_s']:.1f} GFLOP/s")
    print(fmt("train", torch_res["train"]))
    print(fmt("infer", torch_res["infer"]))
    if "matmul_bf16_gflop_per_s" in torch_res:
        print(
            f"  bf16 {MATMUL_N}^3 torch.matmul: {torch_res['matmul_bf16_gflop_per_s']:.1f} GFLOP/s"
        )
        for key, label in [
            ("train_bf16", "train bf16 NCHW"),
            ("train_bf16_cl", "train bf16 ch_last"),
            ("infer_bf16", "infer bf16 NCHW"),
            ("infer_bf16_cl", "infer bf16 ch_last"),
        ]:
            print(fmt(label, torch_res[key]))
    return torch_res


def torch_worker(spec):
    """The torch half in a torch-only interpreter (``--torch-python``): prints JSON."""
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(3)
    args = argparse.Namespace(**spec["args"])
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    print(json.dumps(benchmark_torch(args, spec["fwd"], spec["matmul"], spec["layers"])))


def main(argv=None):
    args = parse_args(argv)
    if args.torch_worker:
        return torch_worker(json.loads(args.torch_worker))
    native_bf16 = bf16_flags()
    args.bf16 = bool(native_bf16) and not args.no_bf16
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    print_header(args, tf)
    results = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "tensorflow_version": tf.__version__,
        "load_average_start": os.getloadavg()[0],
    }
    matmul = tf_matmul_gflops(args.matmul_reps)
    results["tf_matmul_gflop_per_s"] = matmul
    print(f"\nfp32 {MATMUL_N}^3 tf.matmul: {matmul:.1f} GFLOP/s (median of {args.matmul_reps})")
    if args.bf16:
        results["tf_matmul_bf16_gflop_per_s"] = m16 = tf_matmul_gflops(
            args.matmul_reps, dtype="bfloat16"
        )
        print(f"bf16 {MATMUL_N}^3 tf.matmul: {m16:.1f} GFLOP/s (CPU bf16 flags {native_bf16})")
    elif args.no_bf16:
        print("bf16 skipped (--no-bf16)")
    else:
        print("bf16 UNSUPPORTED on this CPU (no amx_bf16 / avx512_bf16): bf16 rows skipped")
    sys.stdout.flush()

    start = time.perf_counter()
    tf_res = results["tensorflow"] = benchmark_tf(args, matmul)
    print(
        f"\nTensorFlow {args.model}, {time.perf_counter() - start:.0f} s: "
        f"{tf_res['params']['total']:,} parameters, "
        f"{tf_res['forward_gflops_per_image']:.2f} GFLOPs/image forward"
    )
    for key, label in [
        ("train", "train (tf.function)"),
        ("train_xla", "train (jit_compile)"),
        ("infer", "infer (tf.function)"),
        ("infer_xla", "infer (jit_compile)"),
        ("train_bf16", "train mixed_bfloat16"),
        ("infer_bf16", "infer mixed_bfloat16"),
    ]:
        if key in tf_res:
            print(fmt(label, tf_res[key]))
    sys.stdout.flush()

    torch_res = run_torch(args, tf_res, matmul)
    if torch_res:
        results["torch"] = torch_res
        ratios = results["tf_over_torch"] = compare(tf_res, torch_res, "train")
        ratios.update(compare(tf_res, torch_res, "infer"))
        print("\nTF / torch (target >= 1.0 for training):")
        for key in ("train", "infer"):
            print(
                f"  {key}: {ratios[key]:.2f} x (tf.function, median steps), "
                f"{ratios[f'{key}_fastest_steps']:.2f} x (fastest steps), "
                f"{ratios[f'{key}_best']:.2f} x (faster TF: {ratios[f'{key}_best_variant']})"
            )
        for key in ("train", "infer"):
            for suffix, layout in (("", "NCHW"), ("_cl", "channels_last")):
                if f"{key}_bf16" in tf_res and f"{key}_bf16{suffix}" in torch_res:
                    r = (
                        tf_res[f"{key}_bf16"]["img_per_s"]
                        / torch_res[f"{key}_bf16{suffix}"]["img_per_s"]
                    )
                    ratios[f"{key}_bf16_vs_torch{suffix}"] = r
                    print(f"  {key} bf16: {r:.2f} x torch bf16 {layout}")

    results["load_average_end"] = os.getloadavg()[0]
    print(f"\nload average at end {results['load_average_end']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
