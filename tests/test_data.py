"""Datasets (readers of every on-disk format, the validation split) and the tensor batch loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_foundation import (
    coarse_of,
    write_cifar10_pickles,
    write_cifar100_pickles,
    write_fashion_mnist,
)
from vmoe_lib import data as vdata
from vmoe_lib.data import BatchLoader, augment_batch, fit_image_size, load_dataset
from vmoe_lib.errors import ConfigError, DataUnavailableError


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No data outside tmp_path is found, and the Hugging Face hub is never reached."""
    monkeypatch.delenv("VMOE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # hides ~/.cache/vmoe/<name>
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    # `datasets` reads these at import time, which may already have happened in this process.
    try:
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    except ImportError:
        pass


def _ids(images: torch.Tensor) -> list[int]:
    """The unique id each synthetic CIFAR image carries in pixel [0, 0, 0]."""
    return images[:, 0, 0, 0].tolist()


# ---------------------------------------------------------------------------
# Fashion-MNIST: IDX files


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_files_are_read_pixel_exact(tmp_path, gz):
    written = write_fashion_mnist(tmp_path / "fm", n_train=30, n_test=12, gz=gz)
    ds = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=0)
    # val_size=0: the training part keeps the file's order.
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (30, 1, 28, 28) and ds.test_images.shape == (12, 1, 28, 28)
    assert torch.equal(ds.train_images, torch.from_numpy(written["train"][0]))
    assert torch.equal(ds.train_labels, torch.from_numpy(written["train"][1]))
    assert torch.equal(ds.test_images, torch.from_numpy(written["test"][0]))
    assert torch.equal(ds.test_labels, torch.from_numpy(written["test"][1]))
    assert ds.val_images.shape == (0, 1, 28, 28)
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top" and ds.image_shape == (1, 28, 28)


def test_idx_reader_golden_header(tmp_path):
    # A 2x3 array: header 00 00 08 02 | 00 00 00 02 | 00 00 00 03, then 6 bytes row-major.
    path = tmp_path / "x-idx2-ubyte"
    path.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
    np.testing.assert_array_equal(vdata._read_idx(path), [[1, 2, 3], [4, 5, 6]])
    path.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # 0x0D: float32, not ours
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        vdata._read_idx(path)


def test_fashion_mnist_found_through_vmoe_data_dir(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", n_train=20, n_test=10)
    monkeypatch.setenv("VMOE_DATA_DIR", str(tmp_path / "data"))
    ds = load_dataset("fashion_mnist", val_size=4)
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (16, 4, 10)


def test_validation_split_is_deterministic_disjoint_and_sized(tmp_path):
    written = write_fashion_mnist(tmp_path / "fm", n_train=50, n_test=10)
    a = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=7)
    b = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=7)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.train_images, b.train_images)
    assert a.val_images.shape[0] == 7 and a.train_images.shape[0] == 43
    # Identify each image by its bytes: train and val partition the 50 training images.
    all_rows = {img.tobytes() for img in written["train"][0]}
    train_rows = {img.numpy().tobytes() for img in a.train_images}
    val_rows = {img.numpy().tobytes() for img in a.val_images}
    assert len(all_rows) == 50 and not train_rows & val_rows and train_rows | val_rows == all_rows
    # Labels travel with their images.
    label_of = {img.tobytes(): int(lbl) for img, lbl in zip(written["train"][0], written["train"][1])}
    assert [label_of[img.numpy().tobytes()] for img in a.val_images] == a.val_labels.tolist()
    # Another split_seed holds out other images.
    c = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=7, split_seed=1)
    assert {img.numpy().tobytes() for img in c.val_images} != val_rows


def test_normalisation_statistics_come_from_the_training_part(tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_train=40, n_test=10)
    ds = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=10)
    pixels = ds.train_images.double() / 255
    assert ds.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-5)
    assert ds.std[0] == pytest.approx(pixels.std().item(), rel=1e-5)


