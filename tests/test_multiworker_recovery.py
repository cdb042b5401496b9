"""Multi-worker runs that lose or pre-empt a worker, and run folders on a non-local file system.

Two local MultiWorkerMirroredStrategy workers share one run folder (as on shared storage).
One run is interrupted twice (SIGTERM to a random worker, then SIGKILL to a random worker),
relaunched once with a worker that cannot see the checkpoint, and resumed to the end: the
final weights are bitwise those of an uninterrupted two-worker run. Every worker process has
a hard timeout and is SIGKILLed if it outlives it (a worker whose peer never connects ignores
SIGTERM). The run folder on TensorFlow's in-memory ``ram://`` file system stands for
``gs://`` and other non-local file systems.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from test_training import ROOT, _free_ports, digest, env, train_cmd

from facerec_tf.training.run import EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_WORKER_LOST

STEPS = 12
TIMEOUT = 300
EXTRA = ["runtime.checkpoint_every=2"]


LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture
def kill_leftovers():
    """Whatever happens in the test, no worker outlives it."""
    yield
    while LAUNCHED:
        p = LAUNCHED.pop()
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)


class Cluster:
    """Two local workers on fresh ports; output in files (read while they run)."""

    def __init__(self, folder, outputs, *flags):
        ports = _free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        self.logs, self.procs = [], []
        folder.mkdir(parents=True, exist_ok=True)
        for index, output in enumerate(outputs):
            e = env()
            e["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            cmd = [*train_cmd(output, *EXTRA, strategy="multiworker", max_steps=STEPS), *flags]
            out, err = folder / f"worker{index}.out", folder / f"worker{index}.err"
            self.logs.append((out, err))
            with open(out, "w") as o, open(err, "w") as r:
                self.procs.append(subprocess.Popen(cmd, stdout=o, stderr=r, env=e, cwd=ROOT))
        LAUNCHED.extend(self.procs)
        self.deadline = time.time() + TIMEOUT

    def stdout(self, index) -> str:
        return self.logs[index][0].read_text()

    def stderr(self, index) -> str:
        return self.logs[index][1].read_text()

    def wait_for_step(self, step: int) -> None:
        """Until the chief has logged ``step`` (both workers still running)."""
        while f"step {step}/{STEPS} " not in self.stdout(0):
            assert all(p.poll() is None for p in self.procs), "a worker ended too early"
            assert time.time() < self.deadline, "timed out waiting for a step"
            time.sleep(0.05)

    def finish(self) -> list[int]:
        """Wait for both workers (SIGKILL on the hard timeout); their exit codes."""
        try:
            for p in self.procs:
                p.wait(timeout=max(self.deadline - time.time(), 1))
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait(timeout=30)
        return [p.returncode for p in self.procs]


def last_line(text: str) -> str:
    """The trainer's last line on stderr (TensorFlow's C++ log lines, which may follow it
    when the coordination leader exits first, are not ours)."""
    ours = [
        line for line in text.splitlines() if line.startswith(("error: ", "stopped by SIGTERM"))
    ]
    assert ours, text[-3000:]
    return ours[-1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_workers_survive_sigterm_sigkill_and_a_blind_worker_then_resume_bitwise(
    tmp_path, kill_leftovers
):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"random seed {seed}")
    run = tmp_path / "run"
    reference = Cluster(tmp_path / "logs_ref", [tmp_path / "ref"] * 2)

    # 1. SIGTERM to a random worker at a random step: both save at the same step, exit 143.
    first = Cluster(tmp_path / "logs1", [run] * 2)
    first.wait_for_step(rng.randint(2, 3))
    first.procs[rng.randrange(2)].send_signal(signal.SIGTERM)
    assert first.finish() == [EXIT_PREEMPTED] * 2, first.stderr(0)[-3000:] + first.stderr(1)[-3000:]
    lines = {last_line(first.stderr(i)) for i in range(2)}
    assert len(lines) == 1, lines  # the same line on both
    match = re.fullmatch(
        r"stopped by SIGTERM \(pre-emption\) at step (\d+); checkpoint saved: (\S+); "
        r"resume with: python train.py (.+) --resume",
        lines.pop(),
    )
    assert match, lines
    stopped = int(match.group(1))
    assert 2 <= stopped < STEPS and match.group(2) == str(run / "checkpoints" / f"ckpt-{stopped}")
    assert (run / "checkpoints" / f"ckpt-{stopped}.index").exists()

    # 2. Resumed on both, then SIGKILL to a random worker: the survivor stops within the
    # heartbeat timeout, one line, exit 3, no traceback.
    second = Cluster(tmp_path / "logs2", [run] * 2, "--resume")
    second.wait_for_step(stopped + 1)
    assert f"resumed from step {stopped} " in second.stdout(0)
    second.wait_for_step(min(rng.randint(stopped + 1, stopped + 3), STEPS - 2))
    victim = rng.randrange(2)
    killed_at = time.time()
    second.procs[victim].send_signal(signal.SIGKILL)
    codes = second.finish()
    survivor = 1 - victim
    assert codes[victim] == -signal.SIGKILL
    err = second.stderr(survivor)
    assert codes[survivor] == EXIT_WORKER_LOST, err[-3000:]
    assert time.time() - killed_at < 60
    assert "Traceback" not in err
    match = re.fullmatch(
        rf"error: worker {victim} stopped answering at step (\d+); last checkpoint: (\S+); "
        r"resume by relaunching every worker with: python train.py (.+) --resume",
        last_line(err),
    )
    assert match, last_line(err)
    latest = int(match.group(2).rsplit("-", 1)[1])
    assert stopped <= latest <= int(match.group(1))
    assert match.group(2) == str(run / "checkpoints" / f"ckpt-{latest}")

    # 3. Worker 1 relaunched on a folder without the checkpoint: both stop with one line.
    blind = Cluster(tmp_path / "logs3", [run, tmp_path / "elsewhere"], "--resume")
    assert blind.finish() == [EXIT_BAD_INPUT] * 2
    for i, folder in enumerate([run, tmp_path / "elsewhere"]):
        assert last_line(blind.stderr(i)) == (
            f"error: worker 1 restored step 0 but the chief (worker 0) restored step {latest}: "
            "every worker needs --resume and the run folder on storage they all see (this "
            f"worker's: {folder}); stopping every worker"
        )

    # 4. Both resumed again: the weights of the uninterrupted run, bit for bit.
    final = Cluster(tmp_path / "logs4", [run] * 2, "--resume")
    assert final.finish() == [0, 0], final.stderr(0)[-3000:] + final.stderr(1)[-3000:]
    assert f"resumed from step {latest} " in final.stdout(0)
    assert reference.finish() == [0, 0], reference.stderr(0)[-3000:]
    want = digest(reference.stdout(0))
    assert digest(reference.stdout(1)) == want
    assert digest(final.stdout(0)) == want and digest(final.stdout(1)) == want
    for c in (first, second, blind, final):
        for i in range(2):
            assert "Traceback" not in c.stderr(i)


RAM_SCRIPT = """
import json, sys
import tensorflow as tf
from facerec_tf.training.run import main

