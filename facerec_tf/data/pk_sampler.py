"""P x K batches for metric learning: P distinct identities, K images of each, per batch.

Triplet-style losses (:mod:`facerec_tf.losses.triplet`) mine positives and negatives inside
the batch, so every batch must hold several images of each of its identities. Two sources:

* :func:`pk_synthetic_dataset`: the procedural faces of :mod:`facerec_tf.data.synthetic`,
  with the conventions of :func:`~facerec_tf.data.synthetic.make_synthetic_dataset`: every
  batch is a pure function of its index (no RNG state, deterministic, an iterator
  checkpoint only stores the batch counter), uint8 images, int32 labels, static shapes,
  disjoint streams per input pipeline, ``start_batch`` to resume.
* :func:`pk_batches`: any unbatched ``(image_or_serialized_record, label)`` dataset, e.g. the
  TFRecord shards, grouped with ``group_by_window``. For TFRecords, group the *serialized*
  records (a few KB each) and decode after batching::

      records = ...                                 # tf.data of serialized tf.train.Example
      ds = records.map(parse_record_label)          # (serialized, label)
      ds = pk_batches(ds, P, K, seed=seed)          # (serialized [P*K], labels [P*K])
      ds = ds.map(decode_record_batch((112, 112)))  # (uint8 [P*K, 112, 112, 3], labels)

Batch layout (both sources): identity-major, ``labels = [y_0] * K + [y_1] * K + ...``; the
P labels of a batch are distinct. Under ``tf.distribute`` build one P x K batch **per
replica** (``distribute_datasets_from_function``): the triplet losses mine within the
per-replica batch.
"""

from __future__ import annotations

import numbers

from facerec_tf.data import schema
from facerec_tf.data.synthetic import (
    SyntheticConfig,
    _key_hash,
    _normalize,
    _tf,
    indexed_batches,
    render_faces,
)

__all__ = [
    "decode_record_batch",
    "parse_record_label",
    "pk_batches",
    "pk_synthetic_dataset",
]

# Hash streams of this module (distinct from synthetic.py's 0x1D, 0x5A, 0x3C/0x3D, 0x71).
_STREAM_PK_ORDER = 0x4B
_STREAM_PK_KEYS = 0x4C


