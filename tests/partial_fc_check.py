"""Partial FC checks on logical CPU devices, run by tests/test_partial_fc.py in fresh
processes: logical devices must be configured before TensorFlow starts, and one process
cannot hold MirroredStrategies of different sizes over the same devices (collective group
keys clash).

    python tests/partial_fc_check.py parity W       # r = 1 parity and r = 0.1 sampling
    python tests/partial_fc_check.py sparse W       # r = 0.1 row updates against NumPy
    python tests/partial_fc_check.py gradient W     # both margin_gradient modes vs NumPy
    python tests/partial_fc_check.py save W DIR     # train 2 steps on W replicas, save
    python tests/partial_fc_check.py load W DIR     # restore on W replicas

Each prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]

from facerec_tf.heads.margin import combined_margin  # noqa: E402
from facerec_tf.heads.partial_fc import PartialFC  # noqa: E402

F, D, N = 6, 8, 8  # input features, embedding size, global batch
S, M2 = 16.0, 0.3


def reference(x, y, kernel, centers):
    """Single-device full softmax: loss and gradients (kernel, centres)."""
    k = tf.Variable(kernel)
    c = tf.Variable(centers)
    with tf.GradientTape() as tape:
        emb = tf.matmul(x, k)
        cos = tf.matmul(
            tf.math.l2_normalize(emb, axis=1), tf.math.l2_normalize(c, axis=1), transpose_b=True
        )
        logits = combined_margin(cos, y, S, 1.0, M2, 0.0)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        )
    gk, gc = tape.gradient(loss, [k, c])
    return float(loss), gk.numpy(), gc.numpy()


def per_replica(strategy, array):
    """Split ``array`` over the replicas in order (replica r gets rows r*B .. (r+1)*B)."""
    w = strategy.num_replicas_in_sync
    b = array.shape[0] // w
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * b :][:b])
    )


def partial_fc_step(
    w, x, y, kernel, centers, sample_rate=1.0, step=0, m2=M2, margin_gradient="exact"
):
    strategy = tf.distribute.MirroredStrategy(DEVICES[:w])
    with strategy.scope():
        k = tf.Variable(kernel)
    pfc = PartialFC(
        centers.shape[0],
        D,
        strategy=strategy,
        sample_rate=sample_rate,
        scale=S,
        m2=m2,
        margin_gradient=margin_gradient,
        global_batch=N,
    )
    pfc.load_full(centers)

    @tf.function
    def step_fn(xb, yb):
        with tf.GradientTape() as tape:
            emb = tf.matmul(xb, k)
            out = pfc.forward(emb, yb, step=step, tape=tape)
        gk, gw = tape.gradient(out.objective, [k, out.weights])
        ctx = tf.distribute.get_replica_context()
        gk = ctx.all_reduce(tf.distribute.ReduceOp.SUM, gk)
        return out.loss, gk, gw, out.sampled

    loss, gk, gw, sampled = strategy.run(
        step_fn, args=(per_replica(strategy, x), per_replica(strategy, y))
    )
    losses = [float(v) for v in strategy.experimental_local_results(loss)]
    gk0 = strategy.experimental_local_results(gk)[0].numpy()
    # the centres' gradient, scattered back into class order
    gc = np.zeros_like(centers)
    for r, (g, s) in enumerate(
        zip(strategy.experimental_local_results(gw), strategy.experimental_local_results(sampled))
    ):
        s = s.numpy()
        keep = s < pfc.sizes[r]
        gc[pfc.starts[r] + s[keep]] = g.numpy()[keep]
    return (
        pfc,
        strategy,
        losses,
        gk0,
        gc,
        [v.numpy() for v in strategy.experimental_local_results(sampled)],
    )


def parity(w: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    x = rng.standard_normal((N, F)).astype(np.float32)
    kernel = rng.standard_normal((F, D)).astype(np.float32) * 0.5
    for c in (10, 11):  # 11 classes: uneven blocks (3,3,3,2 on 4 replicas)
        centers = rng.standard_normal((c, D)).astype(np.float32)
        y = rng.integers(0, c, N).astype(np.int32)
        ref_loss, ref_gk, ref_gc = reference(x, y, kernel, centers)
        _, _, losses, gk, gc, _ = partial_fc_step(w, x, y, kernel, centers)
        out[f"c{c}"] = {
            "loss_diff": max(abs(v - ref_loss) for v in losses),
            "kernel_grad_diff": float(np.abs(gk - ref_gk).max()),
            "centers_grad_diff": float(np.abs(gc - ref_gc).max()),
            "ref_loss": ref_loss,
            "kernel_grad_norm": float(np.linalg.norm(ref_gk)),
        }
    # r < 1: every positive of the global batch is sampled; the loss is finite
    c = 1000
    centers = rng.standard_normal((c, D)).astype(np.float32)
    y = rng.integers(0, c, N).astype(np.int32)
    pfc, _, losses, _, _, sampled = partial_fc_step(w, x, y, kernel, centers, 0.1, step=3)
    out["sampled"] = {
        "num_sample": pfc.num_sample,
        "positives_present": all(
            any(int(lab) == int(pfc.starts[r] + s) for r in range(w) for s in sampled[r])
            for lab in y
        ),
        "finite": all(np.isfinite(v) for v in losses),
        "distinct": all(len(set(s.tolist())) == len(s) for s in sampled),
    }
    return out


def gradient(w: int) -> dict:
    """ArcFace (m2 = 0.5) in both ``margin_gradient`` modes: loss and gradients of the
    backbone kernel and of the centres against the float64 NumPy reference; every field is a
    maximum difference relative to the reference's largest entry."""
    from margin_reference import margin_loss_and_grads

    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, F)).astype(np.float32)
    kernel = rng.standard_normal((F, D)).astype(np.float32) * 0.5
    out = {}
    for c in (10, 11):
        centers = rng.standard_normal((c, D)).astype(np.float32)
        y = rng.integers(0, c, N).astype(np.int32)
        emb = x.astype(np.float64) @ kernel
        refs = {
            mode: margin_loss_and_grads(emb, centers, y, s=S, m2=0.5, mode=mode)
            for mode in ("exact", "arcface_torch")
        }
        for mode, (loss, d_emb, d_centers) in refs.items():
            _, _, losses, gk, gc, _ = partial_fc_step(
                w, x, y, kernel, centers, m2=0.5, margin_gradient=mode
            )
            d_kernel = x.astype(np.float64).T @ d_emb
            other = refs["exact" if mode == "arcface_torch" else "arcface_torch"]
            out[f"{mode}_c{c}"] = {
                "loss": max(abs(v - loss) for v in losses) / loss,
                "kernel": float(np.abs(gk - d_kernel).max() / np.abs(d_kernel).max()),
                "centers": float(np.abs(gc - d_centers).max() / np.abs(d_centers).max()),
                # how far apart the two modes' references are (the test must be able to fail)
                "modes_apart": float(np.abs(other[2] - d_centers).max() / np.abs(d_centers).max()),
            }
    return out


