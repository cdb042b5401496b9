#!/usr/bin/env python3
"""Benchmark of the ``.rec`` -> TFRecord converter against what the anchors do.

Builds a synthetic insightface-layout ``.rec`` (default 40,000 records of 112x112 JPEGs of
about 4 KB, like insightface's face crops) with :mod:`facerec_tf.data.recordio_writer`, then,
in the same run and on the same (page-cached) file, times:

* **reference** (the anchors' converters): every image record read with per-record Python
  in shuffled order, as ``mx.recordio.MXIndexedRecordIO.read_idx`` + ``mx.recordio.unpack``
  do it (seek to the ``.idx`` offset, read the 8-byte frame header, read the frame, unpack the
  ``IRHeader`` and the label), a ``tf.train.Example`` built and serialized per record and
  written with ``tf.io.TFRecordWriter`` into the same number of shards, in one process;
* **convert**: ``facerec_tf.data.convert.convert`` (JPEG header checks, label checks,
  Example encoding, CRCs, sha256, fsync of every shard, manifest), once per ``--workers``
  value;
* for information only, a **copy** of the ``.rec`` (1 MiB reads and writes, fsynced).

Each is run in a fresh process and timed there once its libraries are imported (TensorFlow's
import is not counted against the reference); the steps take turns in each of ``--repeats``
rounds and the fastest run of each is kept. Prints MB/s of the ``.rec`` bytes, the CPU
seconds used (all threads and worker processes), the converter's speed as a multiple of the
reference (target >= 2) and, as information, as a fraction of the copy. Example::

    python benchmarks/convert_speed.py                  # 40k records, workers 1 and 2
    python benchmarks/convert_speed.py --num-images 10000 --workers 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_rec(folder: str, num_images: int, num_classes: int, size: int, quality: int) -> str:
    """Write the synthetic insightface-layout dataset; returns the ``.rec`` path."""
    from facerec_tf.data.recordio_writer import synthetic_faces, write_insightface

    rec, _ = write_insightface(
        folder,
        synthetic_faces(num_images, num_classes, size=size, quality=quality),
        num_classes=num_classes,
        image_size=(size, size),
    )
    return os.fspath(rec)


# Each program prints the wall seconds of its timed part and the CPU seconds it used then
# (all threads, and worker processes).
_CPU = """\
import resource
def cpu():
    return sum(u.ru_utime + u.ru_stime for u in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
"""

_COPY = (
    _CPU
    + """\
import os, sys, time
c0, t0 = cpu(), time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as fin, open(sys.argv[2], "wb", buffering=0) as fout:
    while data := fin.read(1 << 20):
        fout.write(data)
    os.fsync(fout.fileno())
print(time.perf_counter() - t0, cpu() - c0)
"""
)

_CONVERT = (
    _CPU
    + """\
import sys, time
from facerec_tf.data.convert import convert
c0, t0 = cpu(), time.perf_counter()
convert(sys.argv[1], sys.argv[2], num_shards=int(sys.argv[3]), workers=int(sys.argv[4]),
        progress=False)
print(time.perf_counter() - t0, cpu() - c0)
"""
)

# The anchors' loop: MXIndexedRecordIO.read_idx (seek, frame header, frame) and
# mx.recordio.unpack, then tf.train.Example + tf.io.TFRecordWriter, shuffled like ours.
_REFERENCE = (
    _CPU
    + """\
import os, struct, sys, time
import numpy as np
import tensorflow as tf

rec_path, out, num_shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
idx = {}
with open(rec_path[:-4] + ".idx") as f:
    for line in f:
        k, v = line.split("\\t")
        idx[int(k)] = int(v)
c0, t0 = cpu(), time.perf_counter()
fin = open(rec_path, "rb")

def read_idx(key):
    fin.seek(idx[key])
    magic, lrec = struct.unpack("<II", fin.read(8))
    assert magic == 0xCED7230A and lrec >> 29 == 0
    length = lrec & ((1 << 29) - 1)
    data = fin.read(length)
    fin.read(-length % 4)
    return data

head = read_idx(0)
flag, label, id1, id2 = struct.unpack("<IfQQ", head[:24])
first, end = (int(x) for x in struct.unpack("<2f", head[24:32]))
keys = np.arange(1, first)
keys = keys[np.random.default_rng(0).permutation(keys.size)].tolist()
bounds = [i * len(keys) // num_shards for i in range(num_shards + 1)]
for s in range(num_shards):
    path = os.path.join(out, f"train-{s:05d}-of-{num_shards:05d}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for key in keys[bounds[s] : bounds[s + 1]]:
            record = read_idx(key)
            flag, label, id1, id2 = struct.unpack("<IfQQ", record[:24])
            if flag > 0:
                label = struct.unpack_from("<f", record, 24)[0]
            image = record[24 + 4 * flag :]
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                "image/key": tf.train.Feature(int64_list=tf.train.Int64List(value=[key])),
            }))
            writer.write(example.SerializeToString())
        writer.flush()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
print(time.perf_counter() - t0, cpu() - c0)
"""
)


def timed(program: str, *args: str) -> tuple[float, float]:
    """Run ``program`` in a fresh interpreter; the wall and CPU seconds it reports."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    r = subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, env=env
    )
    if r.returncode:
        sys.exit(f"benchmark step failed:\n{r.stderr}")
    wall, cpu = r.stdout.split()[-2:]
    return float(wall), float(cpu)


def best_of(repeats: int, out: str, steps: dict) -> dict:
    """``(wall, cpu)`` seconds of each step's fastest run over ``repeats`` rounds; the steps
    take turns in every round, so that each sees the same load on a shared machine."""
    best = {name: (float("inf"), float("inf")) for name in steps}
    for _ in range(repeats):
        for name, (program, *args) in steps.items():
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            best[name] = min(best[name], timed(program, *args))
    shutil.rmtree(out, ignore_errors=True)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=40_000)
    p.add_argument("--num-classes", type=int, default=1_000)
    p.add_argument("--image-size", type=int, default=112, help="JPEG side in pixels")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    p.add_argument("--workdir", help="where to build the data (default: a temp folder)")
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    work = tempfile.mkdtemp(prefix="convert_speed_", dir=args.workdir)
    try:
        rec = build_rec(
            os.path.join(work, "src"),
            args.num_images,
            args.num_classes,
            args.image_size,
            args.quality,
        )
        size_mb = os.path.getsize(rec) / 1e6
        out = os.path.join(work, "out")
        n = str(args.num_shards)
        steps = {
            "copy": (_COPY, rec, os.path.join(work, "copy.rec")),
            "reference": (_REFERENCE, rec, out, n),
            **{w: (_CONVERT, os.path.dirname(rec), out, n, str(w)) for w in args.workers},
        }
        best = best_of(args.repeats, out, steps)
        (copy, _), (ref, ref_cpu) = best.pop("copy"), best.pop("reference")
        print(
            f"{args.num_images} records, {size_mb:.1f} MB .rec, {args.num_shards} shards, "
            f"{os.cpu_count()} CPUs, best of {args.repeats}"
        )
        print(f"  copy (information)         {size_mb / copy:8.1f} MB/s")
        print(f"  reference (anchors' loop)  {size_mb / ref:8.1f} MB/s   {ref_cpu:6.2f} CPU-s")
        for w, (t, cpu) in best.items():
            print(
                f"  convert --workers {w:<2}       {size_mb / t:8.1f} MB/s   {cpu:6.2f} CPU-s   "
                f"{ref / t:.2f}x the reference (target >= 2), {copy / t:.2f}x a copy"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
