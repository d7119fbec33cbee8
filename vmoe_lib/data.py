"""Datasets as in-memory uint8 tensors, and a fast batched loader for small images.

Small-image datasets (Fashion-MNIST, CIFAR) fit in memory many times over, so
the whole split is kept as one ``uint8`` tensor ``(N, C, H, W)`` and batches are
cut, augmented (random crop with padding, horizontal flip) and normalised on
the training device with a handful of tensor ops. On a 2-core CPU this keeps
data loading at a few percent of a training step, where a ``DataLoader`` of PIL
images would dominate it.

Sources, tried in order and reported together when all fail:

* Fashion-MNIST: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), or any folder given by ``root`` or
  ``$VMOE_DATA_DIR``; then the Hugging Face hub through ``datasets``.
* CIFAR-10/100: the original python-pickle release (``cifar-10-batches-py``,
  ``cifar-100-python``) under ``root``/``$VMOE_DATA_DIR``; local parquet files
  in the hub's layout; then the hub through ``datasets``. CIFAR-100 also
  exposes its 20 coarse labels (``extra_labels["coarse"]``).
* ``imagefolder``: an ImageNet-style folder ``root/{train,val}/<class>/<image>``,
  resized to ``image_size`` and held in memory (for small or downsampled
  ImageNet-style sets, e.g. Imagenette).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataUnavailableError, check_choice

__all__ = [
    "DATASETS",
    "DATASET_FACTS",
    "DatasetFacts",
    "imagefolder_root",
    "check_available",
    "ImageDataset",
    "load_dataset",
    "BatchLoader",
    "augment_batch",
    "fit_image_size",
]

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")


@dataclass(frozen=True)
class DatasetFacts:
    """What a config can be checked against before any data is read: images in the training split (the validation
    images are held out of it), in the test split, classes, the native side (pixels) and channels."""

    train: int
    test: int
    classes: int
    size: int
    channels: int


#: The facts of the datasets of known size (an image folder's are only known once it is read).
DATASET_FACTS: dict[str, DatasetFacts] = {
    "fashion_mnist": DatasetFacts(train=60000, test=10000, classes=10, size=28, channels=1),
    "cifar10": DatasetFacts(train=50000, test=10000, classes=10, size=32, channels=3),
    "cifar100": DatasetFacts(train=50000, test=10000, classes=100, size=32, channels=3),
}


def imagefolder_root() -> Path | None:
    """The image folder a ``dataset="imagefolder"`` config trains on: ``$VMOE_IMAGEFOLDER_ROOT`` (a folder with
    ``train/`` and ``val/`` of class subfolders), or ``None`` when unset."""
    value = os.environ.get("VMOE_IMAGEFOLDER_ROOT")
    return Path(value) if value else None

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_HUB_IDS = {
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
}


@dataclass
class ImageDataset:
    """One dataset held in memory.

    ``*_images`` are ``uint8`` tensors ``(N, C, H, W)``; ``*_labels`` are ``int64`` ``(N,)``.
    The validation split is carved deterministically from the official training
    split (see :func:`load_dataset`); ``test_*`` is the official test split.
    ``extra_labels`` maps a name (e.g. ``"coarse"``) to per-split label tensors
    ``{"train": ..., "val": ..., "test": ...}``.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra_labels: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the stored images."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of split ``"train"``, ``"val"`` or ``"test"``."""
        check_choice("split", name, ("train", "val", "test"))
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