def test_image_size_pads_fashion_mnist_to_32(tmp_path):
    written = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10)
    ds = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=0, image_size=32)
    assert ds.image_shape == (1, 32, 32) and ds.test_images.shape == (10, 1, 32, 32)
    assert torch.equal(ds.test_images[:, :, 2:30, 2:30], torch.from_numpy(written["test"][0]))


# ---------------------------------------------------------------------------
# CIFAR: python pickles


def test_cifar10_pickles(tmp_path):
    written = write_cifar10_pickles(tmp_path, n_per_batch=4, n_test=10)
    ds = load_dataset("cifar10", root=tmp_path, val_size=5)
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.val_images.shape == (5, 3, 32, 32)
    assert ds.test_images.shape == (10, 3, 32, 32)
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane"
    # Each image comes back with its planes in place and its own label, in the test split in file order.
    images, labels = written["train"]
    for split in ("train", "val"):
        split_images, split_labels = ds.split(split)
        for img, lbl in zip(split_images, split_labels):
            i = int(img[0, 0, 0])
            assert torch.equal(img, torch.from_numpy(images[i])) and int(lbl) == labels[i]
    assert sorted(_ids(ds.train_images) + _ids(ds.val_images)) == list(range(20))
    assert torch.equal(ds.test_images, torch.from_numpy(written["test"][0]))
    assert ds.test_labels.tolist() == written["test"][1].tolist()
    assert ds.extra_labels == {}


def test_cifar10_pickle_plane_layout(tmp_path):
    # Row n of `data` is R(1024) G(1024) B(1024), each plane row-major: byte c*1024 + y*32 + x is pixel (c, y, x).
    written = write_cifar10_pickles(tmp_path, n_per_batch=1, n_test=2)
    raw = written["test"][0].reshape(2, 3072)
    ds = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", val_size=0)  # the batches folder itself
    for c, y, x in ((0, 0, 1), (1, 5, 7), (2, 31, 30)):
        assert int(ds.test_images[1, c, y, x]) == raw[1, c * 1024 + y * 32 + x]


@pytest.mark.parametrize("meta", [True, False], ids=["with_meta", "no_meta"])
def test_cifar100_pickles_with_coarse_labels(tmp_path, meta):
    written = write_cifar100_pickles(tmp_path, n_train=20, n_test=10, meta=meta)
    ds = load_dataset("cifar100", root=tmp_path, val_size=6)
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (14, 6, 10)
    assert ds.num_classes == 100
    assert ds.class_names == (written["class_names"] if meta else tuple(f"class_{i}" for i in range(100)))
    coarse = ds.extra_labels["coarse"]
    assert set(coarse) == {"train", "val", "test"}
    fine_of = dict(zip(range(20), written["train"][1].tolist()))
    for split in ("train", "val", "test"):
        images, fine = ds.split(split)
        assert coarse[split].dtype == torch.int64 and coarse[split].shape == fine.shape
        assert torch.equal(coarse[split], torch.from_numpy(coarse_of(fine.numpy())))
    for split in ("train", "val"):  # fine labels stay with their images through the split
        images, fine = ds.split(split)
        assert fine.tolist() == [fine_of[i] for i in _ids(images)]
    assert ds.test_labels.tolist() == written["test"][1].tolist()


# ---------------------------------------------------------------------------
# Local parquet files in the Hugging Face hub layout


def _write_hub_parquet(folder: Path, name: str, splits: dict) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    sub = folder / ("plain_text" if name == "cifar10" else "cifar100")
    sub.mkdir(parents=True)
    for split, (images, fine, *coarse) in splits.items():
        columns = {"img": [Image.fromarray(im.transpose(1, 2, 0)) for im in images]}
        features = {"img": datasets.Image()}
        if name == "cifar10":
            columns["label"] = fine.tolist()
            features["label"] = datasets.ClassLabel(num_classes=10)
        else:
            columns["fine_label"], columns["coarse_label"] = fine.tolist(), coarse[0].tolist()
            features["fine_label"] = datasets.ClassLabel(num_classes=100)
            features["coarse_label"] = datasets.ClassLabel(num_classes=20)
        ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        ds.to_parquet(str(sub / f"{split}-00000-of-00001.parquet"))