first, resume = json.loads(sys.argv[1])
codes = [main(first), main(resume)]
gfile = tf.io.gfile
files = sorted(
    f"{folder}/{name}"[len("ram://run/"):]
    for folder, _, names in gfile.walk("ram://run")
    for name in names
)
import keras
import facerec_tf.models
best = keras.models.load_model("ram://run/best/backbone.keras", compile=False)
served = tf.saved_model.load("ram://run/export/saved_model/facerec/1")
with gfile.GFile("ram://run/metrics.json") as f:
    metrics = json.load(f)
with gfile.GFile("ram://run/config.json") as f:
    config = json.load(f)
print("RESULT " + json.dumps({
    "codes": codes, "files": files, "steps": metrics["steps"],
    "digest": metrics["weights_digest"], "total": config["resolved"]["total_steps"],
    "best_params": best.count_params(), "signatures": sorted(served.signatures),
}))
"""


@pytest.mark.slow
def test_run_folder_on_a_non_local_file_system(tmp_path):
    """Everything the trainer writes goes through tf.io.gfile: a ram:// run folder (what a
    gs:// one needs) gets checkpoints, config, metrics, TensorBoard, best/ and export/, and a
    resume reads it; nothing lands on the local disk."""
    common = [
        "data.synthetic_verification_pairs=16",
        "runtime.verify_every=2",
        "runtime.checkpoint_every=2",
    ]

    def args(max_steps, *extra):
        cmd = train_cmd("ram://run", *common, *extra, max_steps=max_steps)
        return cmd[2:]  # without "python train.py"

    first = args(2)
    resume = [*args(4, "runtime.export=true"), "--resume"]
    work = tmp_path / "cwd"
    work.mkdir()
    e = env()
    e["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", RAM_SCRIPT, json.dumps([first, resume])],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=e,
        cwd=work,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2 (ram://run/checkpoints/ckpt-2)" in out.stdout
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["codes"] == [0, 0] and result["steps"] == 4
    files = result["files"]
    for name in (
        "config.json",
        "metrics.json",
        "checkpoints/checkpoint",
        "checkpoints/ckpt-2.index",
        "checkpoints/ckpt-4.index",
        "best/backbone.keras",
        "export/backbone.keras",
        "export/saved_model/facerec/1/saved_model.pb",
    ):
        assert name in files, files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files), files
    assert not any("/." in f or f.startswith(".") for f in files), files  # no temporaries
    assert result["best_params"] > 0 and "serving_default" in result["signatures"]
    assert digest(out.stdout) == result["digest"]
    assert list(work.iterdir()) == []  # nothing written to the local working folder


def test_resume_command_and_exit_codes_are_documented():
    from facerec_tf.training.run import EXAMPLES, EXIT_OK, resume_command

    assert resume_command(["--config", "a b", "--output", "gs://x/run"]) == (
        "python train.py --config 'a b' --output gs://x/run --resume"
    )
    assert resume_command(["--resume", "--output", "r"]) == "python train.py --resume --output r"
    codes = {EXIT_OK, EXIT_BAD_INPUT, EXIT_WORKER_LOST, EXIT_PREEMPTED}
    assert len(codes) == 4
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Training on several machines", 1)[1].split("\n## ", 1)[0]
    for code in codes:
        assert f"| {code} |" in section
        assert f" {code} " in EXAMPLES


def _agreeing(rows, **attrs):
    """A stand-in trainer whose all-gather returns ``rows`` (one per replica)."""
    import types

    import numpy as np

    from facerec_tf.training.trainer import Trainer

    fake = types.SimpleNamespace(
        _gather_rows=lambda values: np.array(rows, dtype=np.float64),
        _config_words=lambda: [1, 2, 3],
        _worker_name=lambda row: Trainer._worker_name(None, row),
        step=int(rows[0][2]),
        weights_digest=lambda: "0" * 64,
        output_dir="/mnt/run",
        checkpoint_dir="/mnt/run/checkpoints",
        **attrs,
    )
    return Trainer, fake


def test_workers_that_disagree_are_named_with_their_step_and_the_chiefs():
    from facerec_tf.training.trainer import ClusterMismatchError

    same = [[0, 0, 6, 1, 2, 3], [0, 0, 6, 1, 2, 3], [0, 1, 6, 1, 2, 3]]  # 2 + 1 replicas
    trainer, fake = _agreeing(same)
    trainer._agree_on_state(fake)  # no error
    trainer._agree_on_config(fake)

    trainer, fake = _agreeing([[0, 0, 6, 1, 2, 3], [0, 1, 0, 7, 8, 9]])
    with pytest.raises(ClusterMismatchError) as e:
        trainer._agree_on_state(fake)
    assert str(e.value) == (
        "worker 1 restored step 0 but the chief (worker 0) restored step 6: every worker needs "
        "--resume and the run folder on storage they all see (this worker's: /mnt/run); "
        "stopping every worker"
    )
    trainer, fake = _agreeing([[1, 0, 6, 1, 2, 3], [0, 0, 6, 1, 2, 3], [0, 1, 6, 1, 2, 4]])
    with pytest.raises(ClusterMismatchError) as e:
        trainer._agree_on_state(fake)
    assert str(e.value) == (
        "worker 1 restored step 6 with other weights than the chief (chief 0, step 6): every "
        "worker must read the same checkpoints in /mnt/run/checkpoints; stopping every worker"
    )
    with pytest.raises(ClusterMismatchError) as e:
        trainer._agree_on_config(fake)
    assert str(e.value) == (
        "worker 1 runs another configuration than the chief (chief 0): give every worker the "
        "same --config, --set and --max-steps; stopping every worker"
    )


def test_the_lost_worker_is_read_from_tensorflows_error():
    from facerec_tf.training.trainer import _is_peer_failure, _lost_worker

    class UnavailableError(Exception):
        pass

    heartbeat = UnavailableError(
        "Collective ops is aborted by: Error reported from /job:worker/task:1: The following "
        "tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\n"
    )
    reset = UnavailableError(
        "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
        "information from remote target /job:worker/replica:0/task:0 while calling "
        "/tensorflow.WorkerService/RecvBuf"
    )
    assert _lost_worker(heartbeat, ("worker", 0)) == "worker 1"
    assert _lost_worker(reset, ("worker", 1)) == "worker 0"
    assert _lost_worker(UnavailableError("no task named"), ("worker", 0)) is None
    assert _is_peer_failure(heartbeat) and _is_peer_failure(reset)
    assert not _is_peer_failure(ValueError("InvalidArgument: shapes differ"))
