"""Tests of the TFRecord input pipeline (facerec_tf.data.pipeline)."""

from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.data import schema
from facerec_tf.data.pipeline import (
    AugmentConfig,
    list_shards,
    make_eval_dataset,
    make_tfrecord_dataset,
    read_manifest,
)
from facerec_tf.errors import DataFormatError, TFRecordError

# ----------------------------------------------------------------------------------------------
# Helpers: write shards the way the converter does (schema keys, original JPEG bytes).


def _example(jpeg: bytes, label: int, key: int) -> bytes:
    feature = {
        schema.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        schema.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        schema.SOURCE_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[key])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(
    out_dir: pathlib.Path,
    jpegs: list[bytes],
    labels: list[int],
    num_shards: int,
    *,
    image_size: tuple[int, int] = (112, 112),
    num_classes: int | None = None,
) -> dict:
    """Write contiguous shards of ``(jpeg, label, key=index)`` and a manifest; return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(jpegs), num_shards + 1).astype(int)
    shards = []
    for s in range(num_shards):
        name = schema.shard_name(s, num_shards)
        path = out_dir / name
        with tf.io.TFRecordWriter(str(path)) as w:
            for i in range(bounds[s], bounds[s + 1]):
                w.write(_example(jpegs[i], int(labels[i]), i))
        shards.append(
            {
                "name": name,
                "num_records": int(bounds[s + 1] - bounds[s]),
                "bytes": path.stat().st_size,
                "sha256": "",
            }
        )
    manifest = {
        "format": schema.MANIFEST_FORMAT,
        "num_images": len(jpegs),
        "num_classes": int(num_classes if num_classes is not None else max(labels) + 1),
        "label_range": [int(min(labels)), int(max(labels))],
        "image_size": list(image_size),
        "shards": shards,
        "source": "tests",
        "options": {},
    }
    (out_dir / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def _random_jpegs(n: int, size=(112, 112), seed=0) -> list[bytes]:
    """Asymmetric, JPEG-friendly images (smooth gradients + a blob), so flips are visible."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 2.0, 3)
        cx, cy = rng.uniform(0.1, 0.4) * w, rng.uniform(0.2, 0.8) * h
        blob = 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 150.0)
        img = np.stack([a * xx, b * yy, c * (xx + yy) / 2], -1) + blob[..., None]
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        out.append(bytes(tf.io.encode_jpeg(img, quality=90).numpy()))
    return out


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> pathlib.Path:
    """40 synthetic 112x112 JPEGs, 5 classes, 4 shards of 10."""
    d = tmp_path_factory.mktemp("small")
    jpegs = _random_jpegs(40)
    write_shards(d, jpegs, [i % 5 for i in range(40)], 4)
    return d


@pytest.fixture(scope="module")
def yale_records(rec_dir) -> tuple[list[bytes], list[int]]:
    """The real Yale face JPEGs and labels from the yale112 .rec fixture."""
    from facerec_tf.data.recordio import RecDataset

    with RecDataset(rec_dir / "yale112") as ds:
        pairs = [ds.read_image(int(k)) for k in ds.image_keys]
    return [p for p, _ in pairs], [label for _, label in pairs]


@pytest.fixture(scope="module")
def yale_dir(tmp_path_factory, yale_records) -> pathlib.Path:
    d = tmp_path_factory.mktemp("yale")
    jpegs, labels = yale_records
    write_shards(d, jpegs, labels, 4)
    return d


