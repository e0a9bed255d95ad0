"""The data layer on files the tests write: IDX and pickle parsing, hashes, the restricted unpickler."""
from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np
import pytest

from serving.idx import to_idx
from training import data
from training.data import DataError


def write_idx_set(folder, rng, n_train=10_100, n_test=50, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        raw = to_idx(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def test_mnist_splits_and_canonical_form(mnist):
    assert (mnist.train_x.shape, mnist.val_x.shape, mnist.test_x.shape) == ((50_000, 28, 28), (10_000, 28, 28), (10_000, 28, 28))
    for arr in (mnist.train_x, mnist.train_y, mnist.test_x, mnist.test_y):
        assert arr.dtype == np.uint8
    assert set(np.unique(mnist.test_y)) == set(range(10))
    assert mnist.data_sha256 == data.canonical_sha256(mnist)


def test_official_idx_bytes_match_pinned_hashes(mnist):
    """Rebuilding the official IDX files from the cached arrays gives the pinned bytes: no pixel was lost."""
    tx, ty = mnist.split("train+val")
    for stem, arr in (("train-images-idx3-ubyte", tx), ("train-labels-idx1-ubyte", ty),
                      ("t10k-images-idx3-ubyte", mnist.test_x), ("t10k-labels-idx1-ubyte", mnist.test_y)):
        assert data.sha256_bytes(to_idx(arr)) == data.IDX_SHA256[stem]


def test_same_data_same_hash_whatever_the_source(tmp_path, mnist):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    tx, ty = mnist.split("train+val")
    for stem, arr in (("train-images-idx3-ubyte", tx), ("train-labels-idx1-ubyte", ty),
                      ("t10k-images-idx3-ubyte", mnist.test_x), ("t10k-labels-idx1-ubyte", mnist.test_y)):
        (folder / f"{stem}.gz").write_bytes(gzip.compress(to_idx(arr), compresslevel=1))
    d = data.load(tmp_path, verbose=False)  # torchvision's layout, gzipped
    assert d.data_sha256 == mnist.data_sha256
    assert d.source.startswith("idx:")


def test_user_idx_any_10_class_set_is_used_and_hashed(tmp_path):
    arrays = write_idx_set(tmp_path, np.random.default_rng(0))
    d = data.load(tmp_path, verbose=False)
    assert len(d.train_x) == 100 and len(d.val_x) == 10_000 and len(d.test_x) == 50
    np.testing.assert_array_equal(d.val_x, arrays["train-images-idx3-ubyte"][-10_000:])
    assert d.files["train-images-idx3-ubyte"] == data.sha256_bytes(to_idx(arrays["train-images-idx3-ubyte"]))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\0", "trailing bytes"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "wrong magic"),
    (lambda b: b[:6], "truncated IDX header"),
])
def test_idx_reader_names_the_bad_file(tmp_path, damage, message):
    write_idx_set(tmp_path, np.random.default_rng(1))
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        data.load(tmp_path, verbose=False)
    assert "t10k-images-idx3-ubyte" in str(e.value)


def test_idx_labels_out_of_range_and_count_mismatch(tmp_path):
    write_idx_set(tmp_path, np.random.default_rng(2))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(to_idx(np.full(50, 12, np.uint8)))
    with pytest.raises(DataError, match="label 12 out of range"):
        data.load(tmp_path, verbose=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(to_idx(np.zeros(49, np.uint8)))
    with pytest.raises(DataError, match="49 labels for 50 images"):
        data.load(tmp_path, verbose=False)


def test_idx_wrong_image_size(tmp_path):
    write_idx_set(tmp_path, np.random.default_rng(3))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(to_idx(np.zeros((50, 32, 32), np.uint8)))
    with pytest.raises(DataError, match="32x32, expected 28x28"):
        data.load(tmp_path, verbose=False)


def test_pinned_idx_refuses_other_bytes(tmp_path):
    paths = {}
    write_idx_set(tmp_path, np.random.default_rng(4))
    for key, stem in data.IDX_FILES.items():
        paths[key] = tmp_path / stem
    with pytest.raises(DataError, match="does not match the pinned"):
        data.load_idx(paths, pinned=True, source="test")


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code():
    payload = pickle.dumps([np.zeros(3), Boom()], protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        data.RestrictedUnpickler(io.BytesIO(payload)).load()
    # ... and still builds plain numpy arrays.
    arrays = data.RestrictedUnpickler(io.BytesIO(pickle.dumps((np.arange(5), np.ones((2, 2), np.float32))))).load()
    np.testing.assert_array_equal(arrays[0], np.arange(5))


def test_pickle_with_wrong_hash_is_never_unpickled(tmp_path, monkeypatch):
    """A malicious mnist.pkl.gz in the data folder is refused on its hash, before any byte is unpickled."""
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(Boom())))
    called = []
    monkeypatch.setattr(data.RestrictedUnpickler, "load", lambda self: called.append(1))
    with pytest.raises(DataError, match="not the pinned mnist.pkl.gz"):
        data.load(tmp_path, verbose=False)
    assert not called


def test_cache_is_written_atomically_and_detects_corruption(tmp_path, mnist):
    cache = tmp_path / "mnist.npz"
    data.save_cache(mnist, cache)
    assert [p.name for p in tmp_path.iterdir()] == ["mnist.npz"]  # no temp file left behind
    assert data.load_cache(cache).data_sha256 == mnist.data_sha256
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="mnist.npz"):
        data.load_cache(cache)


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"good")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        data.atomic_write(target, broken)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_expand_shifts_one_pixel_with_zero_fill():
    x = np.zeros((1, 28, 28), np.uint8)
    x[0, 0, 5] = x[0, 10, 27] = 200
    ex, ey = data.expand(x, np.array([7], np.uint8))
    assert ex.shape == (5, 28, 28) and list(ey) == [7] * 5
    # up: row 0 falls off (no wrap-around to the bottom); right: column 27 falls off.
    assert ex[1, 27, 5] == 0 and ex[1, 9, 27] == 200
    assert ex[4, 10, 0] == 0 and ex[4, 0, 6] == 200
    assert all(int(e.sum()) <= int(x.sum()) for e in ex)


def test_idx_is_read_by_serving_idx_and_its_errors_become_data_errors(tmp_path, monkeypatch):
    """training.data has no IDX reader of its own: serving.idx parses, and its InvalidInput
    reaches the user as DataError with the same message."""
    from serving import idx
    from serving.errors import InvalidInput

    assert not hasattr(data, "parse_idx") and not hasattr(data, "to_idx")
    write_idx_set(tmp_path, np.random.default_rng(5))
    raw = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    with pytest.raises(InvalidInput) as direct:
        idx.parse(raw[:-1], "labels", "t10k-labels-idx1-ubyte")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw[:-1])
    with pytest.raises(DataError) as via_data:
        data.load_idx(data.find_idx(tmp_path), pinned=False, source="test")
    assert str(via_data.value).endswith(str(direct.value).split(": ", 1)[1])
    # A damaged gzip and one that inflates past the cap are DataErrors too, naming the file.
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip"):
        data.load_idx(data.find_idx(tmp_path), pinned=False, source="test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 9_000_000))
    monkeypatch.setattr(idx.read_bytes, "__defaults__", (8_000_000,))  # above the 7.9 MB training images
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: inflates to over 8,000,000 bytes"):
        data.load_idx(data.find_idx(tmp_path), pinned=False, source="test")
