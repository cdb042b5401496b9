"""Input pipeline throughput: facerec_tf's tf.data pipeline vs an arcface_torch-style reader.

Usage::

    python benchmarks/pipeline_speed.py                    # ~20k images, batch 128
    python benchmarks/pipeline_speed.py --num-images 50000 --json out.json

Data: the real Yale face JPEGs (112x112) of ``../shared/data/rec/yale112`` (``--source``),
repeated to ``--num-images`` images, written once into a temporary folder both as

* an insightface ``.rec`` / ``.idx`` (header0, images, identity records; what arcface_torch
  reads), with :func:`facerec_tf.data.recordio_writer.write_insightface`, and
* 16 TFRecord shards plus ``manifest.json`` (the layout of :mod:`facerec_tf.data.schema`).

Both readers produce the same thing: float32 ``[B, 112, 112, 3]`` batches normalised to
``(x - 127.5) / 128`` with a random horizontal flip, and int32 labels, in a random order.

* **tf.data** (this project): :func:`facerec_tf.data.pipeline.make_tfrecord_dataset` with
  ``normalize=True`` (parse, JPEG header check, ISLOW decode, batch, flip, normalise, prefetch),
  ``deterministic=False`` as in training. Also reported: the default uint8 output
  (``normalize=False``), which is what the trainer really feeds the model.
* **arcface_torch** (the reference of the target): what ``arcface_torch``'s ``MXFaceDataset``
  + ``DataLoader(num_workers=0)`` do per record, step for step, with NumPy standing in for
  torch and Pillow for MXNet's OpenCV decode (neither torch nor MXNet can share this
  environment): read the record at its ``.idx`` offset (:class:`RecordIOReader`), unpack the
  header, decode the JPEG to an RGB array (``mx.image.imdecode(...).asnumpy()``), then the
  training transforms ``ToPILImage()``, ``RandomHorizontalFlip()``, ``ToTensor()`` (HWC ->
  CHW, float, / 255) and ``Normalize(0.5, 0.5)``, and the default collate (stack ``B``
  samples). One process, one thread.
* **python, lean**: the least a Python reader must do for the same result, for comparison:
  read, decode with Pillow, flip with numpy, normalise to float32 ``(x - 127.5) / 128``,
  stack. ``--threads 2`` adds a run of it with a 2-worker thread pool doing the per-sample
  work (the closest thread-based analogue of ``num_workers=2``).

Each reader is timed twice, interleaved (tf, python, tf, python), after ``--warmup`` untimed
batches, and the best pass is reported, which damps the noise of a shared machine. The
figures are images per second of wall time (the ratio uses these) and images per CPU-second
of the process (all threads), which tells the cost per image even on a busy machine. Read the
load average printed at the start: on a busy 2-core machine the wall figures drop.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "data", "rec", "yale112")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=DEFAULT_SOURCE, help="a .rec folder of 112x112 JPEGs")
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-shards", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5, help="untimed batches per pass")
    p.add_argument("--threads", type=int, default=2, help="thread-pool run (0 to skip)")
    p.add_argument("--work-dir", default=None, help="where to build the data (default: tmp)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data


def load_source(path: str) -> tuple[list[bytes], list[int]]:
    from facerec_tf.data.recordio import RecDataset

    with RecDataset(path) as ds:
        pairs = [ds.read_image(int(k)) for k in ds.image_keys]
    return [p for p, _ in pairs], [label for _, label in pairs]


def build_data(work: str, jpegs: list[bytes], labels: list[int], n: int, num_shards: int):
    """Write ``n`` images (the source repeated) as a .rec and as TFRecord shards."""
    import tensorflow as tf

    from facerec_tf.data import schema
    from facerec_tf.data.recordio_writer import write_insightface

    src = len(jpegs)
    num_classes = max(labels) + 1
    # Copy r of image i keeps its identity but gets a distinct label per repetition block,
    # so the .rec has sorted labels (insightface layout) and many classes.
    order = sorted(range(n), key=lambda i: ((i // src) * num_classes + labels[i % src], i))
    items = [(jpegs[i % src], (i // src) * num_classes + labels[i % src]) for i in order]
    total_classes = ((n - 1) // src + 1) * num_classes
    rec_dir = os.path.join(work, "rec")
    write_insightface(rec_dir, items, num_classes=total_classes, image_size=(112, 112))

    tf_dir = os.path.join(work, "tfrecord")
    os.makedirs(tf_dir, exist_ok=True)
    perm = np.random.default_rng(0).permutation(n)  # the converter shuffles globally too
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    shards = []
    for s in range(num_shards):
        name = schema.shard_name(s, num_shards)
        path = os.path.join(tf_dir, name)
        with tf.io.TFRecordWriter(path) as w:
            for j in perm[bounds[s] : bounds[s + 1]]:
                payload, label = items[j]
                feature = {
                    schema.IMAGE_KEY: tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[payload])
                    ),
                    schema.LABEL_KEY: tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[label])
                    ),
                    schema.SOURCE_KEY: tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[int(j) + 1])
                    ),
                }
                ex = tf.train.Example(features=tf.train.Features(feature=feature))
                w.write(ex.SerializeToString())
        shards.append(
            {
                "name": name,
                "num_records": int(bounds[s + 1] - bounds[s]),
                "bytes": os.path.getsize(path),
                "sha256": "",
            }
        )
    manifest = {
        schema.MANIFEST_FORMAT_KEY: schema.MANIFEST_FORMAT,
        schema.MANIFEST_NUM_IMAGES: n,
        schema.MANIFEST_NUM_CLASSES: total_classes,
        schema.MANIFEST_LABEL_RANGE: [0, total_classes - 1],
        schema.MANIFEST_IMAGE_SIZE: [112, 112],
        schema.MANIFEST_SHARDS: shards,
        schema.MANIFEST_SOURCE: {"path": "benchmark", "kind": "rec"},
        schema.MANIFEST_OPTIONS: {},
    }
    with open(os.path.join(tf_dir, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    return rec_dir, tf_dir


# ----------------------------------------------------------------------------------------------
# Readers


class TorchStyleReader:
    """A Python reader of the ``.rec``: :meth:`sample` is the lean version (decode, flip,
    normalise), :meth:`sample_arcface_torch` arcface_torch's ``MXFaceDataset.__getitem__``
    with its training transforms, without torch (see the module docstring)."""

    def __init__(self, rec_dir: str) -> None:
        from facerec_tf.data.recordio import RecDataset

        self.ds = RecDataset(rec_dir)
        self.keys = self.ds.image_keys
        self.rng = np.random.default_rng(0)

    def sample(self, key: int, flip: bool) -> tuple[np.ndarray, int]:
        from PIL import Image

        rec = self.ds.reader.read(key)  # pread at the .idx offset, header unpacked
        label = int(rec.label if rec.flag == 0 else rec.labels[0])
        img = np.asarray(Image.open(io.BytesIO(rec.payload)).convert("RGB"))
        if flip:
            img = img[:, ::-1, :]
        return (img.astype(np.float32) - 127.5) / 128.0, label

    def sample_arcface_torch(self, key: int, flip: bool) -> tuple[np.ndarray, int]:
        from PIL import Image

        rec = self.ds.reader.read(key)  # imgrec.read_idx(idx) + mx.recordio.unpack(s)
        label = int(rec.label if rec.flag == 0 else rec.labels[0])
        # mx.image.imdecode(img).asnumpy(): RGB HWC uint8
        sample = np.asarray(Image.open(io.BytesIO(rec.payload)).convert("RGB"))
        pic = Image.fromarray(sample)  # transforms.ToPILImage()
        if flip:  # transforms.RandomHorizontalFlip()
            pic = pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # transforms.ToTensor(): copy, HWC -> CHW contiguous, to float, / 255
        chw = np.ascontiguousarray(np.array(pic, dtype=np.uint8, copy=True).transpose(2, 0, 1))
        x = chw.astype(np.float32) / 255.0
        # transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3): clone, sub_, div_
        x = x.copy()
        np.subtract(x, 0.5, out=x)
        np.divide(x, 0.5, out=x)
        return x, label

    def batches(
        self,
        batch_size: int,
        pool: ThreadPoolExecutor | None = None,
        *,
        arcface_torch: bool = False,
    ):
        while True:
            order = self.rng.permutation(self.keys)  # DataLoader(shuffle=True)
            for lo in range(0, len(order) - batch_size + 1, batch_size):
                keys = order[lo : lo + batch_size].tolist()
                flips = (self.rng.random(batch_size) < 0.5).tolist()
                sample = self.sample_arcface_torch if arcface_torch else self.sample
                if pool is None:
                    items = [sample(k, f) for k, f in zip(keys, flips)]
                else:
                    items = list(pool.map(sample, keys, flips))
                yield (
                    np.stack([im for im, _ in items]),
                    np.asarray([lb for _, lb in items], dtype=np.int32),
                )


def time_batches(it, num_batches: int, warmup: int, batch_size: int) -> tuple[float, float]:
    """``(images per second of wall time, images per CPU-second of this process)`` over
    ``num_batches`` batches after ``warmup`` untimed ones."""
    for _ in range(warmup):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        images, _ = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert images.shape[0] == batch_size
    n = num_batches * batch_size
    return n / elapsed, n / max(cpu, 1e-9)


def decode_only_rates(jpegs: list[bytes], n: int = 4000) -> tuple[float, float]:
    """Single-thread JPEG decode rates (img/s) of TensorFlow (tf.data, 1 thread, the same
    ISLOW decode as the pipeline) and Pillow (what the Python reader uses) on the same
    images: the per-image floor of both readers (both wrap libjpeg-turbo)."""
    import tensorflow as tf
    from PIL import Image

    data = (jpegs * (n // len(jpegs) + 1))[:n]
    t = time.perf_counter()
    for j in data:
        np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))
    pil = n / (time.perf_counter() - t)
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = 1
    opts.threading.max_intra_op_parallelism = 1

    def decode(x):
        return tf.io.decode_jpeg(x, channels=3, dct_method="INTEGER_ACCURATE")

    ds = tf.data.Dataset.from_tensor_slices(data).map(decode).batch(128).with_options(opts)
    for _ in ds:  # warm up (tracing)
        pass
    t = time.perf_counter()
    for _ in ds:
        pass
    return n / (time.perf_counter() - t), pil


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from facerec_tf.data.pipeline import make_tfrecord_dataset

    if not os.path.isdir(args.source):
        print(f"source not found: {args.source}", file=sys.stderr)
        return 2
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"cpus={os.cpu_count()} load average={load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"tensorflow={tf.__version__} numpy={np.__version__}"
    )
    jpegs, labels = load_source(args.source)
    work = args.work_dir or tempfile.mkdtemp(prefix="pipeline_speed-")
    try:
        t = time.perf_counter()
        rec_dir, tf_dir = build_data(work, jpegs, labels, args.num_images, args.num_shards)
        print(
            f"data: {args.num_images} images ({len(jpegs)} Yale JPEGs repeated), "
            f"{args.num_shards} shards, built in {time.perf_counter() - t:.1f}s"
        )
        bs = args.batch_size
        num_batches = args.num_images // bs - args.warmup

        def tf_iter(normalize: bool):
            ds = make_tfrecord_dataset(tf_dir, bs, seed=0, normalize=normalize, shuffle_buffer=4096)
            return ((x, y) for x, y in ds)

        reader = TorchStyleReader(rec_dir)
        pool = ThreadPoolExecutor(args.threads) if args.threads else None
        ref_name = "arcface_torch chain, 1 thread (num_workers=0)"
        lean_name = "python lean, 1 thread"
        runs = {
            "tf.data float32 (normalize=True)": lambda: tf_iter(True),
            ref_name: lambda: reader.batches(bs, arcface_torch=True),
            lean_name: lambda: reader.batches(bs),
        }
        if pool is not None:
            runs[f"python lean, {args.threads}-thread pool"] = lambda: reader.batches(bs, pool)
        runs["tf.data uint8 (default, model normalises)"] = lambda: tf_iter(False)
        results: dict[str, float] = {}
        per_cpu: dict[str, float] = {}
        for rnd in range(2):
            for name, make in runs.items():
                rate, cpu_rate = time_batches(make(), num_batches, args.warmup, bs)
                results[name] = max(results.get(name, 0.0), rate)
                per_cpu[name] = max(per_cpu.get(name, 0.0), cpu_rate)
                print(
                    f"  pass {rnd + 1}: {name:48s} {rate:8.0f} img/s  {cpu_rate:8.0f} img/CPU-s",
                    flush=True,
                )
        if pool is not None:
            pool.shutdown()
        print(f"\nbest of 2 passes, batch {bs}, {num_batches * bs} images timed per pass:")
        print(f"  {'':48s} {'wall':>8s}        {'per CPU-second':>14s}")
        for name, rate in results.items():
            print(f"  {name:48s} {rate:8.0f} img/s  {per_cpu[name]:8.0f} img/CPU-s")
        tf_rate = results["tf.data float32 (normalize=True)"]
        ratio = tf_rate / results[ref_name]
        print(
            f"\nratio tf.data (float32) / arcface_torch chain (1 thread): {ratio:.2f}x "
            "(target >= 3x)"
        )
        lean_ratio = tf_rate / results[lean_name]
        print(f"ratio tf.data (float32) / python lean (1 thread): {lean_ratio:.2f}x")
        tf_decode, pil_decode = decode_only_rates(jpegs)
        cpu_python = per_cpu[ref_name]
        ceiling = (os.cpu_count() or 1) * tf_decode / cpu_python
        print(
            f"JPEG decode alone, 1 thread: TensorFlow {tf_decode:.0f} img/s, Pillow "
            f"{pil_decode:.0f} img/s; the arcface_torch chain does {cpu_python:.0f} img/CPU-s, so "
            f"with {os.cpu_count()} cores and decode as the only cost tf.data could reach at "
            f"most {ceiling:.2f}x the 1-thread arcface_torch chain on this machine"
        )
        if pool is not None:
            pooled = results[f"python lean, {args.threads}-thread pool"]
            print(
                f"ratio tf.data (float32) / python lean ({args.threads} threads): "
                f"{results['tf.data float32 (normalize=True)'] / pooled:.2f}x"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "img_per_s": results,
                        "img_per_cpu_s": per_cpu,
                        "ratio": ratio,
                        "ratio_lean": lean_ratio,
                        "decode_only_img_per_s": {"tensorflow": tf_decode, "pillow": pil_decode},
                        "ceiling_ratio": ceiling,
                        "load": load,
                        "args": vars(args),
                    },
                    f,
                    indent=1,
                )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
