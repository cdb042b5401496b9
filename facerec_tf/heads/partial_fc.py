"""Partial FC: class centres sharded across replicas, softmax normalised with collectives.

The classifier, not the backbone, is what outgrows one accelerator: 2M identities x 512 x
fp32 is 4 GB of centres, plus optimizer slots. Following insightface's Partial FC, the
centre matrix ``[C, D]`` is split into contiguous blocks, one per replica: replica ``r`` of
``W`` holds classes ``[start_r, start_r + C // W + (r < C % W))`` (:func:`shard_bounds`),
stored in a ``tf.distribute`` *sync-on-read* variable whose per-replica components hold
different rows (padded to the largest block), so no replica ever holds the whole matrix.

One step, in replica context (:meth:`PartialFC.forward`):

1. all-gather the embeddings and int32 labels of the global batch (``N = W * B`` rows);
2. optionally sample the local classes: all positives of the global batch plus random
   negatives, ``num_sample = max(ceil(r * local), min(N, local))`` columns, a static count
   (XLA/TPU friendly); ``r = 1`` uses every local class;
3. local cosines against the L2-normalised sampled centres, the combined margin
   ``(m1, m2, m3)`` applied only where the target class is local (``margin_gradient``
   ``"exact"`` or ``"arcface_torch"``, as in :func:`~facerec_tf.heads.angular.combined_margin`);
4. a softmax cross entropy over *all* classes from collectives: the row maximum is
   all-gathered, the sum of exponentials and the target logit are all-reduced, so every
   replica holds the exact full-softmax loss of the global batch.

Gradients flow through the collectives (their gradients are collectives too): each replica
returns ``objective = loss / W``, so the sum over replicas is the global-batch mean loss,
the convention of the trainer (backbone gradients summed over replicas). The centres'
gradient on replica ``r`` is the exact gradient of the full loss for its block.

Updates (:meth:`PartialFC.apply_gradients`): SGD with momentum and coupled weight decay,
written into the sampled rows only. With ``r < 1`` the rows not sampled this step keep
their weights *and* their momentum; arcface_torch's Partial FC v2 instead keeps the whole
local matrix in its optimizer, so every row's momentum decays and keeps moving it even when
not sampled. At ``r = 1`` both are plain SGD on the full classifier.

Checkpoints: :meth:`PartialFC.to_host` copies centres and momentum into ordinary
``[C, D]`` host variables (:attr:`PartialFC.host`, what a ``tf.train.Checkpoint`` saves)
and :meth:`PartialFC.from_host` loads them back, re-sharding for the current replica
count: a run saved on 4 replicas resumes on 2 (insightface saves one file per rank and
cannot).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from facerec_tf.hashing import hash_uniform
from facerec_tf.heads.angular import check_margin_gradient, combined_margin

__all__ = ["PartialFC", "PartialFCOutput", "shard_bounds"]

_NEG = -1.0e30  # logit of padding columns: exp(_NEG - max) == 0


def shard_bounds(num_classes: int, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, sizes)`` of the contiguous class blocks: shard ``r`` holds
    ``num_classes // num_shards + (r < num_classes % num_shards)`` classes."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_classes < num_shards:
        raise ValueError(
            f"{num_classes} classes cannot be split over {num_shards} replicas "
            "(each replica needs at least one class)"
        )
    sizes = np.array(
        [num_classes // num_shards + (r < num_classes % num_shards) for r in range(num_shards)],
        dtype=np.int64,
    )
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return starts, sizes


def _multi_worker(strategy) -> bool:
    in_multi_worker = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi_worker and in_multi_worker())


def _scatter_rows(variable, rows, values) -> None:
    """``variable[rows] = values`` on this replica's component, in place.

    Sync-on-read variables refuse ``scatter_update``; the raw op on the replica-local handle
    writes the rows without materialising a copy of the block (what ``assign`` of a
    ``tensor_scatter_nd_update`` result would do: at 1M classes that is 1 GB per replica).
    """
    tf.raw_ops.ResourceScatterUpdate(resource=variable.handle, indices=rows, updates=values)


class PartialFCOutput(NamedTuple):
    """What :meth:`PartialFC.forward` returns (all per replica)."""

    objective: tf.Tensor  # loss / num_replicas: differentiate this
    loss: tf.Tensor  # the full-softmax mean loss of the global batch (same on all replicas)
    accuracy: tf.Tensor  # fraction of global rows whose target logit is the row maximum
    sampled: tf.Tensor  # int32 [num_sample] local row indices used this step
    weights: tf.Tensor  # [num_sample, D] gathered centre rows (watched: take its gradient)


class PartialFC(tf.Module):
    """Sharded class centres and the margin softmax over them (see the module doc).

    Args:
        num_classes: number of identities ``C`` (at least the number of replicas).
        embedding_size: ``D``.
        strategy: the ``tf.distribute`` strategy (default: the current one).
        sample_rate: fraction ``r`` in (0, 1] of each replica's classes used per step.
        scale, m1, m2, m3: the combined margin (ArcFace: 64, 1, 0.5, 0).
        margin_gradient: ``"exact"`` (full gradient) or ``"arcface_torch"`` (the gradient of
            ``s * cos`` through the target, as arcface_torch's ``CombinedMarginLoss``).
        global_batch: rows per step over all replicas, to size the static sample
            (positives always fit); needed when ``sample_rate < 1``.
        seed: initialisation and sampling seed.
        stddev: standard deviation of the normal initialisation (arcface_torch: 0.01).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        strategy: tf.distribute.Strategy | None = None,
        sample_rate: float = 1.0,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        margin_gradient: str = "exact",
        global_batch: int | None = None,
        seed: int = 0,
        stddev: float = 0.01,
        name: str = "partial_fc",
    ) -> None:
        super().__init__(name=name)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.num_replicas = int(self.strategy.num_replicas_in_sync)
        self.sample_rate = float(sample_rate)
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)
        check_margin_gradient(margin_gradient, self.m1, self.m2, self.m3)
        self.margin_gradient = str(margin_gradient)
        self.seed = int(seed)
        self.stddev = float(stddev)
        starts, sizes = shard_bounds(self.num_classes, self.num_replicas)
        self.starts, self.sizes = starts, sizes
        self.max_local = int(sizes.max())
        if sample_rate < 1.0:
            if not global_batch:
                raise ValueError("global_batch is needed to size the sample when sample_rate < 1")
            wanted = math.ceil(sample_rate * self.max_local)
            self.num_sample = min(self.max_local, max(wanted, int(global_batch)))
        else:
            self.num_sample = self.max_local
        shape = [self.max_local, self.embedding_size]
        on_read = {
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.NONE,
            "trainable": False,
        }
        with self.strategy.scope():
            self.centers = tf.Variable(tf.zeros(shape), name="centers", **on_read)
            self.momentum = tf.Variable(tf.zeros(shape), name="momentum", **on_read)
        self.host: dict[str, tf.Variable] = {}
        self.initialize()

    # ---- per-replica constants ---------------------------------------------------------------
    def _bounds(self):
        ctx = tf.distribute.get_replica_context()
        rid = ctx.replica_id_in_sync_group
        start = tf.gather(tf.constant(self.starts, tf.int32), rid)
        size = tf.gather(tf.constant(self.sizes, tf.int32), rid)
        return ctx, rid, start, size

    def initialize(self) -> None:
        """N(0, stddev) centres (seeded per block), zero momentum."""

        def init():
            _, _, start, _ = self._bounds()
            seed = tf.stack([tf.constant(self.seed, tf.int32), start])
            value = tf.random.stateless_normal(
                [self.max_local, self.embedding_size], seed, stddev=self.stddev, alg="philox"
            )
            self.centers.assign(value)
            self.momentum.assign(tf.zeros_like(value))

        self.strategy.run(tf.function(init))

    # ---- the step ----------------------------------------------------------------------------
    def _sample(self, local_labels, size, seed):
        """Static-size sample of local rows: positives first, then random negatives."""
        rows = tf.range(self.max_local, dtype=tf.int32)
        if self.num_sample == self.max_local:
            return rows, local_labels
        positive = tf.scatter_nd(
            tf.reshape(tf.maximum(local_labels, 0), [-1, 1]),
            tf.cast(local_labels >= 0, tf.float32),
            [self.max_local],
        )
        score = hash_uniform(seed, self.max_local) + 2.0 * tf.minimum(positive, 1.0)
        score = tf.where(rows < size, score, -1.0)
        _, sampled = tf.math.top_k(score, k=self.num_sample, sorted=True)
        position = tf.tensor_scatter_nd_update(
            tf.fill([self.max_local], -1),
            tf.reshape(sampled, [-1, 1]),
            tf.range(self.num_sample, dtype=tf.int32),
        )
        remapped = tf.where(local_labels >= 0, tf.gather(position, tf.maximum(local_labels, 0)), -1)
        return sampled, remapped

    def forward(self, embeddings, labels, *, step=0, tape=None) -> PartialFCOutput:
        """The Partial FC loss of one replica's batch (call inside ``strategy.run``).

        Args:
            embeddings: ``[B, D]`` this replica's embeddings (any float dtype).
            labels: ``[B]`` int class ids in ``[0, C)``.
            step: the training step (sampling seed; sampling differs per step).
            tape: the ``tf.GradientTape`` recording the step; it is told to watch the
                gathered centre rows (:attr:`PartialFCOutput.weights`).
        """
        ctx, rid, start, size = self._bounds()
        emb = ctx.all_gather(tf.cast(embeddings, tf.float32), axis=0)
        lab = ctx.all_gather(tf.reshape(tf.cast(labels, tf.int32), [-1]), axis=0)
        local = lab - start
        local = tf.where((local >= 0) & (local < size), local, -1)
        seed = tf.stack(
            [tf.constant(self.seed, tf.int32) + 1, tf.cast(step, tf.int32) * 1024 + rid]
        )
        sampled, local = self._sample(local, size, seed)
        if self.num_sample == self.max_local:  # every row: no gathered copy
            weights = tf.identity(self.centers.read_value())
        else:
            weights = tf.gather(self.centers, sampled)
        if tape is not None:
            tape.watch(weights)
        cos = tf.matmul(
            tf.math.l2_normalize(emb, axis=1),
            tf.math.l2_normalize(weights, axis=1),
            transpose_b=True,
        )
        logits = combined_margin(
            cos,
            local,
            self.scale,
            self.m1,
            self.m2,
            self.m3,
            margin_gradient=self.margin_gradient,
        )
        logits = tf.where((sampled < size)[tf.newaxis, :], logits, _NEG)

        num_rows = tf.shape(logits)[0]
        local_max = tf.stop_gradient(tf.reduce_max(logits, axis=1))
        row_max = tf.reduce_max(ctx.all_gather(local_max[tf.newaxis, :], axis=0), axis=0)
        sum_exp = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM,
            tf.reduce_sum(tf.exp(logits - row_max[:, tf.newaxis]), axis=1),
        )
        index = tf.stack([tf.range(num_rows), tf.maximum(local, 0)], axis=1)
        target = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM,
            tf.where(local >= 0, tf.gather_nd(logits, index), 0.0),
        )
        per_row = tf.math.log(sum_exp) + row_max - target
        loss = tf.reduce_mean(per_row)
        accuracy = tf.reduce_mean(tf.cast(target >= row_max, tf.float32))
        objective = loss / float(self.num_replicas)
        return PartialFCOutput(objective, loss, accuracy, sampled, weights)

    def apply_gradients(
        self, sampled, gradient, *, learning_rate, momentum=0.9, weight_decay=5e-4
    ) -> None:
        """SGD with momentum and coupled weight decay on the sampled rows (replica context):
        ``v = momentum * v - lr * (g + wd * w); w = w + v`` (Keras' SGD form)."""
        _, _, _, size = self._bounds()
        gradient = tf.convert_to_tensor(gradient)
        if self.num_sample == self.max_local:  # every row: update in place, no scatter
            valid = (tf.range(self.max_local) < size)[:, tf.newaxis]
            w = self.centers.read_value()
            v = momentum * self.momentum.read_value() - learning_rate * (
                gradient + weight_decay * w
            )
            v = tf.where(valid, v, 0.0)
            self.momentum.assign(v)
            self.centers.assign_add(v)
            return
        # r < 1: read and write only the sampled rows, in place (no copy of the local block).
        w = tf.gather(self.centers, sampled)
        v_old = tf.gather(self.momentum, sampled)
        v = momentum * v_old - learning_rate * (gradient + weight_decay * w)
        valid = (sampled < size)[:, tf.newaxis]
        _scatter_rows(self.momentum, sampled, tf.where(valid, v, v_old))
        _scatter_rows(self.centers, sampled, tf.where(valid, w + v, w))

    # ---- whole-matrix views (cross-replica context) ------------------------------------------
    def _full(self, variable) -> np.ndarray:
        if _multi_worker(self.strategy):
            return self._gathered(variable)
        parts = self.strategy.experimental_local_results(variable)
        return np.concatenate([np.asarray(p)[: int(n)] for p, n in zip(parts, self.sizes)], axis=0)

    def _gathered(self, variable, chunk_rows: int = 65536) -> np.ndarray:
        """The ``[C, D]`` matrix assembled with all-gathers of ``chunk_rows`` rows at a time,
        so every worker of a multi-worker strategy gets it (local results only hold this
        worker's blocks) while no device holds more than ``W * chunk_rows`` gathered rows."""
        out = np.empty((self.num_classes, self.embedding_size), np.float32)
        chunk_rows = min(chunk_rows, self.max_local)

        @tf.function
        def gather(begin):
            ctx = tf.distribute.get_replica_context()
            rows = tf.minimum(begin + tf.range(chunk_rows), self.max_local - 1)
            return ctx.all_gather(tf.gather(variable, rows), axis=0)

        for begin in range(0, self.max_local, chunk_rows):
            value = self.strategy.run(gather, args=(tf.constant(begin),))
            block = np.asarray(self.strategy.experimental_local_results(value)[0])
            block = block.reshape(self.num_replicas, chunk_rows, self.embedding_size)
            for r in range(self.num_replicas):
                n = min(chunk_rows, int(self.sizes[r]) - begin)
                if n > 0:
                    start = int(self.starts[r]) + begin
                    out[start : start + n] = block[r, :n]
        return out

    def full_centers(self) -> np.ndarray:
        """The ``[C, D]`` centres in class order (single-worker strategies)."""
        return self._full(self.centers)

    def full_momentum(self) -> np.ndarray:
        return self._full(self.momentum)

    def load_full(self, centers, momentum=None) -> None:
        """Load ``[C, D]`` centres (and momentum) into this replica layout."""
        centers = np.asarray(centers, np.float32)
        if centers.shape != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"centres of shape {centers.shape} do not fit "
                f"({self.num_classes}, {self.embedding_size})"
            )
        momentum = np.zeros_like(centers) if momentum is None else np.asarray(momentum, np.float32)

        def block(full, ctx):
            r = ctx.replica_id_in_sync_group
            start, n = int(self.starts[r]), int(self.sizes[r])
            out = np.zeros((self.max_local, self.embedding_size), np.float32)
            out[:n] = full[start : start + n]
            return tf.constant(out)

        c = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: block(centers, ctx)
        )
        m = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: block(momentum, ctx)
        )

        def assign(c_value, m_value):
            self.centers.assign(c_value)
            self.momentum.assign(m_value)

        self.strategy.run(tf.function(assign), args=(c, m))

    def host_variables(self) -> dict[str, tf.Variable]:
        """The ``[C, D]`` host variables ``centers`` and ``momentum`` (put these in a
        ``tf.train.Checkpoint``; fill them with :meth:`to_host` before saving)."""
        if not self.host:
            shape = [self.num_classes, self.embedding_size]
            with tf.device("/CPU:0"):
                self.host = {
                    "centers": tf.Variable(tf.zeros(shape), trainable=False, name="centers"),
                    "momentum": tf.Variable(tf.zeros(shape), trainable=False, name="momentum"),
                }
        return self.host

    def to_host(self) -> dict[str, tf.Variable]:
        """Copy the sharded state into ``[C, D]`` host variables (save these)."""
        host = self.host_variables()
        host["centers"].assign(self.full_centers())
        host["momentum"].assign(self.full_momentum())
        return host

    def from_host(self) -> None:
        """Load the host variables (e.g. just restored from a checkpoint written with any
        number of replicas) into this replica layout."""
        host = self.host_variables()
        self.load_full(host["centers"].numpy(), host["momentum"].numpy())