def test_cifar10_hub_parquet(tmp_path):
    rng = np.random.default_rng(3)
    splits = {
        "train": (rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 12)),
        "test": (rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 6)),
    }
    splits["train"][0][:, 0, 0, 0] = np.arange(12)
    _write_hub_parquet(tmp_path / "hub", "cifar10", splits)
    ds = load_dataset("cifar10", root=tmp_path / "hub", val_size=4)
    assert ds.train_images.shape == (8, 3, 32, 32) and ds.val_images.shape == (4, 3, 32, 32)
    # PNG inside parquet is lossless: pixels and labels are exactly those written.
    assert torch.equal(ds.test_images, torch.from_numpy(splits["test"][0]))
    assert ds.test_labels.tolist() == splits["test"][1].tolist()
    for img, lbl in zip(ds.train_images, ds.train_labels):
        i = int(img[0, 0, 0])
        assert torch.equal(img, torch.from_numpy(splits["train"][0][i])) and int(lbl) == splits["train"][1][i]


def test_cifar100_hub_parquet_has_coarse_labels(tmp_path):
    rng = np.random.default_rng(4)
    fine_train, fine_test = rng.integers(0, 100, 10), rng.integers(0, 100, 5)
    splits = {
        "train": (rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8), fine_train, coarse_of(fine_train)),
        "test": (rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8), fine_test, coarse_of(fine_test)),
    }
    _write_hub_parquet(tmp_path / "hub", "cifar100", splits)
    ds = load_dataset("cifar100", root=tmp_path / "hub", val_size=3)
    assert ds.test_labels.tolist() == fine_test.tolist()
    assert torch.equal(ds.test_images, torch.from_numpy(splits["test"][0]))
    for split in ("train", "val", "test"):
        _, fine = ds.split(split)
        assert torch.equal(ds.extra_labels["coarse"][split], fine // 5)


# ---------------------------------------------------------------------------
# imagefolder


def test_imagefolder_reads_class_folders_and_resizes(tmp_path):
    from PIL import Image

    colours = {"cat": (200, 10, 30), "dog": (5, 90, 250)}
    for split, n in (("train", 3), ("val", 2)):
        for cls, colour in colours.items():
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                # Flat colour, odd non-square size: resizing must keep the colour exactly.
                Image.new("RGB", (13, 9), colour).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", root=tmp_path, val_size=2, image_size=16)
    assert ds.class_names == ("cat", "dog")
    assert ds.train_images.shape == (4, 3, 16, 16) and ds.val_images.shape == (2, 3, 16, 16)
    assert ds.test_images.shape == (4, 3, 16, 16) and ds.test_labels.tolist() == [0, 0, 1, 1]
    for images, labels in (ds.split("train"), ds.split("val"), ds.split("test")):
        for img, lbl in zip(images, labels):
            expected = torch.tensor(colours[ds.class_names[int(lbl)]], dtype=torch.uint8).view(3, 1, 1)
            assert torch.equal(img, expected.expand(3, 16, 16))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_dataset("imagefolder")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataUnavailableError, match="val/"):
        load_dataset("imagefolder", root=tmp_path)


# ---------------------------------------------------------------------------
# Errors