def sparse_update(w: int, c: int = 1000, lr=0.1, mu=0.9, wd=5e-4) -> dict:
    """r = 0.1, two SGD steps: sampled rows follow ``v = mu v - lr (g + wd w); w += v``
    (NumPy, from the step's own gradients), every other row keeps weights and momentum."""
    rng = np.random.default_rng(2)
    strategy = tf.distribute.MirroredStrategy(DEVICES[:w])
    p = PartialFC(c, D, strategy=strategy, sample_rate=0.1, scale=S, m2=M2, global_batch=N)
    p.load_full(rng.standard_normal((c, D)).astype(np.float32))
    emb = rng.standard_normal((N, D)).astype(np.float32)
    y = rng.integers(0, c, N).astype(np.int32)

    @tf.function
    def train(xb, yb, step):
        with tf.GradientTape() as tape:
            o = p.forward(xb, yb, step=step, tape=tape)
        g = tape.gradient(o.objective, o.weights)
        p.apply_gradients(o.sampled, g, learning_rate=lr, momentum=mu, weight_decay=wd)
        return o.sampled, g

    weights, momentum = p.full_centers(), p.full_momentum()
    max_diff, untouched_equal, rows_updated = 0.0, True, 0
    for step in range(2):
        sampled, grads = strategy.run(
            train, args=(per_replica(strategy, emb), per_replica(strategy, y), tf.constant(step))
        )
        expect_w, expect_v = weights.copy(), momentum.copy()
        touched = np.zeros(c, bool)
        for r, (s, g) in enumerate(
            zip(
                strategy.experimental_local_results(sampled),
                strategy.experimental_local_results(grads),
            )
        ):
            s, g = s.numpy(), g.numpy()
            keep = s < p.sizes[r]
            rows = p.starts[r] + s[keep]
            v = mu * momentum[rows] - lr * (g[keep] + wd * weights[rows])
            expect_v[rows], expect_w[rows] = v, weights[rows] + v
            touched[rows] = True
        weights, momentum = p.full_centers(), p.full_momentum()
        max_diff = max(
            max_diff,
            float(np.abs(weights - expect_w).max()),
            float(np.abs(momentum - expect_v).max()),
        )
        untouched_equal &= bool(
            np.array_equal(weights[~touched], expect_w[~touched])
            and np.array_equal(momentum[~touched], expect_v[~touched])
        )
        rows_updated = int(touched.sum())
    return {"max_diff": max_diff, "untouched_equal": untouched_equal, "rows": rows_updated}


