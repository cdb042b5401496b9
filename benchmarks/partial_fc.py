#!/usr/bin/env python3
"""Partial FC: per-replica classifier memory, and the classifier step at r = 1.0 vs r = 0.1.

1. Memory (arithmetic, no allocation): bytes per replica for the class centres plus their
   SGD momentum, full FC (every replica holds ``[C, D]``) vs Partial FC (``ceil(C / W)`` rows
   per replica), for C = 100k, 1M, 10M, D = 512, fp32, W = 8.
2. Time, measured on this CPU: one classifier step (all-gather, local cosines + margin,
   collective softmax, gradient, sampled-row SGD update) of
   :class:`facerec_tf.heads.partial_fc.PartialFC` at ``--classes`` (default 1M) on 2 logical
   CPU devices, ``sample_rate`` 1.0 vs 0.1, same run; prints the ratio (target >= 3x).

    python benchmarks/partial_fc.py                       # C = 1M, global batch 64
    python benchmarks/partial_fc.py --classes 200000 --steps 5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def memory_table(embedding: int = 512, replicas: int = 8) -> None:
    print(f"per-replica bytes, centres + momentum, D={embedding}, fp32, {replicas} replicas:")
    print(f"  {'classes':>12s} {'full FC':>12s} {'Partial FC':>12s} {'ratio':>7s}")
    for c in (100_000, 1_000_000, 10_000_000):
        full = 2 * c * embedding * 4
        part = 2 * math.ceil(c / replicas) * embedding * 4
        print(
            f"  {c:>12,d} {full / 2**30:>10.2f} GiB {part / 2**30:>10.3f} GiB {full / part:>6.1f}x"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--embedding", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="global batch (rows per step)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per rate")
    args = p.parse_args(argv)
    memory_table(args.embedding)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from facerec_tf.heads.partial_fc import PartialFC

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )
    w = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.batch, args.embedding)).astype(np.float32)
    labels = rng.integers(0, args.classes, args.batch).astype(np.int32)
    b = args.batch // w

    def split(a):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * b :][:b])
        )

    x, y = split(emb), split(labels)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\nclassifier step, C={args.classes:,}, D={args.embedding}, global batch "
        f"{args.batch}, {w} logical CPU devices, load average {load}"
    )
    times = {}
    for rate in (1.0, 0.1):
        pfc = PartialFC(
            args.classes,
            args.embedding,
            strategy=strategy,
            sample_rate=rate,
            global_batch=args.batch,
        )

        @tf.function
        def step(xb, yb, i, pfc=pfc):
            with tf.GradientTape() as tape:
                tape.watch(xb)
                out = pfc.forward(xb, yb, step=i, tape=tape)
            g_emb, g_w = tape.gradient(out.objective, [xb, out.weights])
            pfc.apply_gradients(out.sampled, g_w, learning_rate=0.1)
            return out.loss + 0.0 * tf.reduce_sum(g_emb)

        for i in range(2):  # trace + warm up
            strategy.run(step, args=(x, y, tf.constant(i)))
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = strategy.run(step, args=(x, y, tf.constant(i + 2)))
        float(strategy.experimental_local_results(loss)[0])
        times[rate] = (time.perf_counter() - t0) / args.steps
        print(
            f"  sample_rate {rate}: {pfc.num_sample:,} of {pfc.max_local:,} local classes "
            f"sampled, {times[rate] * 1000:.1f} ms per step"
        )
        del pfc
    ratio = times[1.0] / times[0.1]
    print(f"r=0.1 vs r=1.0: {ratio:.2f}x faster (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