def test_unknown_dataset_names_the_setting_and_the_choices():
    with pytest.raises(ConfigError) as err:
        load_dataset("mnist")
    message = str(err.value)
    assert "dataset='mnist'" in message
    for allowed in vdata.DATASETS:
        assert repr(allowed) in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_without_files_says_what_was_tried_and_fails_fast(tmp_path, monkeypatch, name):
    import time

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("VMOE_DATA_DIR", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    started = time.monotonic()
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(name)
    assert time.monotonic() - started < 20  # no minute of hub retries
    message = str(err.value)
    assert f"dataset={name!r}" in message
    assert str(empty) in message  # the folder it looked in
    assert vdata._HUB_IDS[name] in message  # ... and the hub
    assert "cs.toronto.edu" in message and "root=" in message  # how to get the data


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("file", "is a file"), ("empty", "holds no {name} dataset"),
])
@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_a_bad_root_is_an_error_never_a_fall_back_to_another_copy(tmp_path, monkeypatch, kind, message, name):
    write_fashion_mnist(tmp_path / "elsewhere", n_train=20, n_test=5)
    monkeypatch.setenv("VMOE_DATA_DIR", str(tmp_path / "elsewhere"))  # a valid copy it must not fall back to
    root = tmp_path / "root"
    if kind == "file":
        root.write_text("x")
    elif kind == "empty":
        root.mkdir()
    with pytest.raises(ConfigError) as err:
        load_dataset(name, root=root, val_size=0)
    assert f"root={str(root)!r}" in str(err.value) and message.format(name=name) in str(err.value)


@pytest.mark.parametrize("val_size", [-1, 2.5, "10", 20, 21])
def test_bad_val_size(tmp_path, val_size):
    write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=5)
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=val_size)


@pytest.mark.parametrize("image_size", [4, 28.0])
def test_bad_image_size(tmp_path, image_size):
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("fashion_mnist", root=tmp_path, image_size=image_size)


def test_split_name_is_checked(tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=5)
    ds = load_dataset("fashion_mnist", root=tmp_path / "fm", val_size=2)
    with pytest.raises(ConfigError, match="split='validation'"):
        ds.split("validation")


# ---------------------------------------------------------------------------
# fit_image_size


def test_fit_image_size_pads_centred_with_zeros():
    images = torch.arange(1, 2 * 28 * 28 + 1).remainder(250).add(1).to(torch.uint8).view(2, 1, 28, 28)
    out = fit_image_size(images, 32)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.uint8
    # (32 - 28) / 2 = 2 rows/columns of zeros on each side.
    assert torch.equal(out[:, :, 2:30, 2:30], images)
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[2:30, 2:30] = False
    assert out[:, :, mask].eq(0).all()
    # Odd margin: 33 - 28 = 5 -> 2 before, 3 after.
    odd = fit_image_size(images, 33)
    assert torch.equal(odd[:, :, 2:30, 2:30], images) and odd[:, :, :2].eq(0).all() and odd[:, :, 30:].eq(0).all()
    assert fit_image_size(images, 28) is images


def test_fit_image_size_resizes_down():
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(fit_image_size(flat, 16), torch.full((1, 3, 16, 16), 77, dtype=torch.uint8))
    halves = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    halves[..., :16] = 255
    out = fit_image_size(halves, 16)
    assert out.shape == (1, 1, 16, 16) and out.dtype == torch.uint8
    # Far from the edge each side keeps its value; only the two middle columns blend.
    assert out[..., :7].eq(255).all() and out[..., 9:].eq(0).all()


# ---------------------------------------------------------------------------
# augment_batch