C_RESHARD = 11


def reshard_data():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((N, D)).astype(np.float32)
    y = rng.integers(0, C_RESHARD, N).astype(np.int32)
    return emb, y


def loss_of(p, strategy, emb, y):
    fn = tf.function(lambda a, b: p.forward(a, b).loss)
    values = strategy.run(fn, args=(per_replica(strategy, emb), per_replica(strategy, y)))
    return float(strategy.experimental_local_results(values)[0])


def save(w: int, folder: str) -> dict:
    """Train 2 steps on ``w`` replicas and save the host copy."""
    emb, y = reshard_data()
    strategy = tf.distribute.MirroredStrategy(DEVICES[:w])
    p = PartialFC(C_RESHARD, D, strategy=strategy, scale=S, m2=M2, seed=5)

    @tf.function
    def train(xb, yb):
        with tf.GradientTape() as tape:
            o = p.forward(xb, yb, tape=tape)
        g = tape.gradient(o.objective, o.weights)
        p.apply_gradients(o.sampled, g, learning_rate=0.1)
        return o.loss

    for _ in range(2):
        strategy.run(train, args=(per_replica(strategy, emb), per_replica(strategy, y)))
    host = p.to_host()
    tf.train.Checkpoint(**host).write(os.path.join(folder, "ckpt"))
    np.save(os.path.join(folder, "centers.npy"), p.full_centers())
    np.save(os.path.join(folder, "momentum.npy"), p.full_momentum())
    return {
        # the all-gather assembly (multi-worker path), in chunks smaller than a block
        "gathered_equal": bool(
            np.array_equal(p._gathered(p.centers, chunk_rows=2), p.full_centers())
            and np.array_equal(p._gathered(p.momentum, chunk_rows=2), p.full_momentum())
        ),
        "loss": loss_of(p, strategy, emb, y),
        "local_rows": [int(v.shape[0]) for v in strategy.experimental_local_results(p.centers)],
        "momentum_nonzero": bool(np.abs(p.full_momentum()).max() > 0),
    }


def load(w: int, folder: str) -> dict:
    emb, y = reshard_data()
    strategy = tf.distribute.MirroredStrategy(DEVICES[:w])
    p = PartialFC(C_RESHARD, D, strategy=strategy, scale=S, m2=M2, seed=99)
    tf.train.Checkpoint(**p.host_variables()).read(os.path.join(folder, "ckpt")).assert_consumed()
    p.from_host()
    return {
        "loss": loss_of(p, strategy, emb, y),
        "centers_equal": bool(
            np.array_equal(p.full_centers(), np.load(os.path.join(folder, "centers.npy")))
        ),
        "momentum_equal": bool(
            np.array_equal(p.full_momentum(), np.load(os.path.join(folder, "momentum.npy")))
        ),
        "local_rows": [int(v.shape[0]) for v in strategy.experimental_local_results(p.centers)],
    }


def main() -> int:
    mode, w = sys.argv[1], int(sys.argv[2])
    if mode == "parity":
        result = parity(w)
    elif mode == "sparse":
        result = sparse_update(w)
    elif mode == "gradient":
        result = gradient(w)
    elif mode == "save":
        result = save(w, sys.argv[3])
    else:
        result = load(w, sys.argv[3])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
