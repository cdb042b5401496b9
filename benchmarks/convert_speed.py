#!/usr/bin/env python3
"""Benchmark of the ``.rec`` -> TFRecord converter against a plain copy of the same bytes.

Builds a synthetic insightface-layout ``.rec`` (default 200,000 records of 112x112 JPEGs of
about 4 KB, like insightface's 112x112 face crops) with :mod:`facerec_tf.data.recordio_writer`,
then, in the same run and on the same (page-cached) file:

* **copy**: reads the ``.rec`` in 1 MiB chunks and writes it to a new file, then fsyncs it
  (``cp`` + ``sync``: the reference of the issue's target);
* **convert**: calls ``facerec_tf.data.convert.convert`` in a fresh process (shuffled reads
  by offset, JPEG header checks, Example encoding, CRCs, sha256, fsync of every shard), once
  per ``--workers`` value, timing the call and the whole process, and reads its peak resident
  memory (the largest of the converter process and its worker processes, via
  ``RUSAGE_CHILDREN`` of a tiny wrapper process). The converter writes its shards with
  ``O_DIRECT`` on local disks (:mod:`facerec_tf.data.directio`); ``--buffered`` (default on)
  adds a run with buffered writes (``--no-direct-io``) and ``--pure-python`` one without
  the C accelerator;
* for reference, a **direct copy** (the same copy with ``O_DIRECT`` writes, the converter's
  own write method) and a **shuffled copy**: every record read at its offset in shuffled
  order and appended to a file, with no parsing, checks, encoding or hashing.

Prints MB/s of both, their ratio (target >= 0.5) and the converter's peak RSS (target
<= 500 MB). Example::

    python benchmarks/convert_speed.py                      # 200k records, workers 1 and 2
    python benchmarks/convert_speed.py --num-images 20000 --image-size 16 --workers 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "tools", "convert_rec_to_tfrecord.py")


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


def copy_file(src: str, dst: str, chunk: int = 1 << 20) -> float:
    """Plain read + write copy of ``src`` (fsynced); returns seconds."""
    t0 = time.perf_counter()
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while True:
            data = fin.read(chunk)
            if not data:
                break
            fout.write(data)
        os.fsync(fout.fileno())
    return time.perf_counter() - t0


def direct_copy_file(src: str, dst: str, chunk: int = 1 << 20) -> float | None:
    """The same copy with ``O_DIRECT`` writes (what the converter does on a local disk):
    reads into an aligned buffer, writes whole blocks, the last one padded then truncated;
    ``None`` where the file system refuses ``O_DIRECT``."""
    from facerec_tf.data import directio

    if not directio.supported():
        return None
    buf = directio.aligned_buffer(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    except OSError:
        os.close(fin)
        return None
    try:
        size = 0
        while n := os.readv(fin, [view]):
            size += n
            os.write(fout, view[: -(-n // directio.ALIGN) * directio.ALIGN])
        os.ftruncate(fout, size)
        os.fsync(fout)
    except OSError:
        return None
    finally:
        os.close(fin)
        os.close(fout)
    return time.perf_counter() - t0


_RSS_WRAPPER = """\
import resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(time.perf_counter() - t0, u.ru_maxrss, u.ru_utime + u.ru_stime, r.stdout.strip() or "nan")
sys.exit(r.returncode)
"""

# The converter as a library call, timed inside its own process once the library is imported
# (the figure comparable to the in-process copy); the wrapper above times the whole process.
_CONVERT = """\
import sys, time
from facerec_tf.data.convert import convert
t0 = time.perf_counter()
direct = {"auto": None, "on": True, "off": False}[sys.argv[5]]
convert(sys.argv[1], sys.argv[2], num_shards=int(sys.argv[3]), workers=int(sys.argv[4]),
        progress=False, direct_io=direct)
