"""The TFRecord input pipeline: shards written by the converter -> ``(images, labels)`` batches.

Layout on disk (see :mod:`facerec_tf.data.schema`): ``train-00000-of-00016.tfrecord`` shards
of ``tf.train.Example`` (JPEG bytes, int64 label, int64 source key) and a ``manifest.json``
listing them.

What the training dataset does, in order::

    shard list (manifest) -> per-worker shard (InputContext) -> seeded file shuffle -> repeat
    -> interleave of TFRecord readers -> seeded record shuffle -> parse (256 records per op)
    -> JPEG header check -> decode -> batch (drop_remainder) -> [flip, colour jitter, cutout]
    -> cast -> prefetch

Conventions:

* Images are **uint8** ``[B, H, W, 3]`` RGB by default: normalisation lives inside the model
  (the backbones' first layer), which keeps host-to-device traffic 4x smaller and makes
  train / eval / export agree by construction. ``normalize=True`` yields float32
  ``(x - 127.5) / 128`` for models built with ``include_preprocessing=False``.
* Labels are always **int32** ``[B]``: a float label breaks above 2**24 in float32 and above
  65504 in float16.
* ``batch_size`` is the **per-replica** batch (one input pipeline's batch). Under a
  ``tf.distribute`` strategy, build the dataset in ``distribute_datasets_from_function`` with
  ``batch_size=input_context.get_per_replica_batch_size(global_batch_size)`` and pass the
  ``input_context``: each input pipeline then reads its own subset of the shards.
* Every element has a fully defined static shape (``drop_remainder=True``), as TPUs and XLA
  want.
* The JPEG header is checked with ``tf.io.extract_jpeg_shape`` **before** decoding: an image
  whose size is not ``image_size`` stops the pipeline with an ``InvalidArgumentError`` whose
  message names the size found, the size expected and the record key.
* Augmentation is applied to whole batches with stateless random ops seeded from ``(seed,
  input pipeline, batch index)``, so with ``deterministic=True`` and a ``seed`` two runs give
  identical batches.

Exact resume: the iterator of these datasets can be saved in a ``tf.train.Checkpoint``::

    iterator = iter(ds)
    ckpt = tf.train.Checkpoint(iterator=iterator, model=..., optimizer=...)
    ckpt.save(prefix)            # saves the reader positions, shuffle buffers and counters
    ...
    iterator = iter(make_tfrecord_dataset(<same arguments>))
    tf.train.Checkpoint(iterator=iterator, ...).restore(path)   # continues where it stopped

With ``deterministic=True`` and a ``seed``, the restored iterator yields exactly the batches
the original would have yielded next. The checkpoint holds the record shuffle buffer
(``shuffle_buffer`` serialized records, ~5 KB each for 112x112 JPEGs), so keep the buffer
moderate when checkpointing often.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from typing import Any

from facerec_tf.data import schema
from facerec_tf.errors import TFRecordError

__all__ = [
    "AugmentConfig",
    "list_shards",
    "make_eval_dataset",
    "make_tfrecord_dataset",
    "read_manifest",
]

PathLike = str | os.PathLike

_MIX = 0x9E3779B1  # odd 32-bit constant used to derive per-pipeline seeds


# ----------------------------------------------------------------------------------------------
# Manifest and shards


def _manifest_error(path: str, detail: str, expected: str | None = None) -> TFRecordError:
    return TFRecordError(detail, path=path, expected=expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(data_dir: PathLike) -> dict:
    """Read and check ``<data_dir>/manifest.json`` written by the converter.

    Returns:
        The manifest as a dict with at least ``format``, ``num_images``, ``num_classes``,
        ``label_range``, ``image_size`` and ``shards`` (each ``{name, num_records, bytes,
        sha256}``).

    Raises:
        TFRecordError (a DataFormatError): the file is missing or unreadable, is not JSON,
            has another ``format``, or a key is missing or has the wrong type; the message
            names the manifest path and the key.
    """
    path = os.path.join(os.fspath(data_dir), schema.MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise _manifest_error(
            path,
            "the manifest is missing (was the converter run, and did it finish?)",
            expected=f"a {schema.MANIFEST_NAME} beside the TFRecord shards",
        ) from None
    except OSError as e:
        raise _manifest_error(path, f"cannot read the manifest: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise TFRecordError(
            f"the manifest is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
            path=path,
            offset=e.pos,
            expected="a JSON object",
        ) from None
    if not isinstance(manifest, dict):
        raise _manifest_error(
            path, f"the manifest is a JSON {type(manifest).__name__}", "a JSON object"
        )

    def need(key: str, ok, expected: str):
        if key not in manifest:
            raise TFRecordError(
                f"the manifest has no {key!r} key", path=path, key=key, expected=expected
            )
        if not ok(manifest[key]):
            raise TFRecordError(
                f"manifest key {key!r} has the value {manifest[key]!r:.80}",
                path=path,
                key=key,
                expected=expected,
            )

    need(
        schema.MANIFEST_FORMAT_KEY,
        lambda v: v == schema.MANIFEST_FORMAT,
        repr(schema.MANIFEST_FORMAT),
    )
    need(schema.MANIFEST_NUM_IMAGES, lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    need(schema.MANIFEST_NUM_CLASSES, lambda v: _is_int(v) and v >= 1, "a positive integer")
    need(
        schema.MANIFEST_LABEL_RANGE,
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v),
        "[min_label, max_label]",
    )
    need(
        schema.MANIFEST_IMAGE_SIZE,
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
        "[height, width]",
    )
    need(
        schema.MANIFEST_SHARDS,
        lambda v: isinstance(v, list) and len(v) > 0,
        "a non-empty list of shards",
    )
    for i, shard in enumerate(manifest[schema.MANIFEST_SHARDS]):
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("name"), str)
            and _is_int(shard.get("num_records"))
            and shard["num_records"] >= 0
        )
        name = shard.get("name") if isinstance(shard, dict) else None
        # Shard names are plain file names inside data_dir: no folders, no "..".
        if ok and (name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name):
            ok = False
        if not ok:
            raise TFRecordError(
                f"shards[{i}] is {shard!r:.120}",
                path=path,
                key=f"shards[{i}]",
                expected="{'name': <file name in the same folder>, 'num_records': int >= 0, ...}",
            )
    total = sum(s["num_records"] for s in manifest[schema.MANIFEST_SHARDS])
    if total != manifest[schema.MANIFEST_NUM_IMAGES]:
        raise TFRecordError(
            f"the shards hold {total} records in all but {schema.MANIFEST_NUM_IMAGES} is "
            f"{manifest[schema.MANIFEST_NUM_IMAGES]}",
            path=path,
            key=schema.MANIFEST_NUM_IMAGES,
            expected="num_images == sum of shards[*].num_records",
        )
    return manifest


def list_shards(data_dir: PathLike, *, verify: bool = False) -> list[str]:
    """Paths of the shards listed in the manifest, in manifest order, after checking them.

    Args:
        data_dir: the folder holding ``manifest.json`` and the shards.
        verify: also check each shard's size (``bytes``) and SHA-256 (``sha256``) against the
            manifest (reads every byte; the size alone is always checked when given).

    Raises:
        TFRecordError: see :func:`read_manifest`; a shard is missing (the message names it),
            or its size / checksum disagrees with the manifest.
    """
    data_dir = os.fspath(data_dir)
    manifest = read_manifest(data_dir)
    paths = []
    for shard in manifest[schema.MANIFEST_SHARDS]:
        path = os.path.join(data_dir, shard["name"])
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise TFRecordError(
                "the shard listed in the manifest is missing",
                path=path,
                expected=f"the {shard['num_records']} records listed in "
                f"{os.path.join(data_dir, schema.MANIFEST_NAME)}",
            ) from None
        expected_size = shard.get("bytes")
        if _is_int(expected_size) and size != expected_size:
            raise TFRecordError(
                f"the shard is {size} bytes but the manifest says {expected_size} "
                "(truncated or rewritten?)",
                path=path,
                expected=f"{expected_size} bytes",
            )
        if verify and isinstance(shard.get("sha256"), str):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"].lower():
                raise TFRecordError(
                    f"the shard's SHA-256 is {digest.hexdigest()}",
                    path=path,
                    expected=f"sha256 {shard['sha256']} from the manifest",
                )
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Augmentation


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (applied per image, vectorised over the batch).

    Attributes:
        random_flip: mirror each image left-right with probability 1/2 (insightface's only
            default augmentation).
        color_jitter: strength ``s`` of brightness / contrast / saturation jitter: each factor
            is drawn uniformly in ``[1 - s, 1 + s]`` (0 disables it; insightface uses 0.125
            for brightness only in its MXNet pipeline).
        cutout: probability of erasing one square patch per image (0 disables it).
        cutout_size: side of the erased square, in pixels (clipped at the borders).
        cutout_value: pixel value written into the patch (127.5 rounds to 128, which
            normalises to ~0).
    """

    random_flip: bool = True
    color_jitter: float = 0.0
    cutout: float = 0.0
    cutout_size: int = 32
    cutout_value: float = 127.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter}")
        if not 0.0 <= self.cutout <= 1.0:
            raise ValueError(f"cutout must be a probability in [0, 1], got {self.cutout}")
        if self.cutout_size < 1:
            raise ValueError(f"cutout_size must be >= 1, got {self.cutout_size}")

    @property
    def enabled(self) -> bool:
        return bool(self.random_flip or self.color_jitter > 0 or self.cutout > 0)

    @property
    def needs_float(self) -> bool:
        """Whether the augmentation computes in float (flip alone works on uint8)."""
        return bool(self.color_jitter > 0 or self.cutout > 0)


