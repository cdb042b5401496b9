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
