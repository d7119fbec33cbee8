"""Per-image test predictions, stored compactly in every run's record.

Per-image paired tests (McNemar, a paired bootstrap over test images) and later calibration
metrics need each test image's outcome, not only the accuracy. Every run stores, for its final
model on the test split:

* ``pred`` — the predicted class of each image (``uint8``, so at most 256 classes);
* ``p_true`` — the softmax probability of the true class (``float16``).

Both are base64 text in the JSON record: 3 bytes per image, 40 KB for Fashion-MNIST's 10,000
test images. Evaluations of the same model under other settings (e.g. with its MoE layers
bypassed) store only which images they got right, as packed bits (:func:`pack_bits`).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import BatchLoader

__all__ = ["Predictions", "collect_predictions", "pack_predictions", "unpack_predictions", "pack_bits", "unpack_bits",
           "correct_bits"]

FORMAT = 1


class Predictions:
    """A model's predictions on the test images: predicted class, true label, true-class probability."""

    def __init__(self, pred: np.ndarray, labels: np.ndarray, p_true: np.ndarray):
        if not (pred.shape == labels.shape == p_true.shape) or pred.ndim != 1:
            raise ValueError(f"pred, labels and p_true must be equally long 1-d arrays; got shapes "
                             f"{pred.shape}, {labels.shape}, {p_true.shape}")
        self.pred, self.labels, self.p_true = pred, labels, p_true

    @property
    def correct(self) -> np.ndarray:
        """Boolean array: image ``i`` was classified correctly."""
        return self.pred == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.pred.size else float("nan")

    def __len__(self) -> int:
        return int(self.pred.size)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _unb64(text: str, dtype: Any, n: int) -> np.ndarray:
    out = np.frombuffer(base64.b64decode(text), dtype=dtype)
    if out.size < n:
        raise ValueError(f"stored predictions hold {out.size} values; {n} expected")
    return out[:n]


def pack_bits(flags: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """A boolean vector as ``{"n": len, "bits": base64 of np.packbits}`` (1 bit per image)."""
    flags = np.asarray(flags.cpu() if isinstance(flags, torch.Tensor) else flags, dtype=bool)
    return {"n": int(flags.size), "bits": _b64(np.packbits(flags))}


def unpack_bits(stored: dict[str, Any]) -> np.ndarray:
    """The boolean vector :func:`pack_bits` stored."""
    n = int(stored["n"])
    return np.unpackbits(np.frombuffer(base64.b64decode(stored["bits"]), dtype=np.uint8))[:n].astype(bool)


def pack_predictions(pred: np.ndarray, labels: np.ndarray, p_true: np.ndarray) -> dict[str, Any]:
    """The JSON form of a run's test predictions (``record["predictions"]``).

    Stores the predicted classes (``uint8``), the true-class probabilities (``float16``) and which
    images were right (packed bits; the labels themselves are the dataset's): about 42 KB of text
    for 10,000 images.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or pred.shape != np.shape(p_true):
        raise ValueError(f"pred, labels and p_true must have one value per image; got shapes {pred.shape}, "
                         f"{labels.shape}, {np.shape(p_true)}")
    if pred.size and (pred.min() < 0 or pred.max() > 255):
        raise ValueError("pack_predictions stores classes as uint8; a class index is outside 0..255")
    return {
        "format": FORMAT,
        "n": int(pred.size),
        "pred": _b64(pred.astype(np.uint8)),
        "p_true": _b64(np.asarray(p_true, dtype=np.float16)),
        "correct": pack_bits(pred == labels)["bits"],
    }


def unpack_predictions(stored: dict[str, Any]) -> Predictions:
    """The :class:`Predictions` a record stores. The true label of an image is known where it was
    classified right (it is ``pred``); elsewhere ``labels`` holds -1 (not stored)."""
    if stored.get("format") != FORMAT:
        raise ValueError(f"stored predictions have format {stored.get('format')!r}; this library reads format {FORMAT}")
    n = int(stored["n"])
    pred = _unb64(stored["pred"], np.uint8, n).astype(np.int64)
    correct = unpack_bits({"n": n, "bits": stored["correct"]})
    labels = np.where(correct, pred, -1)
    return Predictions(pred, labels, _unb64(stored["p_true"], np.float16, n).astype(np.float32))


@torch.no_grad()
def collect_predictions(model: nn.Module, loader: BatchLoader, *, autocast: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pred, labels, p_true)`` of ``model`` (eval mode) over ``loader``, as numpy arrays in loader order.

    ``autocast``: a context-manager factory for mixed precision (``None``: full precision).
    """
    from contextlib import nullcontext

    was_training = model.training
    model.eval()
    preds, labels_all, probs = [], [], []
    try:
        for images, labels in loader:
            with (autocast() if autocast is not None else nullcontext()):
                logits = model(images)
            p = F.softmax(logits.float(), dim=-1)
            preds.append(logits.argmax(-1).cpu())
            labels_all.append(labels.cpu())
            probs.append(p.gather(1, labels.view(-1, 1)).squeeze(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds).numpy(), torch.cat(labels_all).numpy(), torch.cat(probs).numpy()


def correct_bits(model: nn.Module, loader: BatchLoader, *, autocast: Any = None) -> tuple[float, dict[str, Any]]:
    """``(accuracy, packed correctness bits)`` of ``model`` over ``loader``."""
    pred, labels, _ = collect_predictions(model, loader, autocast=autocast)
    correct = pred == labels
    return float(correct.mean()), pack_bits(correct)