NO_AUGMENT = AugmentConfig(random_flip=False)


def _augment_batch(images, seed, cfg: AugmentConfig):
    """Augment a ``[B, H, W, 3]`` batch with stateless ops seeded by the int64 pair ``seed``.

    uint8 in, uint8 out when only flipping; float32 (unrounded, in [0, 255]) out otherwise.
    """
    import tensorflow as tf

    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    if cfg.random_flip:
        flip = tf.cast(tf.random.stateless_uniform([batch], seeds[0]) < 0.5, tf.int32)
        # Partition / reverse / stitch: 7x cheaper on CPU than tf.where(flip, reverse(x), x),
        # whose broadcast select dominated the whole pipeline.
        index = tf.dynamic_partition(tf.range(batch), flip, 2)
        parts = tf.dynamic_partition(images, flip, 2)
        images = tf.dynamic_stitch(index, [parts[0], tf.reverse(parts[1], axis=[2])])
        images = tf.ensure_shape(images, [batch, height, width, images.shape[-1]])
    if not cfg.needs_float:
        return images
    x = tf.cast(images, tf.float32)
    if cfg.color_jitter > 0:
        s = float(cfg.color_jitter)

        def factor(i):
            return tf.random.stateless_uniform([batch, 1, 1, 1], seeds[i], 1.0 - s, 1.0 + s)

        x = x * factor(1)  # brightness
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = mean + (x - mean) * factor(2)  # contrast
        grey = tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
        x = grey + (x - grey) * factor(3)  # saturation
        x = tf.clip_by_value(x, 0.0, 255.0)
    if cfg.cutout > 0:
        apply = tf.random.stateless_uniform([batch], seeds[4]) < cfg.cutout
        centre = tf.random.stateless_uniform([batch, 2], seeds[5])
        cy = centre[:, 0] * height
        cx = centre[:, 1] * width
        half = cfg.cutout_size / 2.0
        rows = tf.range(height, dtype=tf.float32)[None, :, None] + 0.5
        cols = tf.range(width, dtype=tf.float32)[None, None, :] + 0.5
        inside = (
            (tf.abs(rows - cy[:, None, None]) < half)
            & (tf.abs(cols - cx[:, None, None]) < half)
            & apply[:, None, None]
        )
        x = tf.where(inside[..., None], tf.constant(cfg.cutout_value, tf.float32), x)
    return x


