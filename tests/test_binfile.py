"""insightface `.bin` files: round trip, foreign layouts, refusing malformed or hostile files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from facescale.eval.binfile import EvalSetError, read_bin, write_bin


def test_round_trip_keeps_pair_order_and_flags(tmp_path):
    images = [bytes([i]) * (i + 1) for i in range(6)]
    path = write_bin(tmp_path / "v.bin", images, [True, False, True])
    loaded = read_bin(path)
    assert loaded.images == images and loaded.issame == [True, False, True]
    got_images, got_issame = loaded  # unpacks like insightface's (bins, issame_list)
    assert got_images[3] == images[3] and got_issame[1] is False


def test_reads_insightface_style_pickle_with_numpy_flags(tmp_path):
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as handle:  # tuple container, numpy bools, a uint8 buffer as one image
        pickle.dump(((b"a", b"b", np.frombuffer(b"cd", np.uint8), b"e"), [np.bool_(True), np.bool_(False)]),
                    handle, protocol=2)
    images, issame = read_bin(path)
    assert images == [b"a", b"b", b"cd", b"e"] and issame == [True, False]


def test_write_refuses_unpaired_images(tmp_path):
    with pytest.raises(ValueError, match="2 images per pair"):
        write_bin(tmp_path / "v.bin", [b"a", b"b", b"c"], [True])


@pytest.mark.parametrize("content, message", [
    (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
    (([], []), "at least one pair"),
    ({"images": []}, "expected a pickled"),
    (([b"a", 5], [True]), "image 1 is a int"),
    # containers and flags of the wrong type (a string `issame` was read as one pair per character)
    (([b"a", b"b"], 5), "issame is a int, expected a list"),
    ((5, [True]), "images is a int, expected a list"),
    (([b"a", b"b"], "x"), "issame is a str, expected a list"),
    (([b"a", b"b"], np.array([True, None], dtype=object)), "issame is a ndarray, expected a list"),
    (([b"a", b"b"], [np.array([1, 2])]), "issame 0 is a ndarray, expected a bool"),
    (([b"a", b"b", b"c", b"d"], [True, 2]), "issame 1 is a int, expected a bool"),
])
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(EvalSetError, match=message) as info:
        read_bin(path)
    assert str(path) in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_hostile_pickle_is_refused_without_running_code(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(), b"x"], [True])))
    with pytest.raises(ValueError, match="refusing to load"):
        read_bin(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(EvalSetError, match="none.bin: verification set does not exist"):
        read_bin(tmp_path / "none.bin")
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:10])
    with pytest.raises(ValueError, match="cut.bin"):
        read_bin(truncated)


def _imencode_like(payload: bytes) -> np.ndarray:
    """What cv2.imencode returns (and insightface's build_eval_pack.py stores): uint8 of shape (N, 1)."""
    return np.frombuffer(payload, dtype=np.uint8).reshape(-1, 1).copy()


def test_reads_build_eval_pack_protocol_5_numpy_arrays(tmp_path):
    images = [b"\xff\xd8" + name + b"\xff\xd9" for name in (b"first", b"second", b"third", b"x")]
    arrays = [_imencode_like(image) for image in images]
    arrays[1].flags.writeable = False  # read-only buffers pickle as bytes, writable ones as bytearray
    path = tmp_path / "pack.bin"
    path.write_bytes(pickle.dumps((arrays, [True, False]), protocol=5))
    assert read_bin(path) == (images, [True, False])


class _Sneaky:
    """Pickles as a call of numpy.frombuffer: a numpy global that .bin files never need."""

    def __reduce__(self):
        return (np.frombuffer, (b"abcd", "u1"))


def test_numpy_globals_beyond_the_bin_format_stay_refused(tmp_path):
    path = tmp_path / "sneaky.bin"
    path.write_bytes(pickle.dumps(([_Sneaky(), b"b"], [True]), protocol=5))
    with pytest.raises(EvalSetError, match="refusing to load numpy.*frombuffer"):
        read_bin(path)




def test_numpy_bool_vector_and_integer_flags_are_read(tmp_path):
    path = tmp_path / "v.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], np.array([True, False]))))
    assert read_bin(path).issame == [True, False]
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], [1, 0])))
    assert read_bin(path).issame == [True, False]


def test_a_length_beyond_memory_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "huge.bin"  # protocol 4 BINBYTES8 declaring 2**62 bytes, then two
    path.write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"ab")
    with pytest.raises(EvalSetError, match=r"huge.bin: not an insightface .bin pickle \(it declares an "
                                           r"object too large"):
        read_bin(path)