print(time.perf_counter() - t0)
"""


def run_converter(
    rec_dir: str,
    out: str,
    num_shards: int,
    workers: int,
    *,
    pure_python: bool = False,
    direct_io: str = "auto",
) -> tuple[float, float, int, float]:
    """Convert in a fresh process; returns ``(seconds of the convert() call, seconds of the
    whole process, peak_rss_bytes, cpu_seconds)``, the last two over it and its workers.

    The process is started from a tiny wrapper process, whose ``RUSAGE_CHILDREN``
    ``ru_maxrss`` is the largest resident size among the converter and its workers (a child
    forked from this bigger process would report this process's size as its own at ``exec``).
    ``pure_python`` turns the C accelerator off (``FACEREC_TF_PURE_PYTHON=1``); ``direct_io``
    is ``"auto"`` (the converter's default), ``"on"`` or ``"off"`` (buffered shard writes).
    """
    cmd = [
        sys.executable,
        "-c",
        _CONVERT,
        rec_dir,
        out,
        str(num_shards),
        str(workers),
        direct_io,
    ]
    env = dict(os.environ)
    env.pop("FACEREC_TF_PURE_PYTHON", None)
    if pure_python:
        env["FACEREC_TF_PURE_PYTHON"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, *cmd],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if r.returncode != 0:
        raise SystemExit(f"converter failed with exit status {r.returncode}: {r.stderr}")
    total, maxrss_kib, cpu, call = r.stdout.split()
    return float(call), float(total), int(maxrss_kib) * 1024, float(cpu)  # Linux: KiB


def shuffled_copy(rec: str, dst: str, seed: int = 0) -> float:
    """Read every record at its ``.idx`` offset in shuffled order and append it to ``dst``.

    The converter's I/O pattern with none of its work (no parsing, checks, encoding, CRC or
    sha256): a reference for how much of its time is Python-level per-record overhead.
    """
    import numpy as np

    idx = os.path.splitext(rec)[0] + ".idx"
    offsets = np.loadtxt(idx, dtype=np.int64, delimiter="\t", ndmin=2)[:, 1]
    order = np.sort(offsets)
    ends = np.append(order[1:], os.path.getsize(rec))
    sizes = dict(zip(order.tolist(), (ends - order).tolist()))
    todo = offsets[np.random.default_rng(seed).permutation(offsets.size)].tolist()
    t0 = time.perf_counter()
    fd = os.open(rec, os.O_RDONLY)
    try:
        with open(dst, "wb", buffering=1 << 20) as out:
            for off in todo:
                out.write(os.pread(fd, sizes[off], off))
            out.flush()
            os.fsync(out.fileno())
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=200_000)
    p.add_argument("--num-classes", type=int, default=2_000)
    p.add_argument("--image-size", type=int, default=112, help="JPEG side in pixels")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--num-shards", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs of each, best is kept")
    p.add_argument(
        "--pure-python",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the converter without its C accelerator",
    )
    p.add_argument(
        "--buffered",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the converter with buffered shard writes (--no-direct-io)",
    )
    p.add_argument("--workdir", help="where to build the data (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="convert_speed-")
    os.makedirs(work, exist_ok=True)
    try:
        rec_dir = os.path.join(work, "rec")
        t0 = time.perf_counter()
        rec = build_rec(rec_dir, args.num_images, args.num_classes, args.image_size, args.quality)
        size = os.path.getsize(rec)
        mb = size / 1e6
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} CPUs, load average {load}")
        print(
            f"synthetic .rec: {args.num_images} records, {args.num_classes} classes, "
            f"{args.image_size}x{args.image_size} JPEG q{args.quality}, {mb:.1f} MB "
            f"(built in {time.perf_counter() - t0:.1f} s)"
        )
        copy_file(rec, os.path.join(work, "warmup.bin"))  # page cache warm for both
        os.unlink(os.path.join(work, "warmup.bin"))
        from facerec_tf.data import directio, fastrec

        print(
            "C accelerator: "
            + ("built (facerec_tf.data._fastrec)" if fastrec.available() else "NOT available")
            + "; shard writes by default (direct_io=None): "
            + ("direct I/O (O_DIRECT)" if directio.default_for(work) else "buffered")
        )

        def copy_once() -> float:
            t = copy_file(rec, os.path.join(work, "copy.bin"))
            os.unlink(os.path.join(work, "copy.bin"))
            return t

        # Interleave the runs (copy, converter, copy, converter, ...) and keep the best of
        # each: a shared 2-core machine's noise then hits both sides alike.
        def direct_copy_once() -> float | None:
            t = direct_copy_file(rec, os.path.join(work, "copy.bin"))
            if os.path.exists(os.path.join(work, "copy.bin")):
                os.unlink(os.path.join(work, "copy.bin"))
            return t

        copies: list[float] = []
        direct_copies: list[float] = []
        runs: dict[tuple[int, bool, str], list[tuple[float, float, int, float]]] = {}
        configs = [(w, False, "auto") for w in args.workers]
        if args.buffered:
            configs.append((max(args.workers), False, "off"))
        if args.pure_python:
            configs.append((max(args.workers), True, "auto"))
        for _ in range(args.repeats):
            for workers, pure, direct in configs:
                copies.append(copy_once())
                if (t := direct_copy_once()) is not None:
                    direct_copies.append(t)
                out = os.path.join(work, f"out-w{workers}")
                runs.setdefault((workers, pure, direct), []).append(
                    run_converter(
                        rec_dir, out, args.num_shards, workers, pure_python=pure, direct_io=direct
                    )
                )
                shutil.rmtree(out)
        copies.append(copy_once())
        t_copy = min(copies)
        copy_mbs = mb / t_copy
        print(
            f"plain read+write copy (1 MiB chunks, fsync), best of {len(copies)}: "
            f"{t_copy:.2f} s, {copy_mbs:.0f} MB/s (worst {max(copies):.2f} s)"
        )
        if direct_copies:
            t_direct = min(direct_copies)
            print(
                f"reference, the same copy with O_DIRECT writes, best of {len(direct_copies)}: "
                f"{t_direct:.2f} s, {mb / t_direct:.0f} MB/s"
            )
        t_shuf = shuffled_copy(rec, os.path.join(work, "shuffled.bin"))
        os.unlink(os.path.join(work, "shuffled.bin"))
        print(
            f"reference, shuffled per-record pread+write in one Python thread (no checks or "
            f"encoding): {t_shuf:.2f} s, {mb / t_shuf:.0f} MB/s = {t_copy / t_shuf:.2f}x of "
            "the plain copy"
        )
        ok: bool | None = None  # None: the default configuration was not run
        default_workers = min(4, os.cpu_count() or 1)  # the command line's default --workers
        for (workers, pure, direct), results in runs.items():
            call, total, _, cpu = min(results)
            ratio = t_copy / call
            rss_mb = max(r[2] for r in results) / 1e6
            if not pure and direct == "auto" and workers == default_workers:
                ok = ratio >= 0.5 and rss_mb <= 500
            flags = {"auto": "", "on": " --direct-io", "off": " --no-direct-io"}[direct]
            print(
                f"converter --workers {workers} --num-shards {args.num_shards}{flags}"
                f"{' (pure Python)' if pure else ''}, best of {len(results)}: "
                f"convert() {call:.2f} s, {mb / call:.0f} MB/s, {args.num_images / call:,.0f} "
                f"images/s, ratio {ratio:.2f}x of copy (target >= 0.5)"
                + (f", {t_direct / call:.2f}x of the O_DIRECT copy" if direct_copies else "")
                + f"; whole process with "
                f"interpreter start and imports {total:.2f} s = {t_copy / total:.2f}x; "
                f"peak RSS {rss_mb:.0f} MB per process (target <= 500); "
                f"CPU {cpu:.2f} s in all processes = {mb / cpu:.0f} MB/s per busy core"
            )
        print(
            f"targets (judged on the default --workers {default_workers} run): "
            + {True: "met", False: "NOT met", None: "not judged (not run)"}[ok]
        )
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