# ---------------------------------------------------------------------------
# Readers for the on-disk formats


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST/Fashion-MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist_from_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    files = {
        split: (_find_idx(folder, f"{prefix}-images-idx3-ubyte"), _find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    if any(p is None for pair in files.values() for p in pair):
        return None
    out = {}
    for split, (img_path, lbl_path) in files.items():
        images = _read_idx(img_path)[:, None]  # (N, 1, 28, 28)
        out[split] = (images, _read_idx(lbl_path).astype(np.int64))
    return out


def _cifar_files(folder: Path, name: str) -> dict[str, list[Path]]:
    """The files of the original CIFAR python release under ``folder``: ``{"train": [...], "test": [...]}``."""
    if name == "cifar10":
        base = folder / "cifar-10-batches-py" if (folder / "cifar-10-batches-py").is_dir() else folder
        return {"train": [base / f"data_batch_{i}" for i in range(1, 6)], "test": [base / "test_batch"]}
    base = folder / "cifar-100-python" if (folder / "cifar-100-python").is_dir() else folder
    return {"train": [base / "train"], "test": [base / "test"]}


def _cifar_from_pickles(folder: Path, name: str) -> dict[str, tuple[np.ndarray, ...]] | None:
    """The original CIFAR python release: ``data`` rows of 3072 bytes (R, G, B planes)."""
    parts = _cifar_files(folder, name)
    if not all(p.is_file() for files in parts.values() for p in files):
        return None
    out = {}
    for split, files in parts.items():
        images, fine, coarse = [], [], []
        for path in files:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            fine.append(np.asarray(batch["labels" if name == "cifar10" else "fine_labels"], dtype=np.int64))
            if name == "cifar100":
                coarse.append(np.asarray(batch["coarse_labels"], dtype=np.int64))
        out[split] = (np.concatenate(images), np.concatenate(fine)) + (
            (np.concatenate(coarse),) if coarse else ()
        )
    return out


def _cifar100_class_names(folder: Path) -> tuple[str, ...] | None:
    for meta in (folder / "cifar-100-python" / "meta", folder / "meta"):
        if meta.is_file():
            with open(meta, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            names = d.get(b"fine_label_names") or d.get("fine_label_names")
            return tuple(n.decode() if isinstance(n, bytes) else n for n in names)
    return None


def _from_hf_dataset(ds, name: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Convert a ``datasets.DatasetDict`` with ``train``/``test`` splits in the hub's column layout."""
    image_col = {"fashion_mnist": "image", "cifar10": "img", "cifar100": "img"}[name]
    label_col = {"fashion_mnist": "label", "cifar10": "label", "cifar100": "fine_label"}[name]
    out = {}
    for split in ("train", "test"):
        part = ds[split]
        images = np.stack([np.asarray(im.convert("L" if name == "fashion_mnist" else "RGB")) for im in part[image_col]])
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        labels = np.asarray(part[label_col], dtype=np.int64)
        extra = (np.asarray(part["coarse_label"], dtype=np.int64),) if name == "cifar100" else ()
        out[split] = (np.ascontiguousarray(images), labels) + extra
    return out


def _from_hub_or_parquet(name: str, folder: Path | None) -> dict[str, tuple[np.ndarray, ...]]:
    """Load through Hugging Face ``datasets``: local parquet files if present, else the hub."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as err:
        raise DataUnavailableError("the `datasets` package is not installed (pip install datasets)") from err
    if folder is not None:
        files = {s: sorted(str(p) for p in folder.rglob(f"{s}-*.parquet")) for s in ("train", "test")}
        if files["train"] and files["test"]:
            return _from_hf_dataset(datasets.load_dataset("parquet", data_files=files), name)
    problem = _hub_unreachable()
    if problem:  # fail in seconds, not after a minute of retries
        raise DataUnavailableError(f"Hugging Face hub {_HUB_IDS[name]!r}: {problem}")
    try:
        return _from_hf_dataset(datasets.load_dataset(_HUB_IDS[name]), name)
    except Exception as err:  # network errors come in many types
        raise DataUnavailableError(f"Hugging Face hub {_HUB_IDS[name]!r}: {type(err).__name__}: {err}") from err


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used from here (offline mode, no route), or ``None``."""
    import socket

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return f"offline mode (${var} is set)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return None
    except OSError as err:
        return f"not reachable from this machine ({name}: {err.strerror or type(err).__name__})"


def _imagefolder(root: Path, image_size: int) -> tuple[dict, tuple[str, ...]]:
    from PIL import Image

    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataUnavailableError(
            f"imagefolder root={str(root)!r} must contain train/ and val/ (or test/) with one folder per class"
        )
    classes = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir()))
    if not classes:
        raise DataUnavailableError(f"imagefolder root={str(root)!r}: train/ has no class folders")
    out = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for path in sorted((folder / cls).glob("*")):
                if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".webp"}:
                    continue
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(im).transpose(2, 0, 1))
                labels.append(label)
        if not images:
            raise DataUnavailableError(f"imagefolder {str(folder)!r} holds no images")
        out[split] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    return out, classes


# ---------------------------------------------------------------------------


def _candidate_folders(root: str | os.PathLike | None, name: str) -> list[Path]:
    folders = []
    if root is not None:
        folders.append(Path(root))
    if os.environ.get("VMOE_DATA_DIR"):
        base = Path(os.environ["VMOE_DATA_DIR"])
        folders += [base / name.replace("_", "-"), base / name, base]
    if name == "fashion_mnist":
        folders.append(_DEBIAN_FASHION_MNIST)
    folders.append(Path.home() / ".cache" / "vmoe" / name)
    return list(dict.fromkeys(folders))  # each place once ("cifar10" needs no "-" variant)


