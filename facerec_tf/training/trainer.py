"""The training loop: ``strategy.run`` inside ``tf.function`` over a distributed dataset.

A custom loop rather than ``model.fit`` because Keras 3.15's ``fit`` fails under
MultiWorkerMirroredStrategy (keras-team/keras#20585) and because exact resume needs the data
iterator, the optimiser slots and the step in one checkpoint.

Per step, on every replica: forward, per-example cross-entropy averaged over the *global*
batch, gradients, one all-reduce, global-norm clip of the backbone gradient, coupled L2
(insightface-equivalent), optimiser update. The loss and the logits are float32 under every
precision policy.

Output folder layout::

    OUTPUT/config.json            resolved config (+ class/image counts)
    OUTPUT/checkpoints/ckpt-N.*   model, head, optimiser slots, step, loss scale (the data
                                  position is a function of the step)
    OUTPUT/tensorboard/           loss, accuracy, lr, images/s, loss scale, embedding norm,
                                  verification accuracy per target
    OUTPUT/best/backbone.keras    best embedding model by mean verification accuracy
    OUTPUT/export/backbone.keras  final embedding model; OUTPUT/export/saved_model/ (SavedModel)
    OUTPUT/metrics.json           final verification results and throughput

OUTPUT may be on any ``tf.io.gfile`` file system (a local or NFS path, ``gs://``, ...); every
file above is written through it. Under MultiWorkerMirroredStrategy it must be storage that
every worker sees: only the chief writes it, and on ``--resume`` every worker restores the
chief's latest checkpoint from it. Before the first step the workers compare their config,
restored step and weights digest (:class:`ClusterMismatchError` when one differs). A worker
that stops answering ends the others with :class:`WorkerLostError`; SIGTERM to any worker
(:class:`StopRequest`) makes every worker save a checkpoint at the same step and raise
:class:`PreemptedError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

from facerec_tf.config import TrainConfig
from facerec_tf.errors import FacerecError


class NonFiniteLossError(FacerecError, FloatingPointError):
    """The loss became NaN or Inf; training stopped, the last good checkpoint is kept."""

    def __init__(self, step: int, loss: float, checkpoint: str | None):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        kept = (
            f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        )
        super().__init__(f"non-finite loss {loss} at step {step}; training stopped ({kept})")


class ResumeError(FacerecError, RuntimeError):
    """A checkpoint cannot be restored exactly (e.g. it lacks optimiser state)."""


class ClusterMismatchError(ResumeError):
    """The workers of a multi-worker run disagree on the config or the restored state."""


class WorkerLostError(FacerecError, RuntimeError):
    """A peer worker stopped answering (killed, crashed, its machine lost) during training.

    Attributes:
        worker: the worker that stopped answering (``"worker 1"``), or ``None`` if unknown.
        step: the last step this worker completed (``None``: before training started).
        checkpoint: the latest checkpoint in the run folder, or ``None``.
    """

    def __init__(self, worker: str | None, step: int | None, checkpoint: str | None):
        self.worker, self.step, self.checkpoint = worker, step, checkpoint
        when = "before the first step" if step is None else f"at step {step}"
        super().__init__(
            f"{worker or 'a peer worker'} stopped answering {when}; last checkpoint: "
            f"{checkpoint or 'none (the run restarts from step 0)'}"
        )


class PreemptedError(FacerecError, RuntimeError):
    """SIGTERM reached a worker: every worker saved a checkpoint at ``step`` and stopped."""

    def __init__(self, step: int, checkpoint: str):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"stopped by SIGTERM (pre-emption) at step {step}; checkpoint saved: {checkpoint}"
        )


class StopRequest:
    """Records SIGTERM (what cloud schedulers send before pre-empting a machine) instead of
    dying; the trainer all-reduces the flag with every step, so all workers stop together."""

    def __init__(self):
        self.received = False
        self._previous = None

    def install(self) -> StopRequest:
        """Handle SIGTERM from now on (call from the main thread). The trainer calls it
        again when training starts: TensorFlow's coordination service installs its own
        SIGTERM handler when a multi-worker cluster starts."""

        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals

        def handler(signum, frame):
            self.received = True

        previous = signal.signal(signal.SIGTERM, handler)
        if self._previous is None:
            self._previous = previous
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


_LOST_ERRORS = ("UnavailableError", "AbortedError", "CancelledError", "DeadlineExceededError")
_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


def _is_peer_failure(error) -> bool:
    """A collective or coordination failure caused by another worker going away."""
    return type(error).__name__ in _LOST_ERRORS or "Collective ops is aborted" in str(error)


def _lost_worker(error, own: tuple[str, int] | None) -> str | None:
    """The first task named in ``error`` that is not this one (``"worker 1"``)."""
    for job, task in _TASK.findall(str(error)):
        if own is None or (job, int(task)) != own:
            return f"{job} {task}"
    return None


def _digest_words(text_or_bytes, words: int = 3) -> list[int]:
    """The first ``words`` 32-bit words of a sha256 (exact in float64)."""
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    h = hashlib.sha256(data).digest()
    return [int.from_bytes(h[4 * i : 4 * i + 4], "big") for i in range(words)]


def _format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class Trainer:
    """Trains a :class:`~facerec_tf.training.task.FaceRecognitionTask` under a strategy.

    Args:
        task: what to train.
        strategy: a ``tf.distribute`` strategy (see :func:`~facerec_tf.training.strategy.create_strategy`).
        output_dir: the run folder (see the module docstring).
        max_steps: stop after this many steps in total (for tests and smoke runs); the schedule
            still spans the configured number of steps.
        stream: where the progress lines go.
    """

    def __init__(
        self,
        task,
        strategy,
        output_dir: str,
        max_steps: int | None = None,
        stream=None,
        stop_request: StopRequest | None = None,
    ):
        import keras
        import tensorflow as tf

        from facerec_tf.export import absolute_path
        from facerec_tf.training.optim import build_optimizer, coupled_decay_multipliers
        from facerec_tf.training.schedules import build_schedule
        from facerec_tf.training.strategy import is_chief, num_workers, task_of

        self.task = task
        self.config: TrainConfig = task.config
        self.strategy = strategy
        self.output_dir = absolute_path(output_dir)
        self.stream = stream or sys.stdout
        self.chief = is_chief(strategy)
        self.num_workers = num_workers(strategy)
        self.task_id = task_of(strategy)  # ("worker", 1), or None without a cluster
        self.stop_request = stop_request
        rt = self.config.runtime
        self.precision = resolve_precision(rt.precision, strategy)

        self.per_replica_batch = self.config.data.batch_size
        self.global_batch = self.per_replica_batch * strategy.num_replicas_in_sync
        self.steps_per_epoch, self.total_steps = task.steps(self.global_batch)
        self.max_steps = min(max_steps or self.total_steps, self.total_steps)
        if self.num_workers > 1:  # before any variable: a different model would not even build
            try:
                self._agree_on_config()
            except tf.errors.OpError as e:
                if not _is_peer_failure(e):
                    raise
                latest = tf.train.latest_checkpoint(os.path.join(self.output_dir, "checkpoints"))
                raise WorkerLostError(_lost_worker(e, self.task_id), None, latest) from None

        if self.precision != "fp32":
            keras.mixed_precision.set_dtype_policy(self.precision)
        else:
            keras.mixed_precision.set_dtype_policy("float32")
        keras.utils.set_random_seed(rt.seed)

        self.head = self.partial_fc = self.objective = None
        with strategy.scope():
            self.backbone = task.build_backbone()
            if self.config.head.partial_fc:
                self.partial_fc = task.build_partial_fc(strategy, self.global_batch)
                backbone_variables = self.backbone.trainable_variables
                head_variables, centers = [], []
            else:
                self.head = task.build_head()
                self.objective = task.build_objective(self.backbone, self.head)
                backbone_variables = self.objective.backbone_variables
                head_variables = self.objective.head_variables
                centers = self.objective.centers
            self.schedule = build_schedule(
                self.config.schedule, self.steps_per_epoch, self.total_steps
            )
            self.optimizer = build_optimizer(
                self.config.optimizer, self.schedule, self.precision, centers
            )
            self.variables = backbone_variables + head_variables
            self.num_trained_backbone_variables = len(backbone_variables)
            # the clipped part: the backbone, or the PFE head when the backbone is frozen
            self.num_backbone_variables = len(backbone_variables) or (
                len(head_variables) if self.config.loss.pfe else 0
            )
            self.optimizer.build(self.variables)
            self.decay = coupled_decay_multipliers(
                self.config.optimizer,
                backbone_variables,
                head_variables,
                centers,
            )
            self.best_accuracy = tf.Variable(
                -1.0, trainable=False, dtype=tf.float32, name="best_accuracy"
            )

        # The data position is a pure function of the step (see :meth:`_make_iterator`), so
        # the checkpoint needs no iterator state (tf.distribute iterators over several
        # devices are not trackable anyway).
        self.iterator = None
        classifier = (
            {
                **({"head": self.head} if self.head is not None else {}),
                **self.objective.trackables(),
            }
            if self.partial_fc is None
            # [C, D] host copies, filled before each save: re-shardable on restore
            else {"partial_fc": tf.train.Checkpoint(**self.partial_fc.host_variables())}
        )
        self.checkpoint = tf.train.Checkpoint(
            backbone=self.backbone,
            **classifier,
            optimizer=self.optimizer,
            best_accuracy=self.best_accuracy,
            # Keras' seed-generator states (dropout): not tracked by the model's checkpoint
            # dependencies, yet needed for an exact resume.
            rng=tf.train.Checkpoint(
                **{f"state{i}": v.value for i, v in enumerate(_seed_states(self.backbone))}
            ),
        )
        # Every worker restores from the run folder; only the chief saves there. The other
        # workers must call save too (it may hold collectives), into a local scratch folder
        # that nothing reads.
        self.checkpoint_dir = os.path.join(self.output_dir, "checkpoints")
        ckpt_dir = self.checkpoint_dir
        if not self.chief:
            ckpt_dir = tempfile.mkdtemp(prefix="facerec_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            ckpt_dir,
            max_to_keep=rt.keep_checkpoints,
            step_counter=self.optimizer.iterations,
        )
        self.writer = None
        if self.chief:
            self.writer = tf.summary.create_file_writer(
                os.path.join(self.output_dir, "tensorboard")
            )
        else:
            self.writer = tf.summary.create_noop_writer()
        # Fine-tuning: the first freeze_steps steps train the head only (rounded up to whole
        # loops of steps_per_loop); the backbone's gradient is scaled by backbone_lr_mult.
        opt = self.config.optimizer
        self.freeze_steps = 0
        if opt.freeze_backbone_epochs > 0:
            loop = rt.steps_per_loop
            self.freeze_steps = loop * math.ceil(
                opt.freeze_backbone_epochs * self.steps_per_epoch / loop
            )
        self._train_fns = {}
        self._verification = None
        self.history: list[dict] = []

    # ---- the step ----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def _loss_scale(self):
        import tensorflow as tf

        scale = getattr(self.optimizer, "dynamic_scale", None)
        return tf.cast(scale, tf.float32) if scale is not None else tf.constant(1.0)

    def _scale_backbone_gradients(self, grads, num_backbone: int) -> list:
        """``optimizer.backbone_lr_mult``: with SGD (momentum linear in the gradient, coupled
        decay already added) scaling the gradient is scaling the learning rate, exactly."""
        mult = self.config.optimizer.backbone_lr_mult
        if mult == 1.0:
            return grads
        return [g * mult for g in grads[:num_backbone]] + list(grads[num_backbone:])

    def _replica_step(self, images, labels, train_backbone=True):
        import tensorflow as tf

        from facerec_tf.training.optim import process_gradients

        if self.partial_fc is not None:
            return self._partial_fc_step(images, labels)
        clip = self.config.optimizer.clip_norm
        # the head-only phase leaves the backbone's variables (and slots) alone
        skip = 0 if train_backbone else self.num_trained_backbone_variables
        variables, decay = self.variables[skip:], self.decay[skip:]
        num_clipped = self.num_backbone_variables if train_backbone else 0
        with tf.GradientTape() as tape:
            out = self.objective(images, labels, train_backbone=train_backbone)
            per_example = tf.add_n(list(out.terms.values()))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            scaled = (
                self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
            )
        grads = tape.gradient(scaled, variables)
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grads, grad_norm = process_gradients(
            grads, variables, decay, num_clipped, clip, self._loss_scale()
        )
        grads = self._scale_backbone_gradients(grads, self.num_trained_backbone_variables - skip)
        self.optimizer.apply_gradients(zip(grads, variables))
        correct = tf.constant(0.0)
        if out.logits is not None:
            predicted = tf.argmax(out.logits, axis=1, output_type=tf.int32)
            correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
        norm = tf.reduce_sum(tf.norm(tf.cast(out.embeddings, tf.float32), axis=1))
        figures = {"loss": loss, "correct": correct, "norm_sum": norm, "grad_norm": grad_norm}
        if len(out.terms) > 1:  # each term's share of the global-batch mean
            for name, value in out.terms.items():
                figures[f"term_{name}"] = tf.reduce_sum(value) / float(self.global_batch)
        return figures

    def _partial_fc_step(self, images, labels):
        """The step with sharded centres: the backbone goes through the Keras optimiser, the
        sampled centre rows through Partial FC's own SGD (same learning rate, momentum and
        coupled decay times ``centers_weight_decay_mult``)."""
        import tensorflow as tf

        from facerec_tf.models.backbone import backbone_input
        from facerec_tf.training.optim import process_gradients

        opt = self.config.optimizer
        pfc = self.partial_fc
        replicas = float(self.strategy.num_replicas_in_sync)
        step = self.optimizer.iterations
        learning_rate = tf.cast(self.schedule(step), tf.float32)  # before apply increments it
        with tf.GradientTape() as tape:
            inputs = backbone_input(images, self.config.model.include_preprocessing)
            embeddings = self.backbone(inputs, training=True)
            out = pfc.forward(embeddings, labels, step=step, tape=tape)
            scaled = (
                self.optimizer.scale_loss(out.objective)
                if hasattr(self.optimizer, "scale_loss")
                else out.objective
            )
        grads = tape.gradient(scaled, [*self.variables, out.weights])
        grads, centre_grad = grads[:-1], grads[-1]
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        scale = self._loss_scale()
        grads, grad_norm = process_gradients(
            grads, self.variables, self.decay, len(grads), opt.clip_norm, scale
        )
        grads = self._scale_backbone_gradients(grads, len(grads))
        # Under loss scaling a step with an overflow anywhere is skipped by every replica
        # (the Keras optimiser decides on the all-reduced backbone gradient; the centre
        # gradients are local, so their verdict is all-reduced too).
        overflow = 1.0 - tf.cast(tf.reduce_all(tf.math.is_finite(centre_grad)), tf.float32)
        finite = ctx.all_reduce(tf.distribute.ReduceOp.SUM, overflow) < 0.5
        finite = finite & tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        self.optimizer.apply_gradients(zip(grads, self.variables))

        def update():
            pfc.apply_gradients(
                out.sampled,
                centre_grad / scale,
                learning_rate=learning_rate,
                momentum=opt.momentum,
                weight_decay=opt.weight_decay * opt.centers_weight_decay_mult,
            )
            return tf.constant(True)

        tf.cond(finite, update, lambda: tf.constant(False))
        norm = tf.reduce_sum(tf.norm(tf.cast(embeddings, tf.float32), axis=1))
        # per-replica shares whose sum over replicas is the global figure
        return {
            "loss": out.loss / replicas,
            "correct": out.accuracy * float(self.global_batch) / replicas,
            "norm_sum": norm,
            "grad_norm": grad_norm,
        }

    def _train_fn(self, iterator, stop, step=None):
        """Run one loop of ``steps_per_loop`` steps (head-only before ``freeze_steps``);
        ``stop``: this worker's SIGTERM flag, all-reduced with the step; ``step``: the current
        step when the caller knows it (saves a read of the optimiser's counter)."""
        step = self.step if step is None else step
        train_backbone = step >= self.freeze_steps
        if train_backbone not in self._train_fns:
            self._train_fns[train_backbone] = self._build_train_fn(train_backbone)
        return self._train_fns[train_backbone](iterator, stop)

    def _build_train_fn(self, train_backbone=True):
        import functools

        import tensorflow as tf

        strategy = self.strategy
        steps = self.config.runtime.steps_per_loop
        SUM, MEAN = tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN

        # XLA compiles the replica step (forward, loss, gradients, collectives, optimiser);
        # the iterator stays outside the cluster, as Keras does for jit_compile.
        replica_step = functools.partial(self._replica_step, train_backbone=train_backbone)
        if self.config.runtime.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        def with_stop(images, labels, stop):
            # this worker's SIGTERM flag rides along with the step's figures: summed over
            # every replica, all workers see the same verdict after the same step
            return {**replica_step(images, labels), "stop": tf.identity(stop)}

        def one_step(iterator, stop):
            images, labels = next(iterator)
            out = strategy.run(with_stop, args=(images, labels, stop))
            return {
                k: strategy.reduce(MEAN if k == "grad_norm" else SUM, v, axis=None)
                for k, v in out.items()
            }

        def loop(iterator, stop):
            out = one_step(iterator, stop)
            if steps > 1:  # a Python test: with one step per call the step is traced once
                for _ in tf.range(steps - 1):  # figures of the last step are returned
                    out = one_step(iterator, stop)
            return out

        return tf.function(loop)

    def _make_iterator(self, step: int):
        """A distributed iterator positioned at ``step``: every input pipeline skips the
        ``step * replicas_per_pipeline`` per-replica batches that were already consumed."""
        dataset_fn = self.task.dataset_fn(self.per_replica_batch)

        def fn(input_context):
            per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
            return dataset_fn(input_context, start_batch=step * per_pipeline)

        return iter(self.strategy.distribute_datasets_from_function(fn))

    # ---- checkpoints -------------------------------------------------------------------------
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint in the run folder (the chief's), seen from this worker."""
        import tensorflow as tf

        return tf.train.latest_checkpoint(self.checkpoint_dir)

    def restore(self) -> int:
        """Restore the latest checkpoint in the run folder (exactly); returns the step."""
        path = self.latest_checkpoint()
        if path is None:
            return 0
        status = self.checkpoint.restore(path)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise ResumeError(
                f"checkpoint {path} does not hold the full training state (model, head, "
                f"optimizer slots, step); refusing to resume with partial state: {e}"
            ) from e
        if self.partial_fc is not None:
            self.partial_fc.from_host()  # re-shards for this run's replica count
        return self.step

    def save(self) -> str:
        if self.partial_fc is not None:
            self.partial_fc.to_host()  # a collective on multi-worker: every worker saves
        self.manager.save(checkpoint_number=self.step)
        return os.path.join(self.checkpoint_dir, f"ckpt-{self.step}")  # the chief's copy

    def _discard_latest_checkpoint(self) -> str | None:
        """Drop the newest checkpoint (its weights produced a non-finite loss) and return the
        one before it, which becomes the latest again."""
        import tensorflow as tf

        paths = list(self.manager.checkpoints)
        if not paths or not self.chief:
            return paths[-1] if paths else None
        bad = paths.pop()
        for f in tf.io.gfile.glob(bad + ".*"):
            tf.io.gfile.remove(f)
        tf.compat.v1.train.update_checkpoint_state(
            self.manager.directory,
            model_checkpoint_path=paths[-1] if paths else "",
            all_model_checkpoint_paths=paths,
        )
        return paths[-1] if paths else None

    # ---- agreement between workers -----------------------------------------------------------
    def _worker_name(self, row) -> str:
        job = "chief" if int(row[0]) == 1 else "worker"
        return f"{job} {int(row[1])}"

    def _gather_rows(self, values: list[int]) -> np.ndarray:
        """All-gather ``[is_chief_job, task id, *values]`` from every worker: one row per
        replica, in replica order (the chief's rows first)."""
        import tensorflow as tf

        job, index = self.task_id or ("worker", 0)
        row = tf.constant([[float(job == "chief"), float(index), *map(float, values)]], tf.float64)
        per_replica = self.strategy.experimental_distribute_values_from_function(lambda _: row)
        return self.strategy.gather(per_replica, axis=0).numpy()

    def _config_words(self) -> list[int]:
        resolved = self.config.to_dict()
        resolved["data"].pop("source", None)  # the data may be mounted at another path
        resolved["resolved"] = [
            self.task.num_classes,
            self.task.num_images,
            list(self.task.image_size),
            self.global_batch,
            self.max_steps,
        ]
        return _digest_words(json.dumps(resolved, sort_keys=True, default=str))

    def _agree_on_config(self) -> None:
        rows = self._gather_rows(self._config_words())
        for row in rows[1:]:
            if not np.array_equal(row[2:], rows[0][2:]):
                raise ClusterMismatchError(
                    f"{self._worker_name(row)} runs another configuration than the chief "
                    f"({self._worker_name(rows[0])}): give every worker the same --config, "
                    "--set and --max-steps; stopping every worker"
                )

    def _agree_on_state(self) -> None:
        """Every worker holds the chief's step and weights before the first step."""
        rows = self._gather_rows([self.step, *_digest_words(self.weights_digest())])
        chief = rows[0]
        for row in rows[1:]:
            if row[2] != chief[2]:
                raise ClusterMismatchError(
                    f"{self._worker_name(row)} restored step {int(row[2])} but the chief "
                    f"({self._worker_name(chief)}) restored step {int(chief[2])}: every worker "
                    "needs --resume and the run folder on storage they all see (this worker's: "
                    f"{self.output_dir}); stopping every worker"
                )
            if not np.array_equal(row[3:], chief[3:]):
                raise ClusterMismatchError(
                    f"{self._worker_name(row)} restored step {int(row[2])} with other weights "
                    f"than the chief ({self._worker_name(chief)}, step {int(chief[2])}): every "
                    f"worker must read the same checkpoints in {self.checkpoint_dir}; "
                    "stopping every worker"
                )

    def weights_digest(self) -> str:
        """sha256 of the trainable weights (kept identical on every replica and worker; BN
        moving statistics are per replica, as in insightface, and left out)."""
        import hashlib

        h = hashlib.sha256()
        for v in self.variables:
            h.update(np.ascontiguousarray(v.numpy()).tobytes())
        return h.hexdigest()

    # ---- verification ------------------------------------------------------------------------
    def _embed_fn(self):
        import tensorflow as tf

        if getattr(self, "_embed", None) is None:
            from facerec_tf.models.backbone import backbone_input

            keep = self.config.model.include_preprocessing
            self._embed = tf.function(
                lambda x: self.backbone(
                    backbone_input(tf.cast(x, tf.float32), keep), training=False
                )
            )
        return self._embed

    def verify(self) -> dict:
        from facerec_tf.evaluation.verification import embed_pairs, evaluate_embeddings

        if self._verification is None:
            self._verification = self.task.verification_sets()
        results = {}
        if self.objective is not None and self.objective.uncertainty is not None:
            return self._verify_pfe()
        embed = self._embed_fn()
        for name, images, issame in self._verification:
            emb, flipped = embed_pairs(lambda b: embed(b).numpy(), images, batch_size=64, flip=True)
            results[name] = evaluate_embeddings(name, emb, flipped, issame)
        return results

    def _verify_pfe(self) -> dict:
        """PFE runs: pairs scored with the mutual likelihood score (flipped copies fused)."""
        import tensorflow as tf

        from facerec_tf.evaluation.quality import evaluate_pfe
        from facerec_tf.evaluation.verification import embed_pairs

        model = self._pfe_model()
        fn = tf.function(lambda x: tf.concat(model(tf.cast(x, tf.float32), training=False), 1))
        dim = self.backbone.embedding_size
        results = {}
        for name, images, issame in self._verification:
            out, flipped = embed_pairs(lambda b: fn(b).numpy(), images, batch_size=64, flip=True)
            results[name] = evaluate_pfe(
                name, out[:, :dim], out[:, dim:], issame, flipped[:, :dim], flipped[:, dim:]
            )
        return results

    def _pfe_model(self):
        from facerec_tf.losses.pfe import build_pfe_model

        if getattr(self, "_pfe", None) is None:
            self._pfe = build_pfe_model(self.backbone, self.objective.uncertainty)
        return self._pfe

    # ---- the loop ----------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.chief:
            print(msg, file=self.stream, flush=True)

    def _write_json(self, name: str, obj) -> None:
        """``OUTPUT/name`` written whole through tf.io.gfile (temporary name, then rename)."""
        import tensorflow as tf

        tf.io.gfile.makedirs(self.output_dir)
        tmp = os.path.join(self.output_dir, f".{name}.tmp")
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2))
        tf.io.gfile.rename(tmp, os.path.join(self.output_dir, name), overwrite=True)

    def write_config(self) -> None:
        if not self.chief:
            return
        resolved = self.config.to_dict()
        resolved["resolved"] = {
            "num_classes": self.task.num_classes,
            "num_images": self.task.num_images,
            "image_size": list(self.task.image_size),
            "replicas": self.strategy.num_replicas_in_sync,
            "precision": self.precision,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }
        self._write_json("config.json", resolved)

    def train(self, resume: bool = False) -> dict:
        """Train to ``max_steps``; returns the summary (also ``OUTPUT/metrics.json``).

        Raises:
            ResumeError, ClusterMismatchError: see :meth:`restore` and the module docstring.
            WorkerLostError: a peer worker stopped answering (multi-worker runs).
            PreemptedError: SIGTERM reached a worker; a checkpoint was saved at the step.
        """
        import tensorflow as tf

        own_handler = self.stop_request is None
        if own_handler:
            self.stop_request = StopRequest()
        self.stop_request.install()
        step = 0
        try:
            return self._train(resume)
        except tf.errors.OpError as e:
            if self.num_workers <= 1 or not _is_peer_failure(e):
                raise
            step = getattr(self, "_last_step", 0)
            raise WorkerLostError(
                _lost_worker(e, self.task_id), step, self.latest_checkpoint()
            ) from None
        finally:
            if own_handler:
                self.stop_request.uninstall()
                self.stop_request = None
            if not self.chief:
                shutil.rmtree(self.manager.directory, ignore_errors=True)

    def _train(self, resume: bool) -> dict:
        import tensorflow as tf

        rt = self.config.runtime
        self.write_config()
        if resume:
            start = self.restore()
            self._log(
                f"resumed from step {start} ({self.latest_checkpoint()})"
                if start
                else "no checkpoint to resume from: starting at step 0"
            )
        elif self.latest_checkpoint() is not None:
            raise ResumeError(
                f"{self.checkpoint_dir} already holds checkpoints; pass --resume to continue "
                "that run or choose another --output"
            )
        self._last_step = self.step
        if self.num_workers > 1:
            self._agree_on_state()
        self._log(
            f"training {self.backbone.name} + {self.config.head.name} on "
            f"{self.task.dataset_name} ({self.task.num_classes} classes, {self.task.num_images} "
            f"images at {self.task.image_size[0]}x{self.task.image_size[1]}): "
            f"{self.strategy.num_replicas_in_sync} replica(s) x batch {self.per_replica_batch}, "
            f"{self.max_steps} of {self.total_steps} steps, precision {self.precision}"
        )
        self.iterator = self._make_iterator(self.step)
        last_good = self.latest_checkpoint()
        window_start, window_images = time.perf_counter(), 0
        run_start = time.perf_counter()
        step = last_saved = self.step
        while step < self.max_steps:
            stop = tf.constant(float(self.stop_request.received), tf.float32)
            out = self._train_fn(self.iterator, stop, step)
            step = self._last_step = self.step
            window_images += self.global_batch * rt.steps_per_loop
            loss = float(out["loss"].numpy())
            if not math.isfinite(loss):
                # The loss of step s is computed with the weights saved at step s - 1: if that
                # checkpoint is the newest, it holds the weights that diverged.
                if last_saved == step - 1 and self.manager.latest_checkpoint:
                    last_good = self._discard_latest_checkpoint()
                raise NonFiniteLossError(step, loss, last_good)
            if step % rt.log_every == 0 or step >= self.max_steps:
                elapsed = time.perf_counter() - window_start
                ips = window_images / max(elapsed, 1e-9)
                figures = {
                    "loss": loss,
                    "accuracy": float(out["correct"].numpy()) / self.global_batch,
                    "learning_rate": float(self.schedule(step - 1)),
                    "images_per_second": ips,
                    "loss_scale": float(self._loss_scale().numpy()),
                    "embedding_norm": float(out["norm_sum"].numpy()) / self.global_batch,
                    "grad_norm": float(out["grad_norm"].numpy()),
                    **{k: float(v.numpy()) for k, v in out.items() if k.startswith("term_")},
                }
                with self.writer.as_default(step=step):
                    for k, v in figures.items():
                        tf.summary.scalar(f"train/{k}", v)
                eta = (self.max_steps - step) * self.global_batch / max(ips, 1e-9)
                self._log(
                    f"step {step}/{self.max_steps} ({100.0 * step / self.max_steps:.0f}%) "
                    f"loss {loss:.4f} acc {figures['accuracy']:.3f} lr {figures['learning_rate']:.5f} "
                    f"{ips:.1f} img/s norm {figures['embedding_norm']:.2f} "
                    f"scale {figures['loss_scale']:g} ETA {_format_seconds(eta)}"
                    + "".join(
                        f" {k[5:]} {v:.4f}" for k, v in figures.items() if k.startswith("term_")
                    )
                )
                self.history.append({"step": step, **figures})
                window_start, window_images = time.perf_counter(), 0
            if float(out["stop"].numpy()) > 0 and step < self.max_steps:
                self.save()  # on every worker, at the same step
                self.writer.flush()
                if self.num_workers > 1:  # the chief's copy is complete before anyone leaves
                    self._gather_rows([])
                self._log(f"step {step}: SIGTERM received, checkpoint saved, stopping")
                raise PreemptedError(step, os.path.join(self.checkpoint_dir, f"ckpt-{step}"))
            if step % rt.checkpoint_every == 0 and step < self.max_steps:
                last_good = self.save() or last_good
                last_saved = step
            if rt.verify_every and step % rt.verify_every == 0 and step < self.max_steps:
                self._verify_and_log(step)
        train_seconds = time.perf_counter() - run_start
        if last_saved != self.step:
            self.save()
        results = self._verify_and_log(self.step)
        self.writer.flush()
        summary = {
            "steps": self.step,
            "train_seconds": train_seconds,
            "verification": {k: v.to_dict() for k, v in results.items()},
            "last": self.history[-1] if self.history else None,
        }
        summary["weights_digest"] = self.weights_digest()
        if self.chief:
            if rt.export:
                self.export()
            self._write_json("metrics.json", summary)
        if self.num_workers > 1:  # no worker leaves while another still writes the run folder
            self._gather_rows([])
        return summary

    def _verify_and_log(self, step: int) -> dict:
        import tensorflow as tf

        results = self.verify()
        if not results:
            return results
        with self.writer.as_default(step=step):
            for name, r in results.items():
                tf.summary.scalar(f"verification/{name}/accuracy", r.accuracy)
                tf.summary.scalar(f"verification/{name}/val_at_far_1e-3", r.val_at_far_1e3)
        for r in results.values():
            self._log(f"step {step} {r.line()} VAL@FAR=1e-3: {r.val_at_far_1e3:.5f}")
        mean_acc = float(np.mean([r.accuracy for r in results.values()]))
        if mean_acc > float(self.best_accuracy.numpy()):
            self.best_accuracy.assign(mean_acc)
            if self.chief:
                self._save_backbone(os.path.join(self.output_dir, "best", "backbone.keras"))
                self._log(f"step {step} new best mean verification accuracy {mean_acc:.5f}")
        return results

    def _save_backbone(self, path: str) -> None:
        from facerec_tf.export import export_keras
        from facerec_tf.training.task import set_synchronized_batch_norm

        set_synchronized_batch_norm(self.backbone, False)
        try:
            export_keras(self.backbone, path)
        finally:
            set_synchronized_batch_norm(self.backbone, self.config.model.sync_batch_norm)

    def export(self) -> str:
        from facerec_tf.export import export_for_serving, export_keras

        folder = os.path.join(self.output_dir, "export")
        self._save_backbone(os.path.join(folder, "backbone.keras"))
        export_for_serving(
            self.backbone,
            os.path.join(folder, "saved_model"),
            overwrite=True,
            precision=self.config.runtime.export_precision,
        )
        if self.objective is not None and self.objective.uncertainty is not None:
            # images -> [embedding, log sigma^2], for evaluate.py --pfe
            export_keras(self._pfe_model(), os.path.join(folder, "pfe.keras"))
        self._log(f"exported the embedding model to {folder}")
        return folder


def resolve_precision(precision: str, strategy) -> str:
    """``auto`` -> ``mixed_bfloat16`` under a TPU strategy, ``fp32`` otherwise."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    tpu = isinstance(strategy, tf.distribute.TPUStrategy | tf.distribute.experimental.TPUStrategy)
    return "mixed_bfloat16" if tpu else "fp32"


def _seed_states(model) -> list:
    """The seed-generator state variables of ``model`` (one per Dropout layer), in layer order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]