def _check_pk(P, K) -> tuple[int, int]:
    for name, value in (("P", P), ("K", K)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(P), int(K)


def pk_synthetic_dataset(
    num_classes: int,
    P: int,
    K: int,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (112, 112),
    input_context=None,
    start_batch: int = 0,
    identity_offset: int = 0,
    identity_seed: int = 0,
    normalize: bool = False,
    deterministic: bool = True,
    samples_per_identity: int | None = None,
    config: SyntheticConfig | None = None,
    num_parallel_calls: int | None = None,
):
    """An infinite dataset of P x K batches of synthetic faces.

    Identities are drawn **per epoch of identities**: epoch ``e`` is a permutation of the
    ``num_classes`` labels (a hash-keyed argsort of ``(seed, e)``), cut into
    ``num_classes // P`` consecutive slots of P labels (the ``num_classes % P`` leftover
    labels of that epoch are skipped). Global batch ``g = b * n + p`` (batch ``b`` of input
    pipeline ``p`` of ``n``) takes slot ``g % (num_classes // P)`` of epoch
    ``g // (num_classes // P)``. So every label appears once per epoch, the P labels of a
    batch are distinct, and the pipelines of one step get disjoint identities (when ``n * P
    <= num_classes``). Image ``i`` of the batch has sample key ``g * P * K + i`` (or, with
    ``samples_per_identity``, K consecutive keys modulo it from a hashed start, distinct
    when ``K <= samples_per_identity``), rendered by
    :func:`~facerec_tf.data.synthetic.render_faces` with identity ``identity_offset +
    label``.

    Cost: drawing the epoch permutation is an argsort of ``num_classes`` hashes per batch
    (``O(C log C)``, well under a millisecond for 10^4 classes; rendering dominates).

    Args:
        num_classes: number of training identities (labels ``0 .. num_classes - 1``), >= P.
        P: identities per batch.
        K: images per identity; the batch has ``P * K`` images.
        seed: identity order, nuisances (pose, lighting, ...) and sample keys.
        image_size: ``(height, width)`` rendered directly at that resolution.
        input_context: ``tf.distribute.InputContext``; each pipeline takes every n-th batch.
        start_batch: index of the first batch (resume without an iterator checkpoint).
        identity_offset, identity_seed, normalize, deterministic, samples_per_identity,
        config, num_parallel_calls: as in
            :func:`~facerec_tf.data.synthetic.make_synthetic_dataset`.

    Returns:
        ``tf.data.Dataset`` of ``(uint8 [P*K, H, W, 3], int32 [P*K])`` (float32 images when
        ``normalize``), fully static shapes, identity-major order.
    """
    tf = _tf()
    P, K = _check_pk(P, K)
    num_classes = int(num_classes)
    if num_classes < P:
        raise ValueError(f"num_classes ({num_classes}) must be >= P ({P}): identities are distinct")
    if samples_per_identity is not None and int(samples_per_identity) < 1:
        raise ValueError(f"samples_per_identity must be >= 1, got {samples_per_identity}")
    if int(start_batch) < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        num_pipelines = int(input_context.num_input_pipelines)
        pipeline_id = int(input_context.input_pipeline_id)
    slots = num_classes // P
    batch = P * K

    def render(batch_index):
        classes = tf.range(num_classes, dtype=tf.int64)
        within = tf.range(batch, dtype=tf.int64)
        k_index = tf.tile(tf.range(K, dtype=tf.int64), [P])
        g = batch_index * num_pipelines + pipeline_id
        epoch, slot = g // slots, g % slots
        order = tf.argsort(
            tf.cast(_key_hash(_STREAM_PK_ORDER, seed, epoch * num_classes + classes), tf.int64),
            stable=True,
        )
        ids = tf.cast(order[slot * P : slot * P + P], tf.int64)
        labels = tf.repeat(ids, K)
        if samples_per_identity is None:
            keys = g * batch + within
        else:
            spi = int(samples_per_identity)
            start = tf.cast(
                _key_hash(_STREAM_PK_KEYS, seed, g * P + tf.range(P, dtype=tf.int64)), tf.int64
            )
            keys = tf.math.floormod(tf.repeat(start, K) + k_index, spi)
        images = render_faces(
            labels + int(identity_offset),
            keys,
            seed=seed,
            identity_seed=identity_seed,
            image_size=image_size,
            config=config,
        )
        images = tf.ensure_shape(images, [batch, int(image_size[0]), int(image_size[1]), 3])
        if normalize:
            images = _normalize(images)
        return images, tf.ensure_shape(tf.cast(labels, tf.int32), [batch])

    return indexed_batches(render, start_batch, num_parallel_calls, deterministic)


def pk_batches(
    dataset,
    P: int,
    K: int,
    *,
    seed: int,
    group_shuffle_buffer: int = 256,
):
    """Turn an unbatched ``(x, label)`` dataset into P x K batches of distinct identities.

    Steps: ``group_by_window`` (key: the label, window K, partial windows dropped) makes
    groups of K elements of one identity as soon as the K-th arrives; a seeded shuffle of
    ``group_shuffle_buffer`` groups mixes them; a ``scan`` over the groups' labels keeps a
    group unless its identity is already in the batch being filled (such a duplicate group
    is **dropped**, K elements lost: rare when the stream has many more identities than P);
    ``batch(P, drop_remainder=True)`` then yields fully static shapes.

    Memory bound (honest): ``group_by_window`` keeps, for **every label seen**, its current
    incomplete window, up to ``K - 1`` elements; so up to ``(K - 1) * L`` elements for ``L``
    distinct labels in the stream (about half of that at steady state on a shuffled
    stream), plus ``group_shuffle_buffer * K`` in the shuffle and ``P * K`` in the batch.
    An identity with fewer than K images in the whole stream never forms a group and its
    elements stay buffered. Group serialized records, not decoded images: MS1MV2 (85,742
    identities), K = 4, ~7 KB records: up to ~1.8 GB of records; decoded 112x112 images
    would be 5x more.

    Determinism: with a deterministic input order (``tf.data.Options.deterministic`` and a
    seeded record shuffle) the batches are a pure function of ``seed``.

    Args:
        dataset: unbatched ``tf.data.Dataset`` of ``(x, label)``: ``x`` any fixed-shape
            tensor (a serialized record, a uint8 image...), ``label`` an int scalar.
        P: identities per batch.
        K: elements per identity.
        seed: seed of the group shuffle.
        group_shuffle_buffer: groups in the shuffle buffer (0 or 1: no shuffle).

    Returns:
        ``tf.data.Dataset`` of ``(x [P*K, ...], int32 labels [P*K])``, identity-major.
    """
    tf = _tf()
    P, K = _check_pk(P, K)
    if int(group_shuffle_buffer) < 0:
        raise ValueError(f"group_shuffle_buffer must be >= 0, got {group_shuffle_buffer}")
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(f"pk_batches wants a dataset of (x, label) pairs, got {spec}")
    if spec[1].shape.rank not in (None, 0):
        raise ValueError(f"the label must be a scalar (unbatched dataset), got {spec[1].shape}")

    plain = tf.autograph.experimental.do_not_convert  # no Python control flow below

    @plain
    def to_int64(x, y):
        return x, tf.cast(y, tf.int64)

    @plain
    def label_of(x, y):
        return y

    @plain
    def k_group(key, window):
        return window.batch(K, drop_remainder=True)

    positions = tf.range(P)

    @plain
    def admit(state, group):
        seen, count = state
        x, y = group
        label = y[0]
        duplicate = tf.reduce_any((seen == label) & (positions < count))
        keep = tf.logical_not(duplicate)
        seen = tf.where(keep & tf.equal(positions, count), label, seen)
        count = tf.where(keep, count + 1, count)
        count = tf.where(count == P, 0, count)  # batch complete: start the next one
        return (seen, count), (keep, x, y)

    @plain
    def kept(keep, x, y):
        return keep

    @plain
    def drop_flag(keep, x, y):
        return x, y

    @plain
    def flatten(x, y):
        inner = x.shape[2:]
        if inner.is_fully_defined():
            shape = [P * K, *inner]
        else:
            shape = tf.concat([[P * K], tf.shape(x)[2:]], axis=0)
        return tf.reshape(x, shape), tf.reshape(tf.cast(y, tf.int32), [P * K])

    ds = dataset.map(to_int64)
    ds = ds.group_by_window(key_func=label_of, reduce_func=k_group, window_size=K)
    if int(group_shuffle_buffer) > 1:
        ds = ds.shuffle(int(group_shuffle_buffer), seed=int(seed), reshuffle_each_iteration=False)
    init = (tf.fill([P], tf.constant(-1, tf.int64)), tf.constant(0, tf.int32))
    ds = ds.scan(init, admit).filter(kept).map(drop_flag)
    return ds.batch(P, drop_remainder=True).map(flatten)


def parse_record_label(serialized):
    """``serialized tf.train.Example -> (serialized, int32 label)`` (parses the label only)."""
    tf = _tf()
    label = tf.io.parse_single_example(
        serialized, {schema.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
    )[schema.LABEL_KEY]
    return serialized, tf.cast(label, tf.int32)


def decode_record_batch(image_size: tuple[int, int] = (112, 112)):
    """A ``map`` function ``(serialized [N], labels) -> (uint8 [N, H, W, 3], labels)``.

    Decodes with the TFRecord pipeline's JPEG check (the header must be ``image_size``;
    an ``InvalidArgumentError`` naming the record key otherwise).
    """
    tf = _tf()
    from facerec_tf.data.pipeline import _decode_image_fn, _parse_batch

    height, width = int(image_size[0]), int(image_size[1])
    decode = _decode_image_fn((height, width))

    def fn(serialized, labels):
        data, _, keys = _parse_batch(serialized)  # one vectorised parse per batch
        images = tf.map_fn(
            lambda dk: decode(*dk),
            (data, keys),
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8),
        )
        return images, labels

    return fn


def make_pk_tfrecord_dataset(
    data_dir,
    P: int,
    K: int,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (112, 112),
    input_context=None,
    shuffle_buffer: int = 8192,
    group_shuffle_buffer: int = 256,
    random_flip: bool = True,
):
    """P x K batches from the converter's TFRecord shards (what ``train.py`` uses with
    ``data.images_per_identity``): this input pipeline's shards, repeated, interleaved and
    shuffled as serialized records, grouped by :func:`pk_batches`, then decoded (JPEG
    header checked) and, with ``random_flip``, mirrored per image with seeded stateless
    draws (the TFRecord pipeline's flip). Memory: see :func:`pk_batches`.

    Returns ``(uint8 [P*K, H, W, 3], int32 [P*K])`` batches.
    """
    tf = _tf()
    from facerec_tf.data.pipeline import list_shards

    files = list_shards(data_dir)
    pipelines, pipeline_id = 1, 0
    if input_context is not None:
        pipelines = int(input_context.num_input_pipelines)
        pipeline_id = int(input_context.input_pipeline_id)
    mine = files[pipeline_id::pipelines] or files
    ds = tf.data.Dataset.from_tensor_slices(mine).repeat()
    ds = ds.interleave(
        tf.data.TFRecordDataset, cycle_length=max(1, min(len(mine), 16)), block_length=1
    )
    if shuffle_buffer > 1:
        ds = ds.shuffle(int(shuffle_buffer), seed=int(seed) + pipeline_id)
    ds = ds.map(parse_record_label)
    ds = pk_batches(
        ds, P, K, seed=int(seed) + pipeline_id, group_shuffle_buffer=group_shuffle_buffer
    )
    ds = ds.map(decode_record_batch(image_size), num_parallel_calls=tf.data.AUTOTUNE)
    if random_flip:
        from facerec_tf.data.pipeline import AugmentConfig, _augment_batch

        flip_only = AugmentConfig(random_flip=True)
        flip_seed = int(seed) * 1000003 + pipeline_id

        def flip(index, batch):
            images, labels = batch
            seed_pair = tf.stack([tf.constant(flip_seed, tf.int64), index])
            return _augment_batch(images, seed_pair, flip_only), labels

        ds = ds.enumerate().map(flip, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