def _take(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, batching


def test_element_spec_static_uint8_int32(small_dir):
    ds = make_tfrecord_dataset(small_dir, 8, seed=0)
    images_spec, labels_spec = ds.element_spec
    assert images_spec.shape.is_fully_defined() and labels_spec.shape.is_fully_defined()
    assert images_spec.shape.as_list() == [8, 112, 112, 3]
    assert labels_spec.shape.as_list() == [8]
    assert images_spec.dtype == tf.uint8 and labels_spec.dtype == tf.int32
    for images, labels in _take(ds, 7):  # 7 batches of 8 > 40 records: crosses an epoch
        assert images.shape == (8, 112, 112, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        assert labels.min() >= 0 and labels.max() < 5


def test_drop_remainder_and_epoch_counts(small_dir):
    # Training, one epoch: 40 records in batches of 16 -> 2 full batches, remainder dropped.
    ds = make_tfrecord_dataset(small_dir, 16, seed=0, repeat=1)
    assert [b[0].shape[0] for b in _take(ds, 10)] == [16, 16]
    # Eval keeps the remainder (dynamic batch dimension) and every record exactly once.
    ev = make_eval_dataset(small_dir, 16, return_keys=True)
    assert ev.element_spec[0].shape.as_list() == [None, 112, 112, 3]
    batches = _take(ev, 10)
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    assert np.concatenate([b[2] for b in batches]).tolist() == list(range(40))
    # Eval with drop_remainder: static again.
    ev = make_eval_dataset(small_dir, 16, drop_remainder=True)
    assert ev.element_spec[0].shape.is_fully_defined()
    assert len(_take(ev, 10)) == 2


def test_two_epochs_cover_every_record_once_per_epoch(small_dir):
    ds = make_tfrecord_dataset(small_dir, 8, seed=3, repeat=2, return_keys=True, shuffle_buffer=4)
    keys = np.concatenate([b[2] for b in _take(ds, 100)])
    assert keys.size == 80
    assert np.bincount(keys, minlength=40).tolist() == [2] * 40


def test_normalize_range_and_values(small_dir):
    kw = dict(image_size=(112, 112))
    raw = _take(make_eval_dataset(small_dir, 8, **kw), 1)[0][0]
    norm = _take(make_eval_dataset(small_dir, 8, normalize=True, **kw), 1)[0][0]
    assert norm.dtype == np.float32
    assert norm.min() >= -1.0 and norm.max() <= 1.0
    np.testing.assert_allclose(norm, (raw.astype(np.float32) - 127.5) / 128.0, atol=1e-6)
    train = make_tfrecord_dataset(
        small_dir, 8, seed=0, normalize=True, augment=AugmentConfig(color_jitter=0.4, cutout=1.0)
    )
    assert train.element_spec[0].dtype == tf.float32
    images = _take(train, 1)[0][0]
    assert images.min() >= -1.0 and images.max() <= 1.0


# ----------------------------------------------------------------------------------------------
# Sharding


def test_input_context_shards_are_disjoint_and_cover(small_dir):
    keys = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid)
        ev = make_eval_dataset(small_dir, 4, input_context=ctx, return_keys=True)
        keys.append(set(np.concatenate([b[2] for b in _take(ev, 100)]).tolist()))
        # Training mode reads the same files (shard i % 2 == pid), shuffled.
        tr = make_tfrecord_dataset(
            small_dir, 4, seed=1, input_context=ctx, return_keys=True, shuffle_buffer=8
        )
        seen = set(np.concatenate([b[2] for b in _take(tr, 20)]).tolist())
        assert seen <= keys[pid] and len(seen) >= 15
    assert keys[0].isdisjoint(keys[1])
    assert keys[0] | keys[1] == set(range(40))
    # Shard 0 (keys 0-9) and 2 (keys 20-29) go to pipeline 0.
    assert keys[0] == set(range(0, 10)) | set(range(20, 30))


def test_fewer_shards_than_pipelines_is_an_error(small_dir):
    ctx = tf.distribute.InputContext(num_input_pipelines=5, input_pipeline_id=0)
    with pytest.raises(TFRecordError, match="4 shards cannot feed 5 input pipelines"):
        make_tfrecord_dataset(small_dir, 4, input_context=ctx)


# ----------------------------------------------------------------------------------------------
# Decoding and augmentation, on real faces


def test_jpeg_round_trip_real_faces(yale_dir, yale_records):
    from PIL import Image

    jpegs, labels = yale_records
    ev = make_eval_dataset(yale_dir, 32, return_keys=True)
    n = 0
    for images, batch_labels, keys in _take(ev, 100):
        for img, label, key in zip(images, batch_labels, keys):
            data = jpegs[key]
            ref = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
            np.testing.assert_array_equal(img, ref)
            assert label == labels[key]
            n += 1
    assert n == len(jpegs)
    # The ISLOW decode also matches PIL (libjpeg's default), i.e. a PyTorch reader.
    pil = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("RGB"))
    first = _take(make_eval_dataset(yale_dir, 1), 1)[0][0][0]
    np.testing.assert_array_equal(first, pil)