# ----------------------------------------------------------------------------------------------
# Datasets


_PARSE_BATCH = 256  # records parsed by one vectorised ParseExample op


def _parse_batch(serialized):
    """``serialized Examples [N] -> (JPEG bytes [N], int64 labels [N], int64 keys [N])``.

    One vectorised ``ParseExample`` per batch of records: parsing them one by one costs
    more op dispatches than the parse itself (the pipeline was ~20% faster this way).
    """
    import tensorflow as tf

    ex = tf.io.parse_example(serialized, schema.feature_spec())
    return ex[schema.IMAGE_KEY], ex[schema.LABEL_KEY], ex[schema.SOURCE_KEY]


def _decode_image_fn(image_size: tuple[int, int]):
    """``(JPEG bytes, int64 key) -> uint8 [H, W, 3]``, the size checked on the JPEG header
    before decoding (an ``InvalidArgumentError`` naming the record key otherwise).

    Kept to a handful of ops: this runs once per image. The assertion's data are formatted
    only when it fails.
    """
    import tensorflow as tf

    height, width = int(image_size[0]), int(image_size[1])
    expected = tf.constant([height, width], tf.int32)
    what = (
        f"JPEG header size differs from image_size {height}x{width} (resize the source or "
        "pass the right image_size); record key (image/key):"
    )

    def decode(data, key):
        shape = tf.io.extract_jpeg_shape(data)  # reads the header only
        ok = tf.reduce_all(tf.equal(shape[:2], expected))
        check = tf.debugging.Assert(
            ok, [what, key, "header height, width, channels:", shape], name="check_jpeg_size"
        )
        with tf.control_dependencies([check]):
            image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        return tf.ensure_shape(image, [height, width, 3])

    return decode