def _load_raw(name: str, root, image_size: int | None):
    """Return ``(splits, class_names)`` where ``splits[s] = (images, labels[, coarse])``."""
    if name == "imagefolder":
        root = root if root is not None else imagefolder_root()
        if root is None:
            raise ConfigError("dataset='imagefolder' needs root=<folder with train/ and val/> (or $VMOE_IMAGEFOLDER_ROOT)")
        return _imagefolder(Path(root), image_size or 64)

    if root is not None:
        root = Path(root)
        if not root.exists():
            raise ConfigError(f"root={str(root)!r} does not exist; pass the folder that holds the {name} files, or leave "
                              "root unset to use $VMOE_DATA_DIR and the default places")
        if not root.is_dir():
            raise ConfigError(f"root={str(root)!r} is a file; pass the folder that holds the {name} files")
        raw = _fashion_mnist_from_folder(root) if name == "fashion_mnist" else _cifar_from_pickles(root, name)
        if raw is not None:
            return raw, _class_names(name, root)
        parquet = [p for s in ("train", "test") for p in root.rglob(f"{s}-*.parquet")]
        if parquet:
            return _from_hub_or_parquet(name, root), _class_names(name, None)
        expected = ("the four IDX files (train-images-idx3-ubyte[.gz], ...)" if name == "fashion_mnist"
                    else f"the python release of {name} (cifar-10-batches-py/ or cifar-100-python/) or parquet files")
        raise ConfigError(f"root={str(root)!r} holds no {name} dataset; it must contain {expected}")
    tried = []
    for folder in _candidate_folders(root, name):
        if not folder.is_dir():
            tried.append(f"{folder} (no such folder)")
            continue
        raw = _fashion_mnist_from_folder(folder) if name == "fashion_mnist" else _cifar_from_pickles(folder, name)
        if raw is not None:
            return raw, _class_names(name, folder)
        tried.append(f"{folder} (no {name} files in a known format)")
    try:
        parquet_dir = Path(root) if root is not None else None
        return _from_hub_or_parquet(name, parquet_dir), _class_names(name, None)
    except DataUnavailableError as err:
        tried.append(str(err))
    hint = (
        "install Debian's package (apt-get install dataset-fashion-mnist), or pass root=<folder with the IDX files>"
        if name == "fashion_mnist"
        else "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html and pass "
        "root=<folder>, or install `datasets` on a machine that reaches huggingface.co"
    )
    raise DataUnavailableError(f"dataset={name!r} is not available offline. Tried: " + "; ".join(tried) + f". To get it: {hint}.")


def _class_names(name: str, folder: Path | None) -> tuple[str, ...]:
    if name == "fashion_mnist":
        return FASHION_MNIST_CLASSES
    if name == "cifar10":
        return CIFAR10_CLASSES
    names = _cifar100_class_names(folder) if folder is not None else None
    return names or tuple(f"class_{i}" for i in range(100))


def fit_image_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bring ``uint8`` images ``(N, C, H, W)`` to ``size x size``.

    Larger targets are reached by centred zero padding (Fashion-MNIST's
    background is 0, so 28 -> 32 for ConvNeXt's four 2x reductions adds only
    background); smaller ones by bilinear resizing.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if size >= h and size >= w:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top))
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def check_available(name: str) -> str:
    """Where dataset ``name`` would be read from, found without reading it; raise before any run starts when it
    cannot be had here (:class:`DataUnavailableError`, saying what was tried and how to get it; :class:`ConfigError`
    for an image folder that is unset or lacks ``train/``)."""
    check_choice("dataset", name, DATASETS)
    if name == "imagefolder":
        root = imagefolder_root()
        if root is None:
            raise ConfigError("dataset='imagefolder' needs $VMOE_IMAGEFOLDER_ROOT=<folder with train/ and val/ of class "
                              "subfolders>; it is unset")
        if not (root / "train").is_dir():
            raise ConfigError(f"$VMOE_IMAGEFOLDER_ROOT={str(root)!r} has no train/ folder of class subfolders")
        return str(root)
    tried = []
    for folder in _candidate_folders(None, name):
        if not folder.is_dir():
            tried.append(f"{folder} (no such folder)")
            continue
        found = (_find_idx(folder, "train-images-idx3-ubyte") is not None if name == "fashion_mnist"
                 else all(p.is_file() for files in _cifar_files(folder, name).values() for p in files))
        if found:
            return str(folder)
        tried.append(f"{folder} (no {name} files in a known format)")
    import importlib.util

    reason = ("the `datasets` package is not installed (pip install \"vmoe-lib[hf]\")"
              if importlib.util.find_spec("datasets") is None else _hub_unreachable())
    if reason is None:
        return f"the Hugging Face hub ({_HUB_IDS[name]})"
    hint = ("install Debian's package (apt-get install dataset-fashion-mnist), or set $VMOE_DATA_DIR to a folder with the "
            "IDX files" if name == "fashion_mnist" else
            "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html into $VMOE_DATA_DIR")
    raise DataUnavailableError(f"dataset={name!r} is not available here. Tried: " + "; ".join(tried) +
                               f"; the Hugging Face hub: {reason}. To get it: {hint}.")


