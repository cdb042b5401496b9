"""arcface_torch ``.pth`` import without torch (facerec_tf.torch_import).

Parity on files written by torch: arcface_torch's own MobileFaceNet code
(``../shared/data/arcface_torch``) and, when a Python with torch is available, the twins of
``tests/torch_twin.py`` (IResNet, IR-SE, and the ONNX export of an IResNet). The reader's
format handling (dtypes, views, byte order, wrappers) and its refusal of malicious pickles are
tested on archives assembled opcode by opcode below, so that they need no torch.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest

from facerec_tf.torch_import import (
    STEM_RESCALE,
    TorchCheckpointError,
    load_arcface_torch_pth,
    read_torch_checkpoint,
)

SHARED_MODELS = ("mbf", "mbf_s1_b2231_e128")


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|."""
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------------------------
# A torch.save archive written opcode by opcode (the layout torch 2.x writes, protocol 2)


@dataclass
class T:
    """A tensor: a view (offset, size, stride) of a flat storage of a torch storage type."""

    storage: np.ndarray
    stype: str = "FloatStorage"
    size: tuple = ()
    stride: tuple = ()
    offset: int = 0
    key: str | None = None  # share a storage by giving the same key

    @classmethod
    def of(cls, array, stype="FloatStorage", dtype=np.float32):
        a = np.ascontiguousarray(array, dtype=dtype)
        strides = tuple(s // a.itemsize for s in a.strides)
        return cls(a.reshape(-1), stype, a.shape, strides)


class _Ops:
    def __init__(self) -> None:
        self.b = bytearray(b"\x80\x02")

    def glob(self, module: str, name: str) -> None:
        self.b += b"c" + f"{module}\n{name}\n".encode()

    def text(self, s: str) -> None:
        enc = s.encode()
        self.b += b"X" + struct.pack("<I", len(enc)) + enc

    def int(self, v: int) -> None:
        self.b += b"J" + struct.pack("<i", v)

    def ints(self, values) -> None:
        self.b += b"("
        for v in values:
            self.int(v)
        self.b += b"t"

    def op(self, code: bytes) -> None:
        self.b += code


def _write_tensor(ops: _Ops, t: T, key: str, byteorder: str, inject_offset=None) -> None:
    ops.glob("torch._utils", "_rebuild_tensor_v2")
    ops.op(b"(")  # args
    ops.op(b"(")  # persistent id
    ops.text("storage")
    ops.glob("torch", t.stype)
    ops.text(key)
    ops.text("cpu")
    ops.int(t.storage.size)
    ops.op(b"tQ")
    if inject_offset is not None:
        inject_offset(ops)
    else:
        ops.int(t.offset)
    ops.ints(t.size)
    ops.ints(t.stride)
    ops.op(b"\x89")  # requires_grad False
    ops.glob("collections", "OrderedDict")
    ops.op(b")R")  # backward hooks: OrderedDict()
    ops.op(b"tR")


def _storage_bytes(t: T, byteorder: str) -> bytes:
    a = t.storage
    if byteorder == "big":
        a = a.byteswap()
    return a.tobytes()


def write_pth(
    path,
    tensors: dict[str, T],
    *,
    prefix: str = "archive",
    byteorder: str = "little",
    wrap: str | None = None,
    inject=None,
    inject_offset=None,
) -> None:
    """Write ``tensors`` as a torch zip checkpoint; ``wrap`` puts the state dict in
    ``{wrap: state_dict, "epoch": 7}``; ``inject(ops)`` adds a value under the key ``"x"``;
    ``inject_offset(ops)`` replaces the first tensor's storage offset."""
    ops = _Ops()
    if wrap:
        ops.op(b"}(")
        ops.text("epoch")
        ops.int(7)
        ops.text(wrap)
    ops.glob("collections", "OrderedDict")
    ops.op(b")R(")
    storages: dict[str, T] = {}
    for i, (name, t) in enumerate(tensors.items()):
        key = t.key or str(len(storages))
        storages.setdefault(key, t)
        ops.text(name)
        _write_tensor(ops, t, key, byteorder, inject_offset if i == 0 else None)
    if inject is not None:
        ops.text("x")
        inject(ops)
    ops.op(b"u")
    if wrap:
        ops.op(b"u")
    ops.op(b".")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", bytes(ops.b))
        z.writestr(f"{prefix}/byteorder", byteorder)
        for key, t in storages.items():
            z.writestr(f"{prefix}/data/{key}", _storage_bytes(t, byteorder))
        z.writestr(f"{prefix}/version", "3\n")


# ----------------------------------------------------------------------------------------------
# Reader


def _format_tensors() -> tuple[dict[str, T], dict[str, np.ndarray]]:
    a = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 - 1
    bf = np.array([1.5, -2.25, 2.0**100, -(2.0**-120)], np.float32)  # exact in bfloat16
    half = np.array([[0.1, -65504.0], [6e-8, 2.0]], np.float16)
    ta = T.of(a)
    tensors = {
        "a": ta,
        "a_t": T(ta.storage, size=(4, 3), stride=(1, 4), key="0"),  # transposed view
        "a_col": T(ta.storage, size=(3,), stride=(4,), offset=2, key="0"),  # a[:, 2]
        "half": T.of(half, "HalfStorage", np.float16),
        "bf16": T((bf.view(np.uint32) >> 16).astype(np.uint16), "BFloat16Storage", (2, 2), (2, 1)),
        "double": T.of(np.array([1 / 3], np.float64), "DoubleStorage", np.float64),
        "bn.num_batches_tracked": T(np.array([3], np.int64), "LongStorage"),
    }
    expected = {
        "a": a,
        "a_t": a.T,
        "a_col": a[:, 2],
        "half": half,
        "bf16": bf.reshape(2, 2),
        "double": np.array([1 / 3]),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }
    return tensors, expected


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_reader_dtypes_views_and_byteorder(tmp_path, byteorder):
    tensors, expected = _format_tensors()
    path = tmp_path / "m.pth"
    write_pth(path, tensors, prefix="any_folder_name", byteorder=byteorder)
    state = read_torch_checkpoint(path)
    assert list(state) == list(expected)
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == want.dtype.newbyteorder("="), key
        assert got.dtype.isnative, key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("wrap", ["state_dict_backbone", "state_dict", "model"])
def test_reader_unwraps_checkpoints_and_ddp_prefix(tmp_path, wrap):
    a = np.ones((2, 2), np.float32)
    path = tmp_path / "checkpoint_gpu_0.pt"
    write_pth(path, {"module.conv1.weight": T.of(a), "module.bn1.bias": T.of(a[0])}, wrap=wrap)
    state = read_torch_checkpoint(path)
    assert list(state) == ["conv1.weight", "bn1.bias"]
    np.testing.assert_array_equal(state["conv1.weight"], a)


def test_reader_refuses_out_of_bounds_view(tmp_path):
    path = tmp_path / "m.pth"
    write_pth(path, {"w": T(np.zeros(4, np.float32), size=(2, 3), stride=(3, 1))})
    with pytest.raises(TorchCheckpointError, match=r"reaching element 5 of storage data/0, "):
        read_torch_checkpoint(path)


def test_reader_refuses_non_zip_and_legacy(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(TorchCheckpointError, match=r"legacy \(non-zip\) torch serialization"):
        read_torch_checkpoint(legacy)
    other = tmp_path / "other.pth"
    other.write_bytes(b"\x89PNG\r\n\x1a\nxxxx")
    with pytest.raises(TorchCheckpointError, match=r"other.pth: not a zip archive"):
        read_torch_checkpoint(other)


# ----------------------------------------------------------------------------------------------
# Malicious pickles: refused, nothing executed


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def _call(module, name, arg):
    def inject(ops: _Ops) -> None:
        ops.glob(module, name)
        ops.op(b"(")
        ops.text(arg)
        ops.op(b"tR")

    return inject


def _malicious_cases(marker):
    touch = f"touch {marker}"
    create = f"open({str(marker)!r}, 'w').close()"
    return {
        # the whole data.pkl is a pickled os.system call (pickle names it posix.system)
        "posix.system": lambda p: _zip_with_pkl(p, pickle.dumps(_System(touch), protocol=2)),
        # a state dict with one extra value built by builtins.exec
        "builtins.exec": lambda p: write_pth(
            p, {"w": T.of(np.ones(2))}, inject=_call("builtins", "exec", create)
        ),
        # os.system as the value of a key
        "os.system": lambda p: write_pth(
            p, {"w": T.of(np.ones(2))}, inject=_call("os", "system", touch)
        ),
        # a reduce nested inside a tensor's rebuild arguments (Python 2 name of eval)
        "builtins.eval": lambda p: write_pth(
            p,
            {"w": T.of(np.ones(2))},
            inject_offset=_call("__builtin__", "eval", f"__import__('os').system({touch!r})"),
        ),
        # an allowed tag called as a function
        "torch.FloatStorage called": lambda p: write_pth(
            p, {"w": T.of(np.ones(2))}, inject=_call("torch", "FloatStorage", touch)
        ),
    }


def _zip_with_pkl(path, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)


@pytest.mark.parametrize(
    "glob",
    ["posix.system", "builtins.exec", "os.system", "builtins.eval", "torch.FloatStorage called"],
)
def test_malicious_pickle_is_refused_and_executes_nothing(tmp_path, glob):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _malicious_cases(marker)[glob](path)
    for load in (read_torch_checkpoint, load_arcface_torch_pth):
        with pytest.raises(TorchCheckpointError) as e:
            load(path)
        assert str(e.value).startswith(
            f"{path}: refused to load the pickle: it asks for the global {glob}, which a torch "
            "state dict never needs"
        )
        assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# arcface_torch MobileFaceNet (its own code, torch.save): parity and key checks


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_arcface_torch_mbf_pth_parity(arcface_torch_dir, name):
    model = load_arcface_torch_pth(arcface_torch_dir / f"{name}.pth")
    probe = np.load(arcface_torch_dir / "probe_faces.npy").astype(np.float32)
    eval_ref = np.load(arcface_torch_dir / f"{name}_eval_embeddings.npy")
    train_ref = np.load(arcface_torch_dir / f"{name}_train_embeddings.npy")
    assert model.count_params() == {"mbf": 2059520, "mbf_s1_b2231_e128": 723840}[name] + sum(
        int(np.prod(w.shape)) for w in model.non_trainable_weights
    )
    assert rel_err(model(probe, training=False), eval_ref) <= 1e-4
    assert rel_err(model(probe, training=True), train_ref) <= 1e-4
    if name == "mbf_s1_b2231_e128":
        cfg = model.get_config()
        assert (cfg["stage_units"], cfg["width_scale"], cfg["embedding_size"]) == (
            (2, 2, 3, 1),
            1,
            128,
        )


def test_stem_rescale_and_no_preprocessing(arcface_torch_dir):
    """Without the preprocess layer the model takes (x - 127.5) / 128 like every backbone built
    that way here (stem scaled by 128/127.5 as with it); stem_scale=1 copies it unscaled, to be
    fed torch's (x - 127.5) / 127.5."""
    from facerec_tf.models import create_backbone

    path = arcface_torch_dir / "mbf_s1_b2231_e128.pth"
    state = read_torch_checkpoint(path)
    bare = create_backbone(
        "mobilefacenet",
        embedding_size=128,
        stage_units=(2, 2, 3, 1),
        width_scale=1,
        include_preprocessing=False,
    )
    load_arcface_torch_pth(path, backbone=bare)
    scaled = load_arcface_torch_pth(path)
    w = state["layers.0.layers.0.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(
        scaled.get_layer("stem_conv").kernel.numpy(), w * np.float32(STEM_RESCALE)
    )
    np.testing.assert_array_equal(
        bare.get_layer("stem_conv").kernel.numpy(), scaled.get_layer("stem_conv").kernel.numpy()
    )
    probe = np.load(arcface_torch_dir / "probe_faces.npy").astype(np.float32)
    ref = np.load(arcface_torch_dir / "mbf_s1_b2231_e128_eval_embeddings.npy")
    assert rel_err(bare((probe - 127.5) / 128.0), ref) <= 1e-4
    load_arcface_torch_pth(path, backbone=bare, stem_scale=1.0)
    np.testing.assert_array_equal(bare.get_layer("stem_conv").kernel.numpy(), w)
    assert rel_err(bare((probe - 127.5) / 127.5), ref) <= 1e-4


def _rewrite(src, dst, change) -> None:
    state = read_torch_checkpoint(src)
    change(state)
    write_pth(
        dst,
        {
            k: T.of(v, dtype=v.dtype) if v.dtype != np.int64 else T(v.reshape(-1), "LongStorage")
            for k, v in state.items()
        },
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.__setitem__("layers.3.layers.0.extra.weight", np.ones(3, np.float32)),
            "key layers.3.layers.0.extra.weight: is not used by 'mobilefacenet' (1 unused keys) "
            "(expected only the keys of an arcface_torch backbone of this architecture)",
        ),
        (
            lambda s: s.__setitem__("conv_sep.layers.0.weight", np.ones((512, 64, 1, 1), "f4")),
            "key conv_sep.layers.0.weight: has shape (512, 64, 1, 1) "
            "(expected shape (512, 128, 1, 1))",
        ),
        (
            lambda s: s.pop("layers.4.layers.1.layers.2.weight"),
            "key layers.4.layers.1.layers.2.weight: missing from the state dict "
            "(expected shape (256,))",
        ),
        (
            lambda s: s.pop("features.layers.3.running_var"),
            "key features.layers.3.running_var: missing from the state dict (expected shape (128,))",
        ),
    ],
    ids=["unknown", "shape", "missing_prelu", "missing_bn_stat"],
)
def test_unknown_missing_or_misshapen_keys_are_named(arcface_torch_dir, tmp_path, change, message):
    path = tmp_path / "bad.pth"
    _rewrite(arcface_torch_dir / "mbf_s1_b2231_e128.pth", path, change)
    with pytest.raises(TorchCheckpointError) as e:
        load_arcface_torch_pth(path)
    assert str(e.value) == f"{path}, {message}"


