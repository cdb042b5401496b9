"""Direct I/O shard writes (facerec_tf.data.directio + TFRecordWriter(direct_io=True)).

The direct writer only writes whole 4 KiB blocks and carries each block's partial tail into
the next one, then pads the last block and truncates the file; every test compares its
bytes and sha256 with the buffered writer's, for stream sizes that end before, on and after
block boundaries, and checks the fall-back to buffered writes when the kernel refuses.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import numpy as np
import pytest

from facerec_tf.data import directio, fastrec, tfrecord
from facerec_tf.data.tfrecord import TFRecordWriter, frame_record, iter_records

pytestmark = pytest.mark.skipif(not directio.supported(), reason="no O_DIRECT on this OS")


def _kernel_takes_o_direct(folder) -> bool:
    """Whether the file system of ``folder`` accepts O_DIRECT writes of an aligned block."""
    path = os.path.join(folder, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.write(fd, memoryview(directio.aligned_buffer(directio.ALIGN)))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def _records(rng, sizes) -> list[bytes]:
    return [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in sizes]


# record payload sizes giving streams that end below, exactly on, and past 4 KiB boundaries
# (a record's frame is its payload + 16 bytes)
STREAMS = {
    "empty": [],
    "one-byte": [0],
    "below-one-block": [100, 2000, 1500],
    "exactly-one-block": [4080],
    "exactly-three-blocks": [4080, 4080 * 2 + 16],
    "one-past-a-block": [4081],
    "random-many": None,  # 400 random sizes, many block boundaries
}


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
@pytest.mark.parametrize("stream", list(STREAMS))
def test_direct_writes_equal_buffered_writes(tmp_path, stream, background):
    rng = np.random.default_rng(len(stream))
    sizes = STREAMS[stream]
    if sizes is None:
        sizes = rng.integers(0, 9000, 400)
    records = _records(rng, sizes)
    paths = {}
    for direct in (False, True):
        path = tmp_path / f"{direct}.tfrecord"
        # small blocks: many flushes, each starting at a different offset within a 4 KiB block
        w = TFRecordWriter(path, block_size=3000, background=background, direct_io=direct)
        if direct and _kernel_takes_o_direct(tmp_path):
            assert w.direct_io
        for r in records:
            w.write(r)
        w.close(fsync=True)
        assert w.num_records == len(records)
        paths[direct] = (path, w.sha256, w.bytes)
    want = b"".join(frame_record(r) for r in records)
    for path, sha, nbytes in paths.values():
        got = path.read_bytes()
        assert got == want and nbytes == len(want)
        assert sha == hashlib.sha256(want).hexdigest()
    assert [r for _, _, r in iter_records(paths[True][0])] == records


def test_refused_direct_writes_fall_back_to_buffered(tmp_path, monkeypatch):
    """A file system that accepts the O_DIRECT flag but refuses the writes (EINVAL, as some
    FUSE and network file systems do): the writer turns the flag off and writes the same
    bytes buffered."""
    real_write = os.write
    refused = []

    def picky_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(tfrecord.os, "write", picky_write)
    rng = np.random.default_rng(0)
    records = _records(rng, rng.integers(0, 9000, 50))
    path = tmp_path / "x.tfrecord"
    w = TFRecordWriter(path, block_size=5000, direct_io=True)
    assert w.direct_io
    for r in records:
        w.write(r)
    w.close(fsync=True)
    assert refused and not w.direct_io
    want = b"".join(frame_record(r) for r in records)
    assert path.read_bytes() == want and w.sha256 == hashlib.sha256(want).hexdigest()


def test_flag_refused_at_open_means_buffered_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tfrecord.directio, "enable", lambda fd: False)
    w = TFRecordWriter(tmp_path / "x.tfrecord", direct_io=True)
    w.write(b"abc")
    w.close()
    assert not w.direct_io and (tmp_path / "x.tfrecord").read_bytes() == frame_record(b"abc")


def test_auto_choice_follows_the_file_system(tmp_path, monkeypatch):
    """The "auto" choice is on exactly for the local disk file systems of LOCAL_FS_MAGIC."""
    if fastrec.get() is None:
        assert not directio.default_for(tmp_path)  # cannot tell the file system without C
        return
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        magic = fastrec.get().fs_magic(fd)
    finally:
        os.close(fd)
    assert directio.default_for(tmp_path) == (magic in directio.LOCAL_FS_MAGIC)
    if os.path.isdir("/proc"):
        assert not directio.default_for("/proc")  # procfs: not a disk file system
    assert not directio.default_for(tmp_path / "missing")
    monkeypatch.setenv(fastrec.ENV_PURE_PYTHON, "1")
    assert not directio.default_for(tmp_path)


def test_aligned_buffers():
    for n in (0, 1, 4095, 4096, 100_000):
        buf = directio.aligned_buffer(n)
        assert buf.size == n and buf.dtype == np.uint8
        assert buf.flags.writeable and buf.flags.c_contiguous
        if n:
            assert buf.ctypes.data % directio.ALIGN == 0
