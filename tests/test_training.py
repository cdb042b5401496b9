"""End-to-end training through ``train.py``: strategies, exact resume, NaN stop, real faces.

Each run is a subprocess (logical CPU devices and op determinism must be configured before
TensorFlow starts). Small images (32x32, the head's flatten adapts) and iresnet10 keep every
run to seconds; the graph of iresnet10 traces faster than MobileFaceNet's.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300

SMALL = [
    "model.backbone=iresnet10",
    "model.embedding_size=64",
    "data.image_size=32,32",
    "data.num_classes=50",
    "data.num_images=3200",
    "data.synthetic_verification_pairs=0",
    "head.scale=32",
    "schedule.name=constant",
    "schedule.base_lr=0.05",
    "runtime.log_every=1",
    "runtime.verify_every=0",
    "runtime.export=false",
    "runtime.deterministic=true",
]


def train_cmd(
    output, *extra, batch=8, strategy="default", max_steps=6, config="quickstart", data="synthetic"
):
    sets = [*SMALL, f"data.batch_size={batch}", *extra]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        config,
        "--data",
        str(data),
        "--output",
        str(output),
        "--strategy",
        strategy,
        "--max-steps",
        str(max_steps),
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def env():
    e = dict(os.environ)
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e.pop("TF_CONFIG", None)
    return e


def run(cmd, **kw):
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=kw.pop("env", env()),
        cwd=ROOT,
        **kw,
    )
    return out


def checkpoint_arrays(folder, step=None):
    """Model, head and optimizer tensors of a checkpoint (not the iterator or counters)."""
    ckpt_dir = pathlib.Path(folder) / "checkpoints"
    path = str(ckpt_dir / f"ckpt-{step}") if step else tf.train.latest_checkpoint(str(ckpt_dir))
    reader = tf.train.load_checkpoint(path)
    keys = [
        k
        for k in reader.get_variable_to_shape_map()
        if k.startswith(("backbone/", "head/", "optimizer/", "rng/"))
    ]
    assert keys
    return {k: reader.get_tensor(k) for k in sorted(keys)}


def digest(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("final weights digest")]
    assert lines, stdout
    return lines[-1].split()[3]


def losses(stdout):
    return [
        float(line.split("loss ")[1].split()[0])
        for line in stdout.splitlines()
        if line.startswith("step ") and " loss " in line
    ]


@pytest.mark.slow
def test_training_on_real_yale_faces_beats_the_untrained_model(rec_dir, tmp_path):
    """Convert the MXNet-written yale112 .rec, train 140 steps at 112x112, verify on
    yale_pairs_py2.bin: accuracy far above the same backbone untrained."""
    data = tmp_path / "yale_tfrecord"
    conv = run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_rec_to_tfrecord.py"),
            str(rec_dir / "yale112"),
            str(data),
            "--num-shards",
            "2",
            "--seed",
            "1",
            "--no-progress",
        ]
    )
    assert conv.returncode == 0, conv.stderr[-2000:]
    sets = [
        "model.backbone=mobilefacenet_small",
        "model.embedding_size=128",
        "data.batch_size=8",
        "data.verification_targets=yale_pairs_py2",
        f"data.verification_dir={rec_dir}",
        "data.shuffle_buffer=256",
        "schedule.name=cosine",
        "schedule.base_lr=0.05",
        "schedule.total_steps=140",
        "schedule.warmup_epochs=1",
        "runtime.log_every=50",
        "runtime.checkpoint_every=1000",
        "runtime.verify_every=0",
        "runtime.export=false",
    ]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "quickstart", "--data", str(data)]
    cmd += ["--output", str(tmp_path / "run"), "--max-steps", "140"]
    for s in sets:
        cmd += ["--set", s]
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    # Counts and image size come from the converter's manifest, not the quickstart preset
    # (1000 classes at 64x64).
    assert "on yale_tfrecord (15 classes, 164 images at 112x112)" in out.stdout, out.stdout
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["image_size"] == [112, 112] and resolved["num_classes"] == 15
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    accuracy = metrics["verification"]["yale_pairs_py2"]["accuracy"]

    # The same architecture, untrained, on the same pairs through the same evaluator.
    import keras

    from facerec_tf.data.verification_bin import decode_pairs, load_bin
    from facerec_tf.evaluation.verification import embed_pairs, evaluate_embeddings
    from facerec_tf.models import create_backbone

    keras.utils.set_random_seed(0)
    untrained = create_backbone("mobilefacenet_small", embedding_size=128)
    vset = load_bin(rec_dir / "yale_pairs_py2.bin")
    emb, flipped = embed_pairs(
        lambda b: untrained(b.astype(np.float32), training=False).numpy(), decode_pairs(vset)
    )
    baseline = evaluate_embeddings("untrained", emb, flipped, vset.issame).accuracy
    assert accuracy >= baseline + 0.1, (accuracy, baseline)
    assert accuracy >= 0.9, (accuracy, baseline)


@pytest.mark.slow
def test_mirrored_two_replicas_equals_default_strategy(tmp_path):
    """2 logical CPU replicas x batch 8 with synchronised BN == 1 device x batch 16.

    Replica-wise partial sums round differently from one big sum (~1e-6 on the weights after
    one step); through a 1M-parameter network with BN that noise grows step after step, so
    the test uses a small learning rate and 3 steps. A real aggregation bug (a missing or
    doubled all-reduce, per-replica BN statistics, a wrong loss denominator) changes the
    gradients by O(1) and fails it.
    """
    common = ["model.sync_batch_norm=true", "schedule.base_lr=0.0001", "schedule.warmup_epochs=0"]
    single = subprocess.Popen(
        train_cmd(tmp_path / "single", *common, batch=16, max_steps=3),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    mirrored = run(
        [
            *train_cmd(tmp_path / "mirrored", *common, batch=8, strategy="mirrored", max_steps=3),
            "--cpu-replicas",
            "2",
        ]
    )
    s_out, s_err = single.communicate(timeout=TIMEOUT)
    assert single.returncode == 0, s_err[-3000:]
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    assert "2 replica(s) x batch 8" in mirrored.stdout and "1 replica(s) x batch 16" in s_out
    np.testing.assert_allclose(losses(mirrored.stdout), losses(s_out), rtol=1e-5)
    a, b = checkpoint_arrays(tmp_path / "single"), checkpoint_arrays(tmp_path / "mirrored")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    steps = 12
    extra = [
        "runtime.checkpoint_every=2",
        "schedule.name=polynomial",
        "schedule.warmup_epochs=0.01",
        "optimizer.clip_norm=5",
        "model.dropout=0.2",  # the dropout RNG state must be restored too
    ]
    reference = subprocess.Popen(
        train_cmd(tmp_path / "ref", *extra, max_steps=steps),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen(
        train_cmd(victim_dir, *extra, max_steps=steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        cwd=ROOT,
    )
    deadline = time.time() + TIMEOUT
    try:
        while not (victim_dir / "checkpoints" / "ckpt-4.index").exists():
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    killed_at = int(tf.train.latest_checkpoint(str(victim_dir / "checkpoints")).rsplit("-", 1)[1])
    assert 4 <= killed_at < steps
    resumed = run([*train_cmd(victim_dir, *extra, max_steps=steps), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    r_out, r_err = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, r_err[-3000:]
    a, b = checkpoint_arrays(tmp_path / "ref", steps), checkpoint_arrays(victim_dir, steps)
    assert a.keys() == b.keys() and any("optimizer/" in k for k in a)  # slots are in there
    assert any(k.startswith("rng/") for k in a)  # and the dropout seed state
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert digest(resumed.stdout) == digest(r_out)
    # rerunning into a folder with checkpoints without --resume is refused
    again = run(train_cmd(victim_dir, *extra, max_steps=steps))
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # 2 steps per epoch; lr 0.01 for steps 1-2, then x1e32: step 3's update explodes and the
    # loss of step 4 (computed with those weights) is not finite.
    out = run(
        train_cmd(
            tmp_path / "nan",
            "data.num_images=16",
            "schedule.name=step",
            "schedule.lr_steps=1",
            "schedule.step_factor=1e32",
            "schedule.base_lr=0.01",
            "optimizer.clip_norm=0",
            "runtime.checkpoint_every=1",
            max_steps=8,
        )
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "non-finite loss" in out.stderr and "at step 4" in out.stderr
    ckpt_dir = tmp_path / "nan" / "checkpoints"
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    assert latest.endswith("ckpt-2") and f"last good checkpoint: {latest}" in out.stderr
    assert not list(ckpt_dir.glob("ckpt-3.*"))  # the diverged weights are not kept
    assert all(np.all(np.isfinite(v)) for v in checkpoint_arrays(tmp_path / "nan").values())


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("partial_fc", [False, True], ids=["full_fc", "partial_fc"])
def test_multiworker_two_local_workers(tmp_path, partial_fc):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        e = env()
        e["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        cmd = train_cmd(
            tmp_path / f"worker{index}",
            "runtime.checkpoint_every=2",
            f"head.partial_fc={str(partial_fc).lower()}",
            strategy="multiworker",
            max_steps=4,
        )
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:  # a worker whose peer died waits forever and ignores SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert digest(outs[0][0]) == digest(outs[1][0])  # the two workers hold the same weights
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    assert (chief / "checkpoints" / "ckpt-4.index").exists() and (chief / "tensorboard").is_dir()
    assert not (other / "checkpoints").exists() and not (other / "tensorboard").exists()
    assert "2 replica(s) x batch 8" in outs[0][0] and outs[1][0].count("step ") == 0
    if partial_fc:
        # Each worker holds half of the 50 centres; the chief's checkpoint holds all of them,
        # assembled with all-gathers: every row moved between step 2 and step 4 (weight decay
        # alone moves a row), so no half is missing or stale.
        key = "partial_fc/centers/.ATTRIBUTES/VARIABLE_VALUE"
        ckpt = chief / "checkpoints"
        c2 = tf.train.load_checkpoint(str(ckpt / "ckpt-2")).get_tensor(key)
        c4 = tf.train.load_checkpoint(str(ckpt / "ckpt-4")).get_tensor(key)
        assert c2.shape == c4.shape == (50, 64) and np.isfinite(c4).all()
        assert (np.abs(c4 - c2).max(axis=1) > 0).all()
