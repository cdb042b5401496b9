"""Tests of facerec_tf.data.verification_bin (insightface verification ``.bin`` pair files)."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import re
import subprocess

import numpy as np
import pytest

from facerec_tf.data.verification_bin import (
    VerificationSet,
    decode_pairs,
    flip_horizontal,
    load_bin,
    write_bin,
    write_bin_from_pairs,
)
from facerec_tf.errors import ImageError, VerificationBinError


@pytest.fixture(scope="module")
def pairs_manifest(rec_dir):
    return json.loads((rec_dir / "manifest.json").read_text())["pairs"]


@pytest.fixture(scope="module")
def py3_set(rec_dir) -> VerificationSet:
    return load_bin(rec_dir / "yale_pairs_py3.bin")


def _jpeg(height: int, width: int, value: int = 128) -> bytes:
    import tensorflow as tf

    img = np.full((height, width, 3), value, dtype=np.uint8)
    img[: height // 2] = 255 - value  # not flat, so a flip is visible
    return bytes(tf.io.encode_jpeg(img, quality=90).numpy())


# ----------------------------------------------------------------------------------------------
# the fixtures


def test_py2_and_py3_files_load_identically(rec_dir, pairs_manifest):
    py2 = load_bin(rec_dir / "yale_pairs_py2.bin")
    py3 = load_bin(rec_dir / "yale_pairs_py3.bin")
    assert py2.name == "yale_pairs_py2" and py3.name == "yale_pairs_py3"
    assert py2.path == str(rec_dir / "yale_pairs_py2.bin")
    assert py2.jpeg_bytes == py3.jpeg_bytes
    assert all(type(b) is bytes for b in py2.jpeg_bytes)
    assert py2.issame.dtype == np.bool_ and np.array_equal(py2.issame, py3.issame)
    assert len(py2) == pairs_manifest["count"] == 300
    assert int(py2.issame.sum()) == pairs_manifest["same"] == 150
    assert py2.issame.tolist() == [item[2] for item in pairs_manifest["items"]]
    digests = [hashlib.sha256(b).hexdigest() for b in py2.jpeg_bytes]
    assert digests == pairs_manifest["sha256_of_images_in_order"]


def test_decode_pairs(py3_set):
    images = decode_pairs(py3_set, image_size=(112, 112))
    assert images.shape == (600, 112, 112, 3) and images.dtype == np.uint8
    assert images.std() > 10  # real faces, not zeros
    image_module = pytest.importorskip("PIL.Image")
    for i in (0, 7, 599):  # same pixels as libjpeg's accurate (ISLOW) decoder in Pillow
        reference = np.asarray(image_module.open(io.BytesIO(py3_set.jpeg_bytes[i])).convert("RGB"))
        assert np.array_equal(images[i], reference), i
    flipped = flip_horizontal(images)
    assert flipped.shape == images.shape
    assert np.array_equal(flipped[7][:, 0], images[7][:, -1])
    assert np.array_equal(flip_horizontal(flipped), images)


# ----------------------------------------------------------------------------------------------
# malicious pickles


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "make",
    [
        lambda s: (os.system, (f"touch {s}",)),
        lambda s: (eval, (f"open({str(s)!r}, 'w').close()",)),
        lambda s: (builtins.exec, (f"open({str(s)!r}, 'w').close()",)),
        lambda s: (subprocess.call, (["touch", str(s)],)),
        lambda s: (subprocess.Popen, (["touch", str(s)],)),
    ],
    ids=["os.system", "eval", "builtins.exec", "subprocess.call", "subprocess.Popen"],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, make, protocol):
    sentinel = tmp_path / "SENTINEL"
    func, args = make(sentinel)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", _Evil(func, args)], [True]), protocol=protocol))
    refused = re.escape(f"{func.__module__}.{func.__name__}")
    with pytest.raises(VerificationBinError, match=rf"refused .*global {refused}") as e:
        load_bin(path)
    assert e.value.path == str(path) and str(path) in str(e.value)
    assert not sentinel.exists()


def test_codecs_encode_only_rebuilds_latin1_bytes(tmp_path):
    # A protocol-2 call of _codecs.encode with another codec is refused.
    data = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "codec.bin"
    path.write_bytes(data)
    with pytest.raises(VerificationBinError, match=r"refused .*_codecs\.encode"):
        load_bin(path)


def test_numpy_non_bool_dtype_refused(tmp_path):
    path = tmp_path / "ints.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([1])), protocol=2))
    with pytest.raises(VerificationBinError, match=r"refused .*numpy\.dtype"):
        load_bin(path)


def test_protocol2_py3_bytes_and_numpy_bools_are_accepted(tmp_path):
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], [np.bool_(True), False]), 2))
    vset = load_bin(path)
    assert vset.jpeg_bytes == [b"a", b"b", b"c", b"d"] and vset.issame.tolist() == [True, False]
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([False])), protocol=2))
    assert load_bin(path).issame.tolist() == [False]


# ----------------------------------------------------------------------------------------------
# malformed files


def test_not_a_pickle(tmp_path):
    path = tmp_path / "text.bin"
    path.write_bytes(b"this is not a pickle\n")
    with pytest.raises(VerificationBinError, match="not a readable pickle") as e:
        load_bin(path)
    assert e.value.path == str(path)


def test_truncated_pickle(rec_dir, tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes((rec_dir / "yale_pairs_py2.bin").read_bytes()[:100_000])
    with pytest.raises(VerificationBinError, match="not a readable pickle") as e:
        load_bin(path)
    assert str(path) in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(VerificationBinError, match="not a readable pickle"):
        load_bin(path)


def test_missing_file(tmp_path):
    with pytest.raises(VerificationBinError, match="cannot read file"):
        load_bin(tmp_path / "nope.bin")


@pytest.mark.parametrize(
    "obj,match",
    [
        (([b"a", b"b"], [True], None), "3-tuple"),
        ({"bins": [b"a", b"b"]}, "a dict"),
        ([[b"a", b"b"], [True]], "a list"),
    ],
)
def test_not_a_2_tuple(tmp_path, obj, match):
    path = tmp_path / "shape.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(VerificationBinError, match=match) as e:
        load_bin(path)
    assert "expected a 2-tuple" in str(e.value) and e.value.path == str(path)


def test_image_count_mismatch(tmp_path):
    path = tmp_path / "count.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True, False]), protocol=4))
    with pytest.raises(VerificationBinError, match="3 images for 2 pairs") as e:
        load_bin(path)
    assert "expected 4 images" in str(e.value)


@pytest.mark.parametrize("bad", ["text", 7, None, b""])
def test_image_not_bytes(tmp_path, bad):
    path = tmp_path / "elem.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", bad], [True, False]), protocol=4))
    with pytest.raises(VerificationBinError, match="image 3 ") as e:
        load_bin(path)
    assert e.value.key == 3


def test_bytearray_image_needs_a_global_and_is_refused(tmp_path):
    path = tmp_path / "elem.bin"
    path.write_bytes(pickle.dumps(([b"a", bytearray(b"b")], [True]), protocol=4))
    with pytest.raises(VerificationBinError, match=r"global builtins\.bytearray"):
        load_bin(path)


def test_issame_not_bool(tmp_path):
    path = tmp_path / "flags.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], [True, 1]), protocol=4))
    with pytest.raises(VerificationBinError, match=r"issame\[1\] is a int") as e:
        load_bin(path)
    assert e.value.key == 1


def test_empty_pairs(tmp_path):
    path = tmp_path / "none.bin"
    path.write_bytes(pickle.dumps(([], []), protocol=4))
    with pytest.raises(VerificationBinError, match="pairs list is empty"):
        load_bin(path)


# ----------------------------------------------------------------------------------------------
# decoding errors


def test_decode_wrong_size(tmp_path):
    good, small = _jpeg(112, 112), _jpeg(64, 80)
    path = tmp_path / "sizes.bin"
    write_bin(path, [good, good, good, small], [True, False])
    vset = load_bin(path)
    with pytest.raises(ImageError, match=r"image 3 is 64x80 \(expected 112x112\)") as e:
        decode_pairs(vset)
    assert (e.value.path, e.value.key) == (str(path), 3)
    with pytest.raises(ImageError, match="image 0 is 112x112"):
        decode_pairs(vset, image_size=(64, 80))


def test_decode_undecodable_and_png(tmp_path):
    import tensorflow as tf

    png = bytes(tf.io.encode_png(np.zeros((112, 112, 3), np.uint8)).numpy())
    vset = VerificationSet("x", "x.bin", [png, _jpeg(112, 112)], np.array([True]))
    assert decode_pairs(vset).shape == (2, 112, 112, 3)
    broken = VerificationSet("x", "x.bin", [_jpeg(112, 112), b"\xff\xd8\xffjunk"], np.array([1]))
    with pytest.raises(ImageError, match="image 1 cannot be decoded") as e:
        decode_pairs(broken)
    assert e.value.key == 1 and e.value.path == "x.bin"


# ----------------------------------------------------------------------------------------------
# writer


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_write_round_trip(py3_set, tmp_path, protocol):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old content")
    write_bin(path, py3_set.jpeg_bytes, py3_set.issame, protocol=protocol)
    back = load_bin(path)
    assert back.jpeg_bytes == py3_set.jpeg_bytes
    assert np.array_equal(back.issame, py3_set.issame) and back.issame.dtype == np.bool_
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left behind
    if protocol >= 3:  # no globals at all: any unpickler reads it
        assert pickle.loads(path.read_bytes()) == (py3_set.jpeg_bytes, py3_set.issame.tolist())


@pytest.mark.parametrize(
    "images,issame,match",
    [
        ([b"a", b"b", b"c"], [True, False], "3 images for 2 pairs"),
        ([b"a", "b"], [True], "image 1 is a str"),
        ([], [], "pairs list is empty"),
        ([b"a", b"b"], [2], r"issame\[0\] is a int"),
    ],
)
def test_write_rejects_bad_input_and_writes_nothing(tmp_path, images, issame, match):
    path = tmp_path / "out.bin"
    path.write_bytes(b"keep me")
    with pytest.raises(VerificationBinError, match=match) as e:
        write_bin(path, images, issame)
    assert e.value.path == str(path)
    assert path.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["out.bin"]


def test_write_bin_from_pairs(yale_dir, tmp_path):
    jpeg = _jpeg(243, 320, value=40)
    jpeg_path = tmp_path / "face.jpg"
    jpeg_path.write_bytes(jpeg)
    gif_a, gif_b = yale_dir / "subject01.normal", yale_dir / "subject02.happy"
    assert gif_a.read_bytes()[:3] == b"GIF"
    out = tmp_path / "pairs.bin"
    n = write_bin_from_pairs(
        out, [(gif_a, jpeg_path, False), (gif_a, gif_a, True), (gif_b, jpeg_path, 0)]
    )
    assert n == 3
    vset = load_bin(out)
    assert vset.issame.tolist() == [False, True, False]
    assert vset.jpeg_bytes[1] == jpeg and vset.jpeg_bytes[5] == jpeg  # JPEG kept byte for byte
    assert vset.jpeg_bytes[0][:3] == b"\xff\xd8\xff"  # GIF re-encoded as JPEG
    assert vset.jpeg_bytes[0] == vset.jpeg_bytes[2] == vset.jpeg_bytes[3]
    images = decode_pairs(vset, image_size=(243, 320))
    assert images.shape == (6, 243, 320, 3) and images[0].std() > 10


def test_write_bin_from_pairs_bad_input(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="cannot decode image") as e:
        write_bin_from_pairs(tmp_path / "x.bin", [(text, text, True)])
    assert e.value.path == str(text)
    with pytest.raises(ImageError, match="cannot read image"):
        write_bin_from_pairs(tmp_path / "x.bin", [(tmp_path / "missing.jpg", text, True)])
    assert not (tmp_path / "x.bin").exists()