def test_round_trip_of_the_test_writer(arcface_torch_dir, tmp_path):
    """The opcode writer above writes what the reader reads from torch's own file."""
    src = arcface_torch_dir / "mbf_s1_b2231_e128.pth"
    path = tmp_path / "copy.pth"
    _rewrite(src, path, lambda s: None)
    a, b = read_torch_checkpoint(src), read_torch_checkpoint(path)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype


# ----------------------------------------------------------------------------------------------
# Twins written by torch in a subprocess (tests/torch_twin.py)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, embedding, onnx", [("iresnet10", 512, True), ("ir_se10", 128, False)]
)
def test_torch_written_iresnet_pth_parity(torch_fixture, arch, embedding, onnx):
    files = torch_fixture(arch, embedding=embedding, onnx=onnx)
    model = load_arcface_torch_pth(files["pth"])
    assert model.name == arch
    assert model.get_config()["embedding_size"] == embedding
    probe = np.load(files["probe"]).astype(np.float32)
    assert rel_err(model(probe, training=False), np.load(files["eval"])) <= 1e-4
    assert rel_err(model(probe, training=True), np.load(files["train"])) <= 1e-4


@pytest.mark.slow
def test_torch_exported_iresnet_onnx_parity(torch_fixture):
    pytest.importorskip("onnx")
    from facerec_tf.onnx_import import load_insightface_onnx

    files = torch_fixture("iresnet10", embedding=512, onnx=True)
    model = load_insightface_onnx(files["onnx"])
    probe = np.load(files["probe"]).astype(np.float32)
    assert rel_err(model(probe, training=False), np.load(files["eval"])) <= 1e-4