def _batch(b=6, c=2, h=8, w=8, seed=0):
    return torch.randint(0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_augment_is_deterministic_for_a_seeded_generator():
    images = _batch()
    a = augment_batch(images, padding=2, flip=True, generator=torch.Generator().manual_seed(5))
    b = augment_batch(images, padding=2, flip=True, generator=torch.Generator().manual_seed(5))
    c = augment_batch(images, padding=2, flip=True, generator=torch.Generator().manual_seed(6))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_without_crop_or_flip_is_identity():
    images = _batch()
    assert torch.equal(augment_batch(images, padding=0, flip=False, generator=torch.Generator().manual_seed(0)), images)


def test_augment_flip_only_gives_each_image_or_its_mirror():
    images = _batch(b=32)
    out = augment_batch(images, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()  # 32 fair coins: both sides come up


def test_augment_crop_is_a_window_of_the_zero_padded_image():
    images, p = _batch(b=16), 2
    out = augment_batch(images, padding=p, flip=False, generator=torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    offsets = []
    for img, pad in zip(out, padded):
        windows = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        hits = [(dy, dx) for dy, dx in windows if torch.equal(pad[:, dy : dy + 8, dx : dx + 8], img)]
        assert hits, "output is not a crop of the padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets differ across the batch


# ---------------------------------------------------------------------------
# BatchLoader


def _loader(n=50, batch_size=8, **kwargs):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n)
    return BatchLoader(images, labels, batch_size=batch_size, mean=(0.0,), std=(1.0,), **kwargs)


def _collect(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("start_step", [1, 3, 5])
def test_epoch_start_step_is_the_tail_of_the_epoch(augment, start_step):
    loader = _loader(shuffle=True, drop_last=True, augment=augment, crop_padding=1, seed=3)
    full = _collect(loader.epoch(2))
    tail = _collect(loader.epoch(2, start_step=start_step))
    assert len(full) == 6 and len(tail) == 6 - start_step  # 50 // 8 = 6 batches with drop_last
    for (xa, ya), (xb, yb) in zip(full[start_step:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_epochs_and_seeds_shuffle_differently_but_reproducibly():
    loader = _loader(shuffle=True, seed=0)
    order = lambda ld, e: torch.cat([y for _, y in ld.epoch(e)]).tolist()  # noqa: E731
    e0, e1 = order(loader, 0), order(loader, 1)
    assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))  # every image once (no drop_last)
    assert e0 != e1 and e0 == order(loader, 0)
    assert order(_loader(shuffle=True, seed=1), 0) != e0
    assert order(_loader(shuffle=False), 0) == list(range(50))
    assert order(_loader(shuffle=False), 0) == [y for _, ys in _loader(shuffle=False) for y in ys.tolist()]


def test_images_follow_their_labels_and_are_normalised():
    n = 20
    images = torch.arange(n, dtype=torch.uint8).mul(10).view(n, 1, 1, 1).expand(n, 2, 3, 3).contiguous()
    loader = BatchLoader(images, torch.arange(n), batch_size=6, mean=(0.5, 0.25), std=(0.5, 2.0), shuffle=True)
    assert len(loader) == 4  # ceil(20 / 6)
    sizes = []
    for x, y in loader.epoch(0):
        assert x.dtype == torch.float32 and x.shape[1:] == (2, 3, 3)
        pixel = y.double() * 10 / 255  # image i holds the value 10 i
        # Channel 0: (p - 0.5) / 0.5; channel 1: (p - 0.25) / 2.
        torch.testing.assert_close(x[:, 0, 1, 1].double(), (pixel - 0.5) / 0.5, rtol=0, atol=1e-6)
        torch.testing.assert_close(x[:, 1, 2, 0].double(), (pixel - 0.25) / 2.0, rtol=0, atol=1e-6)
        sizes.append(len(y))
    assert sorted(sizes) == [2, 6, 6, 6]


def test_drop_last_and_bad_batch_size():
    assert len(_loader(n=50, batch_size=8, drop_last=True)) == 6
    assert len(_loader(n=50, batch_size=8)) == 7
    with pytest.raises(ConfigError, match="batch_size=0"):
        _loader(batch_size=0)


# ---------------------------------------------------------------------------
# The real Fashion-MNIST (Debian's dataset-fashion-mnist package)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist")
    assert ds.train_images.shape == (55000, 1, 28, 28)
    assert ds.val_images.shape == (5000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    for split in ("train", "val", "test"):
        _, labels = ds.split(split)
        assert labels.min() == 0 and labels.max() == 9
    # The test split is balanced: 1000 images per class.
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    assert 0.2 < ds.mean[0] < 0.4 and 0.3 < ds.std[0] < 0.4
