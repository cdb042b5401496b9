"""The one definition of the TFRecord layout shared by the converter and the input pipeline.

Each example holds one face:

=================  ==========  ==================================================
key                type        meaning
=================  ==========  ==================================================
``image/encoded``  bytes       the original JPEG bytes, untouched (no re-encode)
``image/label``    int64       the identity, contiguous from 0
``image/key``      int64       the record key in the source ``.rec`` (or file index)
=================  ==========  ==================================================

Shards are named ``train-00000-of-00016.tfrecord`` and described by ``manifest.json``
(:data:`MANIFEST_NAME`), written last by the converter.
"""

from __future__ import annotations

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/label"
SOURCE_KEY = "image/key"

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "facerec_tf.tfrecord/1"
SHARD_SUFFIX = ".tfrecord"


def shard_name(index: int, num_shards: int, prefix: str = "train") -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def feature_spec():
    """``tf.io.parse_single_example`` spec for one face example."""
    import tensorflow as tf

    return {
        IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        SOURCE_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


# Top-level keys of ``manifest.json`` (written last by :mod:`facerec_tf.data.convert`).
MANIFEST_FORMAT_KEY = "format"  # == MANIFEST_FORMAT
MANIFEST_NUM_IMAGES = "num_images"  # int: records in all shards
MANIFEST_NUM_CLASSES = "num_classes"  # int: labels are in [0, num_classes)
MANIFEST_LABEL_RANGE = "label_range"  # [min, max] of the labels present
MANIFEST_IMAGE_SIZE = "image_size"  # [height, width]
MANIFEST_SHARDS = "shards"  # [{"name", "num_records", "bytes", "sha256"}], in shard order
MANIFEST_SOURCE = "source"  # {"path", "kind": "rec" | "folder", "layout", ...}
MANIFEST_OPTIONS = "options"  # {"seed", "images_filter", "num_shards", ...}
MANIFEST_IMAGES_PER_CLASS = "images_per_class"  # {"min", "max", "mean"} (optional)


def shard_pattern(prefix: str = "train") -> str:
    """Regular expression matching the names :func:`shard_name` makes for ``prefix``."""
    import re

    return rf"{re.escape(prefix)}-\d{{5,}}-of-\d{{5,}}{re.escape(SHARD_SUFFIX)}"