def test_random_flip_is_a_true_mirror_half_the_time(yale_dir, yale_records):
    jpegs, _ = yale_records
    ds = make_tfrecord_dataset(
        yale_dir,
        16,
        seed=5,
        deterministic=True,
        repeat=1,
        shuffle_buffer=0,
        augment=AugmentConfig(random_flip=True),
        return_keys=True,
    )
    flipped = kept = 0
    for images, _, keys in _take(ds, 100):
        for img, key in zip(images, keys):
            ref = tf.io.decode_jpeg(jpegs[key], channels=3, dct_method="INTEGER_ACCURATE").numpy()
            assert not np.array_equal(ref, ref[:, ::-1])  # real faces are not symmetric
            if np.array_equal(img, ref):
                kept += 1
            else:
                np.testing.assert_array_equal(img, ref[:, ::-1, :])  # exactly mirrored
                flipped += 1
    assert flipped + kept == (len(jpegs) // 16) * 16
    assert 0.3 < flipped / (flipped + kept) < 0.7


def test_color_jitter_and_cutout(small_dir):
    plain = _take(make_eval_dataset(small_dir, 8, drop_remainder=True), 1)[0][0]
    ds = make_tfrecord_dataset(
        small_dir,
        8,
        seed=0,
        deterministic=True,
        repeat=1,
        shuffle_buffer=0,
        shuffle_files=False,
        cycle_length=1,
        augment=AugmentConfig(random_flip=False, cutout=1.0, cutout_size=20, cutout_value=7),
    )
    cut = _take(ds, 1)[0][0]
    assert cut.dtype == np.uint8
    erased = np.all(cut == 7, axis=-1)  # one square patch of 7s per image, rest untouched
    for img, ref, mask in zip(cut, plain, erased):
        assert 100 <= mask.sum() <= 400
        np.testing.assert_array_equal(img[~mask], ref[~mask])
    jit = make_tfrecord_dataset(
        small_dir, 8, seed=0, augment=AugmentConfig(random_flip=False, color_jitter=0.4)
    )
    assert _take(jit, 1)[0][0].dtype == np.uint8
    with pytest.raises(ValueError, match="color_jitter"):
        AugmentConfig(color_jitter=1.5)
    with pytest.raises(ValueError, match="cutout"):
        AugmentConfig(cutout=2.0)


# ----------------------------------------------------------------------------------------------
# Determinism and resume


def _aug():
    return AugmentConfig(random_flip=True, color_jitter=0.3, cutout=0.5)


def test_same_seed_same_batches_different_seed_different(small_dir):
    def batches(seed):
        ds = make_tfrecord_dataset(small_dir, 8, seed=seed, deterministic=True, augment=_aug())
        return _take(ds, 8)

    a, b, c = batches(11), batches(11), batches(12)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # Two iterations of one dataset object agree too.
    ds = make_tfrecord_dataset(small_dir, 8, seed=11, deterministic=True, augment=_aug())
    for (xa, _), (xb, _) in zip(_take(ds, 3), _take(ds, 3)):
        np.testing.assert_array_equal(xa, xb)


def test_iterator_checkpoint_restores_position(small_dir, tmp_path):
    def make():
        return make_tfrecord_dataset(
            small_dir, 8, seed=21, deterministic=True, augment=_aug(), shuffle_buffer=16
        )

    it = iter(make())
    for _ in range(3):
        next(it)
    ckpt = tf.train.Checkpoint(iterator=it)
    path = ckpt.save(str(tmp_path / "ckpt"))
    expected = [tuple(t.numpy() for t in next(it)) for _ in range(6)]  # crosses epochs

    fresh = iter(make())
    tf.train.Checkpoint(iterator=fresh).restore(path).assert_consumed()
    for want in expected:
        got = tuple(t.numpy() for t in next(fresh))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # Not restored: the first batch of a fresh iterator differs from batch 4.
    assert not np.array_equal(next(iter(make()))[0].numpy(), expected[0][0])


# ----------------------------------------------------------------------------------------------
# Errors


def test_wrong_jpeg_size_fails_clearly(tmp_path):
    jpegs = _random_jpegs(6)
    jpegs[3] = _random_jpegs(1, size=(100, 96), seed=9)[0]
    write_shards(tmp_path, jpegs, [0, 1, 0, 1, 0, 1], 2)
    ds = make_eval_dataset(tmp_path, 2)
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _take(ds, 10)
    msg = str(err.value)
    assert "JPEG header size differs from image_size 112x112" in msg
    assert "record key (image/key):] [3]" in msg and "[100 96 3]" in msg


def test_image_size_disagreeing_with_manifest(small_dir):
    with pytest.raises(TFRecordError, match=r"112x112 but the pipeline was asked for 96x96"):
        make_tfrecord_dataset(small_dir, 8, image_size=(96, 96))


def test_label_outside_manifest_range_fails(tmp_path):
    write_shards(tmp_path, _random_jpegs(4), [0, 1, 7, 1], 1, num_classes=2)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"record keys:\] \[2\] \[labels:\] \[7\]"
    ):
        _take(make_eval_dataset(tmp_path, 4), 1)


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(DataFormatError) as err:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value)
    with pytest.raises(DataFormatError, match=r"manifest\.json"):
        make_tfrecord_dataset(tmp_path, 8)


