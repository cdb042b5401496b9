"""The face-recognition task: what to train (model, inputs, loss, verification targets).

The :class:`facerec_tf.training.trainer.Trainer` decides *how* (loop, strategy, checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

from facerec_tf.config import TrainConfig
from facerec_tf.errors import ConfigError
from facerec_tf.training.saved_models import load_backbone

SYNTHETIC = "synthetic"


class FaceRecognitionTask:
    """Builds the backbone, the margin head, the input pipeline and the loss from a config."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.manifest = None
        self._warned: set[str] = set()
        if config.data.source != SYNTHETIC:
            from facerec_tf.data.pipeline import read_manifest

            self.manifest = read_manifest(config.data.source)

    # ---- sizes -----------------------------------------------------------------------------
    def _from_manifest(self, key: str, manifest_key: str):
        """The manifest is authoritative; a preset value that disagrees is reported."""
        n = self.manifest[manifest_key]
        n = tuple(int(v) for v in n) if isinstance(n, list) else int(n)
        configured = getattr(self.config.data, key)
        if isinstance(configured, list):
            configured = tuple(configured)
        if configured and configured != n and key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"config key 'data.{key}' is {configured} but the manifest of "
                f"{self.config.data.source} says {n}: using {n}",
                stacklevel=3,
            )
        return n

    @property
    def num_classes(self) -> int:
        if self.manifest is not None:
            return self._from_manifest("num_classes", "num_classes")
        if self.config.data.num_classes <= 0:
            raise ConfigError("must be > 0 for the synthetic source", key="data.num_classes")
        return self.config.data.num_classes

    @property
    def num_images(self) -> int:
        if self.manifest is not None:
            return self._from_manifest("num_images", "num_images")
        if self.config.data.num_images <= 0:
            raise ConfigError("must be > 0 for the synthetic source", key="data.num_images")
        return self.config.data.num_images

    @property
    def image_size(self) -> tuple[int, int]:
        """The model's input size: the images' size from the manifest (the pipeline does not
        resize), else ``data.image_size``."""
        if self.manifest is not None:
            return self._from_manifest("image_size", "image_size")
        return tuple(int(v) for v in self.config.data.image_size)

    @property
    def dataset_name(self) -> str:
        """For logs: ``data.dataset``, or the data folder's name when a preset's name
        (``synthetic``) was left on a real dataset."""
        d = self.config.data
        if d.source != SYNTHETIC and d.dataset == SYNTHETIC:
            return os.path.basename(os.path.normpath(d.source))
        return d.dataset

    def steps(self, global_batch: int) -> tuple[int, int]:
        """(steps_per_epoch, total_steps)."""
        per_epoch = max(1, self.num_images // global_batch)
        total = self.config.schedule.total_steps or math.ceil(
            self.config.schedule.epochs * per_epoch
        )
        return per_epoch, max(total, 1)

    # ---- model -------------------------------------------------------------------------------
    def build_backbone(self):
        """The backbone: built from ``model.backbone``, or (``model.pretrained``) with the
        architecture and weights of the pretrained file, rebuilt under the run's dtype policy."""
        from facerec_tf.models import create_backbone

        m = self.config.model
        if m.pretrained:
            backbone = self._pretrained_backbone()
        else:
            if not m.backbone:
                raise ConfigError(
                    "is empty: name a backbone, or set model.pretrained to take the "
                    "architecture from a pretrained file",
                    key="model.backbone",
                )
            if m.embedding_size <= 0:
                raise ConfigError(
                    "must be > 0 (0 takes the size of model.pretrained)", key="model.embedding_size"
                )
            h, w = self.image_size
            kwargs = {
                "embedding_size": m.embedding_size,
                "input_shape": (h, w, 3),
                "include_preprocessing": m.include_preprocessing,
            }
            for key in ("dropout", "l2_normalize"):
                if getattr(m, key) is not None:
                    kwargs[key] = getattr(m, key)
            try:
                backbone = create_backbone(m.backbone, **kwargs)
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e), key="model.backbone") from e
        if m.sync_batch_norm:
            set_synchronized_batch_norm(backbone, True)
        return backbone

    def _pretrained_backbone(self):
        """``model.pretrained`` (.keras, run folder, arcface_torch .pth, insightface .onnx):
        its class and constructor arguments give the architecture; the run's dtype policy,
        ``model.dropout`` and ``model.include_preprocessing`` apply; the weights are copied."""
        from facerec_tf.models import architecture_differences

        m = self.config.model
        source = load_backbone(m.pretrained, key="model.pretrained")
        arch = dict(source.get_config())
        name = arch.pop("name", source.name)
        for key in ("trainable", "dtype"):
            arch.pop(key, None)
        if m.backbone:
            try:
                differences = architecture_differences(m.backbone, source)
            except ValueError as e:
                raise ConfigError(str(e), key="model.backbone") from e
            if differences:
                found = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differences.items())
                raise ConfigError(
                    f"is {m.backbone!r} but model.pretrained ({m.pretrained}) holds another "
                    f"architecture, {name!r} ({found}); leave model.backbone empty to take "
                    "the file's architecture",
                    key="model.backbone",
                )
        size = tuple(int(v) for v in arch.get("input_shape", (0, 0))[:2])
        if size != tuple(self.image_size):
            raise ConfigError(
                f"{m.pretrained} takes {size[0]}x{size[1]} images but the data are "
                f"{self.image_size[0]}x{self.image_size[1]}",
                key="model.pretrained",
            )
        if bool(arch.get("include_preprocessing", True)) != m.include_preprocessing:
            raise ConfigError(
                f"{m.pretrained} was built with include_preprocessing="
                f"{arch.get('include_preprocessing')} but model.include_preprocessing is "
                f"{m.include_preprocessing}: set it to match the file",
                key="model.include_preprocessing",
            )
        if m.embedding_size and arch.get("embedding_size", m.embedding_size) != m.embedding_size:
            warnings.warn(
                f"config key 'model.embedding_size' is {m.embedding_size} but "
                f"{m.pretrained} gives {arch['embedding_size']}: using {arch['embedding_size']}",
                stacklevel=3,
            )
        m.embedding_size = int(arch.get("embedding_size", source.embedding_size))
        for key in ("dropout", "l2_normalize"):
            if getattr(m, key) is not None and key in arch:
                arch[key] = getattr(m, key)
        backbone = type(source)(name=name, **arch)
        try:
            backbone.set_weights(source.get_weights())
        except ValueError as e:  # a file whose weights do not fit its own config
            raise ConfigError(
                f"cannot copy the weights of {m.pretrained}: {e}", key="model.pretrained"
            ) from e
        return backbone

    def build_head(self):
        """The classification head, or ``None`` for ``head.name=none``."""
        from facerec_tf.config import head_kwargs
        from facerec_tf.heads import create_head

        h = self.config.head
        if h.name == "none":
            return None
        head = create_head(h.name, self.num_classes, **head_kwargs(h))
        head.build((None, self.config.model.embedding_size))
        return head

    def build_objective(self, backbone, head):
        """The per-example loss terms (see :mod:`facerec_tf.training.objective`)."""
        from facerec_tf.training.objective import Objective

        return Objective(self, backbone, head)

    def build_partial_fc(self, strategy, global_batch: int):
        """The sharded classifier (``head.partial_fc``): the head's margin, centres split
        over the strategy's replicas."""
        from facerec_tf.heads import MARGIN_PRESETS
        from facerec_tf.heads.partial_fc import PartialFC

        h = self.config.head
        spec = dataclasses.asdict(MARGIN_PRESETS[h.name])
        margins = {k: getattr(h, k) if getattr(h, k) is not None else spec[k] for k in spec}
        return PartialFC(
            self.num_classes,
            self.config.model.embedding_size,
            strategy=strategy,
            sample_rate=h.sample_rate,
            scale=h.scale,
            m1=margins["m1"],
            m2=margins["m2"],
            m3=margins["m3"],
            margin_gradient=h.margin_gradient,
            global_batch=global_batch,
            seed=self.config.runtime.seed,
        )

    # ---- data --------------------------------------------------------------------------------
    def dataset_fn(self, per_replica_batch: int):
        """``fn(input_context, start_batch=0)`` building one input pipeline's dataset of
        per-replica batches, starting at batch ``start_batch`` of that pipeline."""
        d = self.config.data
        r = self.config.runtime

        def fn(input_context=None, start_batch=0):
            if d.images_per_identity:
                return self._pk_dataset(per_replica_batch, input_context, start_batch)
            if d.source == SYNTHETIC:
                from facerec_tf.data.synthetic import make_synthetic_dataset

                return make_synthetic_dataset(
                    self.num_classes,
                    per_replica_batch,
                    seed=r.seed,
                    input_context=input_context,
                    image_size=self.image_size,
                    start_batch=start_batch,
                )
            from facerec_tf.data.pipeline import AugmentConfig, make_tfrecord_dataset

            augment = AugmentConfig(
                random_flip=d.random_flip, color_jitter=d.color_jitter, cutout=d.cutout
            )
            ds = make_tfrecord_dataset(
                d.source,
                per_replica_batch,
                training=True,
                augment=augment,
                seed=r.seed,
                deterministic=r.deterministic,
                shuffle_buffer=d.shuffle_buffer,
                input_context=input_context,
                image_size=self.image_size,
            )
            # Resume: replay the pipeline up to the step (exact when runtime.deterministic;
            # it reads and decodes the skipped batches, so it costs one pass over them).
            return ds.skip(start_batch) if start_batch else ds

        return fn

    def _pk_dataset(self, per_replica_batch, input_context, start_batch):
        """P x K batches: ``batch_size / K`` distinct identities, K images of each."""
        d, r = self.config.data, self.config.runtime
        k = d.images_per_identity
        p = per_replica_batch // k
        if d.source == SYNTHETIC:
            from facerec_tf.data.pk_sampler import pk_synthetic_dataset

            return pk_synthetic_dataset(
                self.num_classes,
                p,
                k,
                seed=r.seed,
                image_size=self.image_size,
                input_context=input_context,
                start_batch=start_batch,
            )
        from facerec_tf.data.pk_sampler import make_pk_tfrecord_dataset

        ds = make_pk_tfrecord_dataset(
            d.source,
            p,
            k,
            seed=r.seed,
            image_size=self.image_size,
            input_context=input_context,
            shuffle_buffer=d.shuffle_buffer,
            random_flip=d.random_flip,
        )
        return ds.skip(start_batch) if start_batch else ds

    def verification_sets(self):
        """``[(name, uint8 images [2N, H, W, 3], issame [N])]`` for in-training verification."""
        d = self.config.data
        out = []
        if d.source == SYNTHETIC:
            from facerec_tf.data.synthetic import synthetic_verification_pairs

            if d.synthetic_verification_pairs > 0:
                # held-out identities (ids far above the training labels), fixed seed
                images, issame = synthetic_verification_pairs(
                    d.synthetic_verification_pairs, seed=12345, image_size=self.image_size
                )
                out.append(("synthetic_holdout", images, issame))
            return out
        from facerec_tf.data.verification_bin import decode_pairs, load_bin

        folder = d.verification_dir or d.source
        for name in d.verification_targets:
            path = os.path.join(folder, f"{name}.bin")
            if os.path.exists(path):
                vset = load_bin(path)
                out.append((name, decode_pairs(vset, image_size=self.image_size), vset.issame))
        return out

    def describe(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "config": dataclasses.asdict(self.config),
        }


def set_synchronized_batch_norm(model, synchronized: bool) -> None:
    """Switch every BatchNormalization of ``model`` to cross-replica (sync) statistics."""
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized
