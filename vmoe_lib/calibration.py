"""Probabilistic quality of a classifier's test predictions: log-likelihood, calibration, ensembles of them.

The E³ chapter (and anyone comparing ensembles) needs more than the accuracy: the negative log-likelihood (NLL) of the
true class and the **expected calibration error** (ECE, Guo et al., ICML 2017; Naeini et al., AAAI 2015): test images
are put in ``bins`` equal-width bins of their confidence (the top class's probability) and
``ECE = sum_b (n_b / n) * abs(accuracy_b - mean_confidence_b)``, 0 for a perfectly calibrated model. The book uses 15 bins (Guo et al.'s choice, used by the uncertainty baselines the
E³ paper builds on). An ensemble's prediction is the mean of its members' probabilities (:func:`ensemble_log_probs`).

Per-image log-probabilities travel in run records as float16, compressed (:func:`pack_log_probs`): about 40 % of
a plain float16 array for 10-class predictions, and ``-log p`` of a true class near 1 keeps about 3 significant
digits (float16 is relative; the log of a probability near 1 is a small number stored precisely).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = ["ECE_BINS", "LOG_PROB_FLOOR", "pack_log_probs", "unpack_log_probs", "unpack_labels", "collect_log_probs", "nll_per_image",
           "confidence_correct", "expected_calibration_error", "ece_resampled", "reliability_table",
           "ensemble_log_probs"]

ECE_BINS = 15
LOG_PROB_FLOOR = -60.0  # log-probabilities below are stored as this (float16 keeps it; p < 1e-26 is 0 for every use)
FORMAT = 1


def pack_log_probs(log_probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None) -> dict[str, Any]:
    """``(N, C)`` log-probabilities as JSON: float16, zlib-compressed, base64 (``{"format", "n", "classes", "data"}``),
    with the images' true ``labels`` (uint8, compressed: ``"labels"``) when given."""
    lp = np.asarray(log_probs.detach().cpu() if isinstance(log_probs, torch.Tensor) else log_probs, dtype=np.float32)
    if lp.ndim != 2:
        raise ConfigError(f"pack_log_probs needs (images, classes) log-probabilities; got shape {lp.shape}")
    if np.isnan(lp).any() or (lp > 1e-3).any():
        raise ConfigError("pack_log_probs: the values are not log-probabilities (NaN or above 0)")
    data = np.maximum(lp, LOG_PROB_FLOOR).astype(np.float16)
    out = {"format": FORMAT, "n": int(lp.shape[0]), "classes": int(lp.shape[1]),
           "data": base64.b64encode(zlib.compress(data.tobytes(), 9)).decode("ascii")}
    if labels is not None:
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if y.shape != (lp.shape[0],) or (y.size and (y.min() < 0 or y.max() >= min(lp.shape[1], 256))):
            raise ConfigError(f"pack_log_probs: labels of shape {y.shape} are not one class index (< 256) per image")
        out["labels"] = base64.b64encode(zlib.compress(y.astype(np.uint8).tobytes(), 9)).decode("ascii")
    return out


def unpack_log_probs(stored: dict[str, Any]) -> np.ndarray:
    """The ``(N, C)`` float32 log-probabilities :func:`pack_log_probs` stored."""
    if stored.get("format") != FORMAT:
        raise ConfigError(f"stored log-probabilities have format {stored.get('format')!r}; this library reads {FORMAT}")
    n, c = int(stored["n"]), int(stored["classes"])
    raw = np.frombuffer(zlib.decompress(base64.b64decode(stored["data"])), dtype=np.float16)
    if raw.size != n * c:
        raise ConfigError(f"stored log-probabilities hold {raw.size} values; {n} x {c} expected")
    return raw.reshape(n, c).astype(np.float32)


def unpack_labels(stored: dict[str, Any]) -> np.ndarray:
    """The true labels :func:`pack_log_probs` stored (``int64``); :class:`ConfigError` if none were."""
    if not stored.get("labels"):
        raise ConfigError("the stored log-probabilities carry no labels")
    y = np.frombuffer(zlib.decompress(base64.b64decode(stored["labels"])), dtype=np.uint8).astype(np.int64)
    if y.size != int(stored["n"]):
        raise ConfigError(f"stored labels hold {y.size} values; {stored['n']} expected")
    return y