def load_dataset(
    name: str = "fashion_mnist",
    *,
    root: str | os.PathLike | None = None,
    val_size: int = 5000,
    split_seed: int = 0,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a dataset into memory with a deterministic validation split.

    Args:
        name: one of :data:`DATASETS`.
        root: a folder with the dataset's files (optional for Fashion-MNIST, which
            Debian's package provides).
        val_size: number of training images held out for validation, chosen by a
            permutation seeded with ``split_seed`` (the same for every seed of a
            sweep, so all runs share the same split).
        image_size: resize/pad images to ``image_size x image_size``; ``None``
            keeps the native size.

    Raises:
        ConfigError: unknown ``name`` or impossible ``val_size``.
        DataUnavailableError: no source worked; the message lists what was tried.
    """
    check_choice("dataset", name, DATASETS)
    if not isinstance(val_size, int) or val_size < 0:
        raise ConfigError(f"val_size={val_size!r} is invalid; it must be an int >= 0")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ConfigError(f"image_size={image_size!r} is invalid; it must be an int >= 8 or None")
    raw, class_names = _load_raw(name, root, image_size)
    train = [torch.from_numpy(np.array(a, copy=True)) for a in raw["train"]]
    test = [torch.from_numpy(np.array(a, copy=True)) for a in raw["test"]]
    n_train = train[0].shape[0]
    if val_size >= n_train:
        raise ConfigError(f"val_size={val_size} must be smaller than the {n_train} training images of {name!r}")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    if image_size is not None:
        train[0] = fit_image_size(train[0], image_size)
        test[0] = fit_image_size(test[0], image_size)
    # Normalisation statistics from the training part only.
    pixels = train[0][train_idx].float().div_(255)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).tolist())
    extra = {}
    if len(train) > 2:
        extra["coarse"] = {"train": train[2][train_idx], "val": train[2][val_idx], "test": test[2]}
    return ImageDataset(
        name=name,
        train_images=train[0][train_idx],
        train_labels=train[1][train_idx],
        val_images=train[0][val_idx],
        val_labels=train[1][val_idx],
        test_images=test[0],
        test_labels=test[1],
        class_names=class_names,
        mean=mean,
        std=std,
        extra_labels=extra,
    )


# ---------------------------------------------------------------------------
# Batching and augmentation on tensors


def augment_batch(
    images: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip on a ``uint8`` batch ``(B, C, H, W)``.

    Random numbers come from ``generator`` (on the CPU, so results do not
    depend on the device); the gather runs on the images' device.
    """
    b, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator).to(images.device)
        rows = (offsets[:, :1] + torch.arange(h, device=images.device)).view(b, 1, h, 1)
        cols = (offsets[:, 1:] + torch.arange(w, device=images.device)).view(b, 1, 1, w)
        batch_idx = torch.arange(b, device=images.device).view(b, 1, 1, 1)
        chan_idx = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        out = padded[batch_idx, chan_idx, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(images.device).view(b, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    return out


class BatchLoader:
    """Iterate over ``(images, labels)`` batches of an in-memory split.

    Images leave as normalised ``float32`` on ``device``. With ``shuffle``, the
    order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a resumed
    run sees exactly the batches it would have seen; ``start_step`` skips the
    first batches of an epoch (mid-epoch resume).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        crop_padding: int = 2,
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size!r} is invalid; it must be an int > 0")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch ``epoch``, starting at batch ``start_step``."""
        n = self.images.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment:
                # One generator per step: the augmentation of a batch does not depend on
                # how many batches were drawn before it in this process (resume-safe).
                step_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + step)
                images = augment_batch(images, padding=self.crop_padding, flip=self.flip, generator=step_gen)
            yield (images.float().div_(255) - self.mean) / self.std, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
