"""Shared helpers of the foundation tests: tiny datasets written in the real on-disk formats.

Every writer returns the arrays it wrote, so a test can compare what the loader
read with what is on disk, pixel for pixel.
"""

from __future__ import annotations

import contextlib
import gzip
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

# Keys of a history record that measure time, not the run's outcome.
TIMING_KEYS = ("epoch_seconds", "train_images_per_second")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a ``uint8`` array as an IDX file (gzipped when ``path`` ends in ``.gz``).

    Layout (yann.lecun.com/exdb/mnist): two zero bytes, type code 0x08 (unsigned
    byte), number of dimensions, then each dimension as a big-endian uint32.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def labelled_images(n: int, rng: np.random.Generator, *, channels: int = 1, size: int = 28, num_classes: int = 10):
    """Noise images with a bright square whose place encodes the label (so tiny models can learn it).

    Returns ``images (n, channels, size, size)`` and ``labels (n,)``, both ``uint8``.
    """
    labels = rng.integers(0, num_classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, channels, size, size)).astype(np.uint8)
    cell = size // 4  # one ViT patch of 7x7 on 28x28 images
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % 16, 4)
        images[i, :, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] += 150
    return images, labels


def write_fashion_mnist(folder: Path, n_train: int = 800, n_test: int = 200, *, seed: int = 0, gz: bool = True) -> dict:
    """Fashion-MNIST's four IDX files (Debian layout) with synthetic images; returns ``{split: (images, labels)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    suffix = ".gz" if gz else ""
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = labelled_images(n, rng)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels.astype(np.int64))
    return out


def numbered_rgb_images(n: int, rng: np.random.Generator, *, first_id: int = 0) -> np.ndarray:
    """``(n, 3, 32, 32)`` random uint8 images whose pixel ``[0, 0, 0]`` is a unique id (< 256)."""
    images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(first_id, first_id + n)
    return images


def write_cifar10_pickles(root: Path, n_per_batch: int = 4, n_test: int = 10, *, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` as the original release writes them.

    The original files are Python 2 pickles, so keys are ``bytes``; ``data`` is
    ``(N, 3072)`` uint8 with the R, G and B planes one after the other.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = numbered_rgb_images(5 * n_per_batch + n_test, rng)
    labels = rng.integers(0, 10, len(images)).astype(np.int64)
    for i in range(5):
        part = slice(i * n_per_batch, (i + 1) * n_per_batch)
        batch = {b"data": images[part].reshape(n_per_batch, 3072), b"labels": labels[part].tolist()}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = slice(5 * n_per_batch, None)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": images[test].reshape(-1, 3072), b"labels": labels[test].tolist()}))
    n = 5 * n_per_batch
    return {"train": (images[:n], labels[:n]), "test": (images[n:], labels[n:])}


def coarse_of(fine: np.ndarray) -> np.ndarray:
    """The fine -> coarse map of the synthetic CIFAR-100 (five fine classes per superclass, as in CIFAR-100)."""
    return fine // 5


def write_cifar100_pickles(root: Path, n_train: int = 20, n_test: int = 10, *, seed: int = 0, meta: bool = True) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` (written with ``str`` keys, as a Python 3 re-export would)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, first in (("train", n_train, 0), ("test", n_test, n_train)):
        images = numbered_rgb_images(n, rng, first_id=first)
        fine = rng.integers(0, 100, n).astype(np.int64)
        batch = {"data": images.reshape(n, 3072), "fine_labels": fine.tolist(), "coarse_labels": coarse_of(fine).tolist()}
        (folder / split).write_bytes(pickle.dumps(batch))
        out[split] = (images, fine, coarse_of(fine))
    if meta:
        names = [f"fine{i:02d}" for i in range(100)]
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [s.encode() for s in names]}))
        out["class_names"] = tuple(names)
    return out


@contextlib.contextmanager
def single_torch_thread():
    """Run torch on one intra-op thread, then restore the previous count.

    On a small shared machine, OpenMP threads competing with another job slow the
    tiny models of these tests 10-30x; with one thread a run takes about a second.
    Subprocesses get the same through ``OMP_NUM_THREADS=1``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_hermetic_folders(mp: Any, data_dir: Any, tmp_path: Any) -> None:
    """Point data, results and cache at test folders (``mp``: a ``pytest.MonkeyPatch``); forget cached data.

    The engine reads ``VMOE_DATA_DIR``/``VMOE_RESULTS_DIR``/``VMOE_CACHE_DIR``; spawned and
    subprocess ranks inherit them. ``VMOE_REQUIRE_RESULTS`` is cleared so missing runs train. The
    in-memory data cache is keyed by (dataset, image_size, val_size) only, not by the folder.
    """
    from vmoe_lib import train as vtrain

    mp.setenv("VMOE_DATA_DIR", str(data_dir))
    mp.setenv("VMOE_RESULTS_DIR", str(tmp_path / "results"))
    mp.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    mp.delenv("VMOE_REQUIRE_RESULTS", raising=False)
    mp.setattr(vtrain, "_DATA_CACHE", {})


def results_of_record(chapter: Any) -> Any:
    """A chapter's committed ``cpu`` results (``chapter.run("cpu")`` with ``VMOE_REQUIRE_RESULTS=1``: never trains)."""
    import os

    old = os.environ.get("VMOE_REQUIRE_RESULTS")
    os.environ["VMOE_REQUIRE_RESULTS"] = "1"
    try:
        return chapter.run("cpu", progress=False)
    finally:
        if old is None:
            os.environ.pop("VMOE_REQUIRE_RESULTS")
        else:
            os.environ["VMOE_REQUIRE_RESULTS"] = old


def toy_chapter(name: str, configs: dict, presets: dict, claims: Any = None) -> Any:
    """A :class:`~vmoe_lib.chapters.base.Chapter` named ``name`` whose every preset trains ``configs`` (name -> config)
    with the preset's seeds, declaring ``claims`` (a function of the preset name; none by default)."""
    from vmoe_lib.chapters.base import Chapter, Run

    class Toy(Chapter):
        def runs(self, preset):
            return [Run(run, config) for run, config in configs.items()]

        def claims(self, preset):
            return list(claims(preset)) if claims else []

    Toy.name, Toy.title, Toy.presets = name, "a toy chapter", dict(presets)
    return Toy()