@torch.no_grad()
def collect_log_probs(model: torch.nn.Module, loader: Any, *, autocast: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(log-probabilities (N, C), labels (N,))`` of ``model`` in eval mode over ``loader`` (loader order).

    The log-softmax of the model's output: for an ordinary model its logits' log-softmax, for an E³ model (whose eval
    output already is the ensemble's log-probabilities) the same values.
    """
    from contextlib import nullcontext

    was_training = model.training
    model.eval()
    out, labels_all = [], []
    try:
        for images, labels in loader:
            with (autocast() if autocast is not None else nullcontext()):
                logits = model(images)
            out.append(F.log_softmax(logits.float(), dim=-1).cpu())
            labels_all.append(labels.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy(), torch.cat(labels_all).numpy()


def _check_labels(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lp, y = np.asarray(log_probs, dtype=np.float64), np.asarray(labels)
    if lp.ndim != 2 or y.shape != (lp.shape[0],):
        raise ConfigError(f"log_probs {lp.shape} and labels {y.shape} must be (N, C) and (N,)")
    if y.size and (y.min() < 0 or y.max() >= lp.shape[1]):
        raise ConfigError(f"labels must be class indices in [0, {lp.shape[1] - 1}]; got {y.min()}..{y.max()}")
    return lp, y.astype(np.int64)


def nll_per_image(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``-log p(true class)`` of each image (nats)."""
    lp, y = _check_labels(log_probs, labels)
    return -lp[np.arange(y.size), y]


def confidence_correct(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)`` per image: the top class's probability (float32) and whether it is the true class.

    The exponential is taken in float64 and rounded to float32: numpy's float32 ``exp`` differs in the last bit
    between CPUs (its SIMD kernels are chosen by the CPU's instruction sets), which made stored ECE values differ in
    their last digits from machine to machine; a float64 result rounded to float32 is the same on every CPU (but
    for a float64 error straddling a float32 rounding boundary, about one value in a billion)."""
    lp, y = _check_labels(log_probs, labels)
    return np.exp(lp.max(axis=1).astype(np.float64)).astype(np.float32), lp.argmax(axis=1) == y


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ConfigError(f"bins={bins!r} is invalid; it must be a positive integer (equal-width confidence bins)")
    # bin b holds confidences in (b / bins, (b + 1) / bins]; confidence 0 goes to bin 0
    return np.clip(np.ceil(np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64) - 1, 0, bins - 1)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (a fraction; see the module docstring) of images with these confidences and outcomes."""
    conf, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if conf.shape != right.shape or conf.ndim != 1 or conf.size == 0:
        raise ConfigError(f"confidence {conf.shape} and correct {right.shape} must be equally long non-empty vectors")
    b = _bin_of(conf, bins)
    gap = np.bincount(b, weights=right, minlength=bins) - np.bincount(b, weights=conf, minlength=bins)
    return float(np.abs(gap).sum() / conf.size)


def ece_resampled(confidence: np.ndarray, correct: np.ndarray, index: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """ECE of many resampled image sets at once: ``index`` ``(R, n)`` rows of image indices; returns ``(R,)``."""
    conf, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    idx = np.asarray(index)
    R, n = idx.shape
    keys = (_bin_of(conf, bins)[idx] + bins * np.arange(R)[:, None]).ravel()
    gap = np.bincount(keys, weights=right[idx].ravel(), minlength=R * bins) \
        - np.bincount(keys, weights=conf[idx].ravel(), minlength=R * bins)
    return np.abs(gap.reshape(R, bins)).sum(axis=1) / n


def reliability_table(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: its range, image count, mean confidence and accuracy (empty bins have NaN means)."""
    conf, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    b = _bin_of(conf, bins)
    n = np.bincount(b, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=bins) / n
        acc = np.bincount(b, weights=right, minlength=bins) / n
    edges = np.arange(bins + 1) / bins
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "images": n, "confidence": mean_conf, "accuracy": acc})


def ensemble_log_probs(members: Sequence[np.ndarray]) -> np.ndarray:
    """Log of the mean of the members' probabilities (a deep ensemble's prediction), from their ``(N, C)``
    log-probabilities."""
    if not members:
        raise ConfigError("ensemble_log_probs needs at least one member")
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in members])
    top = stack.max(axis=0)
    return (top + np.log(np.exp(stack - top).mean(axis=0))).astype(np.float32)