def test_malformed_manifest(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(TFRecordError, match="not valid JSON"):
        read_manifest(tmp_path)
    manifest = write_shards(tmp_path, _random_jpegs(2), [0, 1], 1)
    for key, value, pattern in [
        ("format", "other/1", "'format'"),
        ("num_classes", "3", "'num_classes'"),
        ("image_size", [112], "'image_size'"),
        ("num_images", 5, "num_images"),
        ("shards", [{"name": "../escape.tfrecord", "num_records": 2}], r"shards\[0\]"),
    ]:
        path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(TFRecordError, match=pattern) as err:
            read_manifest(tmp_path)
        assert str(path) in str(err.value)
    broken = dict(manifest)
    del broken["shards"]
    path.write_text(json.dumps(broken))
    with pytest.raises(TFRecordError, match="no 'shards' key"):
        read_manifest(tmp_path)


def test_missing_or_truncated_shard_names_the_shard(tmp_path):
    write_shards(tmp_path, _random_jpegs(4), [0, 1, 0, 1], 2)
    assert [os.path.basename(p) for p in list_shards(tmp_path, verify=False)] == [
        schema.shard_name(0, 2),
        schema.shard_name(1, 2),
    ]
    second = tmp_path / schema.shard_name(1, 2)
    data = second.read_bytes()
    second.write_bytes(data[:-5])
    with pytest.raises(TFRecordError, match="bytes but the manifest says") as err:
        list_shards(tmp_path)
    assert str(second) in str(err.value)
    second.unlink()
    with pytest.raises(DataFormatError, match="missing") as err:
        make_tfrecord_dataset(tmp_path, 2)
    assert str(second) in str(err.value)


def test_verify_checksums(tmp_path):
    import hashlib

    manifest = write_shards(tmp_path, _random_jpegs(2), [0, 1], 1)
    shard = tmp_path / manifest["shards"][0]["name"]
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert list_shards(tmp_path, verify=True) == [str(shard)]
    manifest["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TFRecordError, match="SHA-256"):
        list_shards(tmp_path, verify=True)
