"""P x K batches: synthetic source and the grouping of an arbitrary (x, label) stream."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.data.pk_sampler import (
    decode_record_batch,
    parse_record_label,
    pk_batches,
    pk_synthetic_dataset,
)
from facerec_tf.data.synthetic import render_faces

SIZE = (32, 32)


def take(ds, n):
    return [tuple(t.numpy() for t in item) for item in ds.take(n)]


def assert_pk(labels, P, K):
    """Exactly P distinct labels, each K times, identity-major."""
    assert labels.shape == (P * K,) and labels.dtype == np.int32
    groups = labels.reshape(P, K)
    assert np.all(groups == groups[:, :1]), labels
    assert len(set(groups[:, 0].tolist())) == P, labels


# ----------------------------------------------------------------------------------------------
# pk_synthetic_dataset (each dataset costs seconds to trace: the tests share a few of them)

C, P_, K_, SEED = 16, 4, 2, 7  # 4 slots of 4 identities per epoch of identities


@pytest.fixture(scope="module")
def base():
    """The first 8 batches (2 epochs of identities) of the reference configuration."""
    return take(pk_synthetic_dataset(C, P_, K_, seed=SEED, image_size=SIZE), 8)


def test_synthetic_batches_are_p_by_k_and_cover_each_epoch(base):
    for images, labels in base:
        assert_pk(labels, P_, K_)
        assert labels.min() >= 0 and labels.max() < C
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    orders = []
    for epoch in range(2):  # each epoch of 4 batches: every identity exactly once
        seen = np.concatenate([b[1][::K_] for b in base[4 * epoch : 4 * epoch + 4]])
        assert sorted(seen.tolist()) == list(range(C))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # a new permutation per epoch


def test_synthetic_images_are_the_renderer_of_label_and_sample_key(base):
    images, labels = base[1]  # batch 1: sample keys 8 .. 15
    want = render_faces(labels, np.arange(8, 16), seed=SEED, image_size=SIZE).numpy()
    diff = np.abs(images.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3  # graph vs eager rounding only
    # the K images of an identity are different samples of it
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0


def test_synthetic_input_pipelines_resume_and_determinism(base):
    """Pipeline p of 2 yields global batches 2b + p; with start_batch it resumes there; the
    batches equal the single-pipeline ones bit for bit (a pure function of the index)."""
    got = {}
    for pid, start in ((0, 0), (1, 1)):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid)
        ds = pk_synthetic_dataset(
            C, P_, K_, seed=SEED, image_size=SIZE, input_context=ctx, start_batch=start
        )
        images_spec, labels_spec = ds.element_spec  # fully static
        assert images_spec.shape == (8, 32, 32, 3) and images_spec.dtype == tf.uint8
        assert labels_spec.shape == (8,) and labels_spec.dtype == tf.int32
        for b, batch in enumerate(take(ds, 2)):
            got[2 * (start + b) + pid] = batch
    assert sorted(got) == [0, 2, 3, 5]
    for g, (images, labels) in got.items():
        np.testing.assert_array_equal(labels, base[g][1])
        np.testing.assert_array_equal(images, base[g][0])
    # the two replicas of one step (global batches 2 and 3) get disjoint identities
    assert not set(got[2][1].tolist()) & set(got[3][1].tolist())


def test_synthetic_seed_and_samples_per_identity():
    ds = pk_synthetic_dataset(C, 2, 3, seed=SEED + 1, image_size=SIZE, samples_per_identity=3)
    batches = take(ds, 3)
    for images, labels in batches:
        assert_pk(labels, 2, 3)
        for p in range(2):  # K = 3 distinct sample keys out of 3: three different images
            group = images[3 * p : 3 * p + 3].reshape(3, -1).astype(int)
            assert all(np.abs(group[i] - group[j]).max() > 0 for i in range(3) for j in range(i))
    # another seed, another identity order (the base order starts differently)
    first = np.concatenate([b[1][::3] for b in batches])
    assert len(set(first.tolist())) == 6


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match=r"num_classes \(3\) must be >= P \(4\)"):
        pk_synthetic_dataset(3, 4, 2, image_size=SIZE)
    with pytest.raises(ValueError, match="K must be a positive int"):
        pk_synthetic_dataset(10, 4, 0, image_size=SIZE)
    with pytest.raises(ValueError, match="P must be a positive int"):
        pk_synthetic_dataset(10, 2.0, 2, image_size=SIZE)


# ----------------------------------------------------------------------------------------------
# pk_batches


def stream(num=600, classes=12, seed=0):
    """(index, label) pairs: the index identifies the element, to check it kept its label."""
    labels = np.random.default_rng(seed).integers(0, classes, size=num)
    return tf.data.Dataset.from_tensor_slices((np.arange(num), labels)), labels


@pytest.mark.parametrize("P, K, classes", [(4, 3, 12), (3, 2, 40), (4, 4, 5)])
def test_pk_batches_are_distinct_identities_times_k(P, K, classes):
    ds, labels = stream(classes=classes)
    out = pk_batches(ds, P, K, seed=1, group_shuffle_buffer=16)
    assert out.element_spec[0].shape == (P * K,) and out.element_spec[1].shape == (P * K,)
    batches = take(out, 1000)
    assert len(batches) >= (600 // (P * K)) // 2  # only incomplete windows and duplicates lost
    used = []
    for index, batch_labels in batches:
        assert_pk(batch_labels, P, K)
        np.testing.assert_array_equal(labels[index], batch_labels)  # elements keep their label
        used.append(index)
    used = np.concatenate(used)
    assert len(set(used.tolist())) == used.size  # every element used at most once


def test_pk_batches_deterministic_with_a_seed():
    def run(seed):
        return take(pk_batches(stream()[0], 4, 2, seed=seed), 20)

    a, b, c = run(3), run(3), run(4)
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_pk_batches_of_images_keep_static_shapes():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, size=120).astype(np.int32)
    images = (labels[:, None, None, None] * 10 + np.zeros((120, 5, 4, 3))).astype(np.uint8)
    out = pk_batches(tf.data.Dataset.from_tensor_slices((images, labels)), 3, 2, seed=0)
    assert out.element_spec[0].shape == (6, 5, 4, 3) and out.element_spec[0].dtype == tf.uint8
    for x, y in take(out, 5):
        assert_pk(y, 3, 2)
        np.testing.assert_array_equal(x[:, 0, 0, 0], y * 10)


def test_pk_batches_on_serialized_records_then_decode():
    rng = np.random.default_rng(3)
    records, jpegs, labels = [], [], rng.integers(0, 4, size=40)
    for i, label in enumerate(labels):
        pixels = rng.integers(0, 255, size=(16, 16, 3)).astype(np.uint8)
        jpeg = tf.io.encode_jpeg(pixels).numpy()
        jpegs.append(jpeg)
        feature = {
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
            "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            "image/key": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        records.append(example.SerializeToString())
    ds = tf.data.Dataset.from_tensor_slices(records).map(parse_record_label)
    ds = pk_batches(ds, 2, 3, seed=0).map(decode_record_batch((16, 16)))
    assert ds.element_spec[0].shape == (6, 16, 16, 3)
    index = {r: i for i, r in enumerate(records)}
    raw = pk_batches(
        tf.data.Dataset.from_tensor_slices(records).map(parse_record_label), 2, 3, seed=0
    )
    for (images, batch_labels), (serialized, _) in zip(take(ds, 3), take(raw, 3)):
        assert_pk(batch_labels, 2, 3)
        for row, s in enumerate(serialized):
            i = index[s]
            assert labels[i] == batch_labels[row]
            want = tf.io.decode_jpeg(jpegs[i], dct_method="INTEGER_ACCURATE").numpy()
            np.testing.assert_array_equal(images[row], want)


def test_pk_batches_bad_arguments():
    ds, _ = stream()
    with pytest.raises(ValueError, match="K must be a positive int"):
        pk_batches(ds, 4, 0, seed=0)
    with pytest.raises(ValueError, match=r"\(x, label\) pairs"):
        pk_batches(ds.map(lambda x, y: x), 4, 2, seed=0)
    with pytest.raises(ValueError, match="label must be a scalar"):
        pk_batches(ds.batch(2), 4, 2, seed=0)


# ----------------------------------------------------------------------------------------------
# End to end


def test_tiny_convnet_triplet_training_on_pk_batches(base):
    import keras

    from facerec_tf.losses import triplet_loss

    keras.utils.set_random_seed(0)
    images = np.concatenate([base[0][0], base[1][0]])  # 8 identities x 2 images
    labels = np.concatenate([base[0][1], base[1][1]])
    x = tf.constant(images, tf.float32) / 127.5 - 1.0
    net = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(16),
        ]
    )
    opt = keras.optimizers.Adam(3e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(triplet_loss(labels, net(x), mining="batch_hard"))
        grads = tape.gradient(loss, net.trainable_variables)
        opt.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(30)]
    assert losses[0] > 0.1 and np.mean(losses[-5:]) < 0.5 * losses[0], losses


def test_pk_batches_from_converted_yale_tfrecords(rec_dir, tmp_path):
    """The TFRecord route of train.py: the MXNet-written yale112 .rec converted to shards,
    then P x K batches of real faces (decoded 112x112 uint8, flipped per image)."""
    from facerec_tf.data.convert import convert
    from facerec_tf.data.pk_sampler import make_pk_tfrecord_dataset

    convert(rec_dir / "yale112", tmp_path / "tfr", num_shards=3, seed=1, progress=False)
    P, K = 4, 3
    ds = make_pk_tfrecord_dataset(tmp_path / "tfr", P, K, seed=0, shuffle_buffer=64)
    plain = make_pk_tfrecord_dataset(
        tmp_path / "tfr", P, K, seed=0, shuffle_buffer=64, random_flip=False
    )
    assert ds.element_spec[0].shape.as_list() == [P * K, 112, 112, 3]
    flipped = 0
    for (images, labels), (raw, raw_labels) in zip(ds.take(6), plain.take(6)):
        labels = labels.numpy()
        assert np.array_equal(labels, raw_labels.numpy())
        assert images.dtype == tf.uint8 and set(labels) <= set(range(15))
        groups = labels.reshape(P, K)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == P
        for a, b in zip(images.numpy(), raw.numpy()):
            if not np.array_equal(a, b):
                assert np.array_equal(a, b[:, ::-1])  # a mirror image, nothing else
                flipped += 1
    assert 0 < flipped < 6 * P * K
