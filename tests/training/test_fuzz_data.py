"""Hostile files: hypothesis mutates IDX files and Nielsen's pickle and feeds them to the readers,
which may only raise DataError (InvalidInput from serving.idx's parser, which training.data
uses), never crash or run code of the file's choosing.

`make test` runs a fixed set of examples (NETWORK3_FUZZ_EXAMPLES, default 40 per test); `make
fuzz` runs thousands of fresh random ones.  The gRPC half is tests/serving/test_fuzz_grpc.py.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("NETWORK3_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="NETWORK3_FUZZ_EXAMPLES" not in os.environ, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


# ---------------------------------------------------------------- IDX and pickle readers --

@st.composite
def mutate_bytes(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["set", "cut", "insert", "truncate", "u32", "append"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 32))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[pos:]
        elif op == "u32":  # IDX keeps its dimensions as big-endian uint32 in the first 16 bytes
            at = draw(st.sampled_from([0, 4, 8, 12]) | st.just(pos))
            data[at:at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 27, 28, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)))
        else:
            data += draw(st.binary(max_size=64))
    return bytes(data)


def test_idx_reader_on_mutated_files(tmp_path_factory, mnist):
    from serving import idx
    from serving.errors import InvalidInput
    from serving.idx import to_idx
    from training import data
    from training.data import DataError

    folder = tmp_path_factory.mktemp("idx-fuzz")
    images = to_idx(mnist.train_x[:10_001])
    labels = to_idx(mnist.train_y[:10_001])
    test_images, test_labels = to_idx(mnist.test_x[:3]), to_idx(mnist.test_y[:3])
    for name, blob in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                       ("t10k-images-idx3-ubyte", test_images), ("t10k-labels-idx1-ubyte", test_labels)):
        (folder / name).write_bytes(blob)
    assert len(data.load_idx(data.find_idx(folder) or {}, pinned=False, source="seed").train_x) == 1

    @FUZZ
    @given(which=st.sampled_from(["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]), st_data=st.data(),
           gz=st.booleans(), damage_gz=st.booleans())
    def run(which, st_data, gz, damage_gz):
        seeds = {"t10k-images-idx3-ubyte": test_images, "t10k-labels-idx1-ubyte": test_labels}
        for name, seed in seeds.items():
            for stale in (folder / name, folder / f"{name}.gz"):
                stale.unlink(missing_ok=True)
            raw = st_data.draw(mutate_bytes(seed)) if name == which else seed
            if name == which and gz:
                raw = gzip.compress(raw)
                if damage_gz:
                    raw = st_data.draw(mutate_bytes(raw))
            (folder / (f"{name}.gz" if name == which and gz else name)).write_bytes(raw)
        kind = "images" if "images" in which else "labels"
        blob = (folder / which).read_bytes() if (folder / which).exists() else None
        if blob is not None:  # the parser alone
            try:
                arr = idx.parse(blob, kind, which)
            except InvalidInput:
                pass
            else:
                assert arr.dtype == np.uint8 and (arr.shape[1:] == (28, 28) if kind == "images" else arr.ndim == 1)
        try:  # the whole reader, gzip included
            d = data.load_idx(data.find_idx(folder), pinned=False, source="fuzz")
        except DataError:
            return
        assert d.test_x.shape[1:] == (28, 28) and len(d.test_x) == len(d.test_y) and d.test_y.max(initial=0) <= 9

    run()


def test_restricted_unpickler_on_mutated_pickles(tmp_path_factory, monkeypatch):
    """Mutated pickles of Nielsen's layout, with the pinned hash set to each one's own (as if an
    attacker matched it): load_pickle raises DataError or builds arrays, and no global but the
    numpy ones it allows is ever looked up, so no code of the file's choosing can run."""
    from training import data
    from training.data import DataError

    x = (np.arange(2 * 784) % 256 / 256).astype(np.float32).reshape(2, 784)
    y = np.array([3, 7], np.int64)
    plain = pickle.dumps(((x, y), (x, y), (x, y)), protocol=4)
    evil = pickle.dumps(((x, y), (x, y), (x, y)), protocol=4).replace(b"numpy", b"posix", 1)  # a refused module
    canary = tmp_path_factory.mktemp("canary") / "ran"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    boom = pickle.dumps(((x, y), (x, y), [Boom()]), protocol=4)
    path = tmp_path_factory.mktemp("pickle-fuzz") / "mnist.pkl.gz"
    looked_up = set()
    real_find_class = data.RestrictedUnpickler.find_class

    def spy(self, module, name):
        found = real_find_class(self, module, name)  # raises UnpicklingError when refused
        looked_up.add((module, name))
        return found

    monkeypatch.setattr(data.RestrictedUnpickler, "find_class", spy)

    @FUZZ
    @given(blob=st.sampled_from([plain, evil, boom]).flatmap(mutate_bytes), gz=st.booleans())
    def run(blob, gz):
        raw = gzip.compress(blob) if gz else blob
        path.write_bytes(raw)
        monkeypatch.setattr(data, "PICKLE_SHA256", data.sha256_bytes(raw))
        try:
            d = data.load_pickle(path)
        except DataError:
            pass
        else:
            assert d.train_x.dtype == np.uint8 and d.train_x.shape[1:] == (28, 28)
        assert looked_up <= data.RestrictedUnpickler.ALLOWED
        assert not canary.exists()

    run()
    # The unmutated attack files are refused too.
    for blob in (evil, boom):
        path.write_bytes(gzip.compress(blob))
        monkeypatch.setattr(data, "PICKLE_SHA256", data.sha256_bytes(path.read_bytes()))
        with pytest.raises(DataError, match="refused global"):
            data.load_pickle(path)
    assert not canary.exists()