def _check_labels(labels, keys, num_classes: int):
    """Assert a batch of int64 labels is in ``[0, num_classes)`` (one op per batch)."""
    import tensorflow as tf

    bad = tf.logical_or(labels < 0, labels >= num_classes)
    return tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [
            f"labels outside [0, {num_classes}) (num_classes of the manifest); record keys:",
            tf.boolean_mask(keys, bad),
            "labels:",
            tf.boolean_mask(labels, bad),
        ],
        name="check_labels",
    )


def _pipeline_seed(seed: int, pipeline_id: int, salt: int) -> int:
    """A 31-bit seed for ``(seed, input pipeline, purpose)``, stable across processes."""
    h = hashlib.blake2b(f"{seed}:{pipeline_id}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def make_tfrecord_dataset(
    data_dir: PathLike,
    batch_size: int,
    *,
    training: bool = True,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    shuffle_buffer: int = 8192,
    shuffle_files: bool | None = None,
    input_context=None,
    image_size: tuple[int, int] = (112, 112),
    normalize: bool = False,
    repeat: bool | int | None = None,
    drop_remainder: bool | None = None,
    cycle_length: int | None = None,
    num_parallel_calls: int | None = None,
    prefetch: int | None = None,
    return_keys: bool = False,
    check_labels: bool = True,
):
    """Build the ``tf.data`` pipeline over the converter's TFRecord shards.

    Args:
        data_dir: folder with ``manifest.json`` and the shards.
        batch_size: **per-replica** batch size (the batch of this input pipeline). Under a
            strategy use ``input_context.get_per_replica_batch_size(global_batch_size)``.
        training: training mode: shuffle files and records, augment, repeat, drop the
            remainder. ``False`` reads every record once in converter order (shard by shard)
            with no augmentation (see also :func:`make_eval_dataset`).
        augment: training augmentation (default :class:`AugmentConfig`\\ ``()``: random flip
            only). Ignored when ``training`` is False.
        seed: seeds the file shuffle, the record shuffle and the augmentation. ``None`` draws a
            fresh random seed (batches then differ between runs).
        deterministic: keep element order reproducible (``tf.data.Options.deterministic``);
            with a ``seed`` two iterations give identical batches. ``False`` lets parallel
            readers and decoders deliver out of order, which is faster.
        shuffle_buffer: records in the shuffle buffer (training only; 0 or 1 disables it).
        shuffle_files: shuffle the shard order each epoch (default: ``training``).
        input_context: ``tf.distribute.InputContext``: keep shard ``i`` iff ``i %
            num_input_pipelines == input_pipeline_id``. There must be at least as many shards
            as input pipelines.
        image_size: ``(height, width)`` every JPEG must have (checked on its header).
        normalize: yield float32 ``(x - 127.5) / 128`` instead of uint8.
        repeat: ``True``/``None`` in training: forever; ``False``/``None`` in eval: one pass;
            an int: that many epochs.
        drop_remainder: drop the last partial batch (default: ``training``). Must stay True
            for static shapes (TPU / XLA).
        cycle_length: shards read concurrently (default: ``min(#shards, 16)`` in training,
            1 in eval, which keeps the converter's record order).
        num_parallel_calls: parallelism of reading / decoding (default ``AUTOTUNE``).
        prefetch: batches to prefetch (default ``AUTOTUNE``; 0 disables it).
        return_keys: also yield the int64 record keys ``[B]`` (``image/key``) as a third item.
        check_labels: assert every label is in ``[0, num_classes)`` from the manifest.

    Returns:
        A ``tf.data.Dataset`` of ``(images, labels)`` (``(images, labels, keys)`` with
        ``return_keys``): images uint8 ``[B, H, W, 3]`` (float32 when ``normalize``),
        labels int32 ``[B]``.

    Raises:
        TFRecordError: missing / malformed manifest or shard, an ``image_size`` that disagrees
            with the manifest, or fewer shards than input pipelines.
        ValueError: a bad argument.
    At iteration time, ``tf.errors.InvalidArgumentError`` for an image of the wrong size or
    a label out of range (the message names the record key and the sizes).
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    height, width = (int(v) for v in image_size)
    data_dir = os.fspath(data_dir)
    manifest = read_manifest(data_dir)
    manifest_size = manifest[schema.MANIFEST_IMAGE_SIZE]
    if list(manifest_size) != [height, width]:
        raise TFRecordError(
            f"the manifest says the images are {manifest_size[0]}x{manifest_size[1]} but the "
            f"pipeline was asked for {height}x{width}",
            path=os.path.join(data_dir, schema.MANIFEST_NAME),
            key=schema.MANIFEST_IMAGE_SIZE,
            expected=f"image_size={tuple(manifest_size)}",
        )
    files = list_shards(data_dir)
    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        num_pipelines = int(input_context.num_input_pipelines)
        pipeline_id = int(input_context.input_pipeline_id)
        if len(files) < num_pipelines:
            raise TFRecordError(
                f"{len(files)} shards cannot feed {num_pipelines} input pipelines (each "
                "pipeline reads whole shards)",
                path=os.path.join(data_dir, schema.MANIFEST_NAME),
                key=schema.MANIFEST_SHARDS,
                expected=f"at least {num_pipelines} shards: re-run the converter with more",
            )

    augment = (augment if augment is not None else AugmentConfig()) if training else NO_AUGMENT
    if repeat is None:
        repeat = training
    if not isinstance(repeat, bool) and (not isinstance(repeat, int) or repeat < 1):
        raise ValueError(f"repeat must be a bool, None or an int >= 1, got {repeat!r}")
    if drop_remainder is None:
        drop_remainder = training
    if shuffle_files is None:
        shuffle_files = training
    if cycle_length is None:
        cycle_length = min(len(files), 16) if training else 1
    parallel = num_parallel_calls if num_parallel_calls is not None else autotune
    if seed is None:
        seed = secrets.randbits(31)
    num_classes = manifest[schema.MANIFEST_NUM_CLASSES] if check_labels else None

    my_files = files[pipeline_id::num_pipelines]
    num_files = len(my_files)
    files_t = tf.constant(my_files)
    file_seed = _pipeline_seed(seed, pipeline_id, 1)

    def epoch_files(epoch):
        # A stateless permutation per epoch: every iteration of this dataset (and a
        # restored iterator) sees the same file order for the same epoch.
        if shuffle_files and num_files > 1:
            return tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(
                    files_t, seed=tf.stack([tf.constant(file_seed, tf.int64), epoch])
                )
            )
        return tf.data.Dataset.from_tensor_slices(files_t)

    if repeat is True:
        epochs = tf.data.Dataset.range(2**62)
    else:
        epochs = tf.data.Dataset.range(1 if repeat is False else int(repeat))
    ds = epochs.flat_map(epoch_files)
    cycle = max(1, min(int(cycle_length), num_files))
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=cycle,
        block_length=1,
        **({"num_parallel_calls": parallel, "deterministic": deterministic} if cycle > 1 else {}),
    )
    if training and shuffle_buffer and shuffle_buffer > 1:
        # The stream is already repeated, so one shuffle covers every epoch; not reshuffling
        # per iteration makes two iterations of this dataset identical.
        ds = ds.shuffle(
            int(shuffle_buffer),
            seed=_pipeline_seed(seed, pipeline_id, 2),
            reshuffle_each_iteration=False,
        )
    ds = ds.batch(_PARSE_BATCH).map(
        _parse_batch, num_parallel_calls=parallel, deterministic=deterministic
    )
    decode = _decode_image_fn((height, width))
    ds = ds.unbatch().map(
        lambda data, label, key: (decode(data, key), label, key),
        num_parallel_calls=parallel,
        deterministic=deterministic,
    )
    ds = ds.batch(batch_size, drop_remainder=bool(drop_remainder))

    aug_seed = _pipeline_seed(seed, pipeline_id, 3)

    def finish(index, batch):
        images, labels, keys = batch
        if num_classes is not None:
            with tf.control_dependencies([_check_labels(labels, keys, num_classes)]):
                labels = tf.identity(labels)
        labels = tf.cast(labels, tf.int32)
        if augment.enabled:
            images = _augment_batch(
                images, tf.stack([tf.constant(aug_seed, tf.int64), index]), augment
            )
        if normalize:
            # == (x - 127.5) / 128 exactly (powers of two), one pass cheaper on CPU.
            images = tf.cast(images, tf.float32) * (1.0 / 128.0) + (-127.5 / 128.0)
        elif images.dtype != tf.uint8:
            images = tf.cast(tf.round(images), tf.uint8)
        return (images, labels, keys) if return_keys else (images, labels)

    if augment.enabled:
        # The batch index keys the stateless augmentation seeds (checkpointed with the
        # iterator, so a restored iterator continues with the same seeds).
        ds = ds.enumerate().map(finish, num_parallel_calls=parallel, deterministic=deterministic)
    else:
        ds = ds.map(
            lambda *b: finish(None, b), num_parallel_calls=parallel, deterministic=deterministic
        )
    if prefetch is None or prefetch:
        ds = ds.prefetch(autotune if prefetch is None else int(prefetch))
    options = tf.data.Options()
    options.deterministic = bool(deterministic)
    return ds.with_options(options)


def make_eval_dataset(
    data_dir: PathLike,
    batch_size: int,
    *,
    image_size: tuple[int, int] = (112, 112),
    normalize: bool = False,
    drop_remainder: bool = False,
    input_context=None,
    return_keys: bool = False,
):
    """One ordered pass over the shards: no shuffle, no augmentation, no repeat.

    Records come in converter order (shard by shard). ``drop_remainder=False`` (default)
    keeps the last partial batch, so the batch dimension is then unknown (``None``); pass
    ``drop_remainder=True`` for fully static shapes. Other arguments as in
    :func:`make_tfrecord_dataset`.
    """
    return make_tfrecord_dataset(
        data_dir,
        batch_size,
        training=False,
        seed=0,
        deterministic=True,
        input_context=input_context,
        image_size=image_size,
        normalize=normalize,
        repeat=False,
        drop_remainder=drop_remainder,
        return_keys=return_keys,
    )
