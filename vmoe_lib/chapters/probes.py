"""Post-training measurements chapters store in their run records (``record["extra"]``).

A probe is called by the training engine right after training, with ``(model, data, device)``
(``extra_eval`` of :func:`vmoe_lib.results.load_or_run`). What it returns is stored in the run's
record, so a chapter renders its routing tables and figures without the weights or the dataset.
Its :meth:`settings` enter the results key: changing a probe re-makes the runs it measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data import BatchLoader, ImageDataset
from ..analysis import class_expert_information
from ..errors import check_choice
from ..layers.stats import moe_layers, record_routing
from ..predictions import pack_bits
from ..train import _autocast

__all__ = ["eval_loader", "recorded_eval", "routing_record", "RoutingStatsProbe", "ConfusionProbe", "LayerAnalysisProbe",
           "CalibrationProbe",
           "layer_specialisation"]


def eval_loader(data: ImageDataset, device: torch.device, images: int | None = None,
                batch_size: int = 1000, split: str = "test") -> BatchLoader:
    """The ``split`` (default the test split; its first ``images`` images, ``None``: all), normalised as in
    training."""
    x, y = data.split(split)
    if images is not None:
        x, y = x[:images], y[:images]
    return BatchLoader(x, y, batch_size=batch_size, mean=data.mean, std=data.std, device=device)


def recorded_eval(model: nn.Module, loader: BatchLoader, num_classes: int | None, bits: bool = False,
                  experts_per_image: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Evaluate ``model`` on ``loader`` while recording every MoE layer's routing.

    Returns ``(metrics, routing)``: ``metrics`` holds the loss and accuracy (and, with ``bits``, which
    images were right, packed); ``routing`` is :meth:`~vmoe_lib.layers.stats.RoutingRecorder.summary`
    (per layer: expert load, dropped fraction, experts per token, gate entropy and, with
    ``num_classes``, the class x expert table; with ``experts_per_image``, the distinct experts per image).
    """
    model.eval()
    hits = []
    with torch.no_grad(), record_routing(model, num_classes, experts_per_image) as rec:
        loss_sum, count = 0.0, 0
        for images, labels in loader:
            rec.labels = labels
            with _autocast(images.device, True):
                logits = model(images).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            hits.append((logits.argmax(-1) == labels).cpu())
            count += labels.numel()
    right = torch.cat(hits)
    metrics: dict[str, Any] = {"loss": loss_sum / count, "accuracy": right.sum().item() / count}
    if bits:
        metrics["correct"] = pack_bits(right.numpy())["bits"]
    return metrics, rec.summary()


def routing_record(model: nn.Module, data: ImageDataset, device: torch.device, images: int | None = None,
                   experts_per_image: bool = False) -> tuple[BatchLoader, dict[str, Any]] | None:
    """What every routing probe stores first: ``(loader, {"probe": {"images", "loss", "accuracy"}, "routing": ...})``
    over the first ``images`` test images at the model's trained settings; ``None`` for a model without MoE layers."""
    if not moe_layers(model):
        return None
    loader = eval_loader(data, device, images)
    metrics, stats = recorded_eval(model, loader, data.num_classes, experts_per_image=experts_per_image)
    return loader, {"probe": {"images": loader.images.shape[0], **metrics}, "routing": stats}


@dataclass(frozen=True)
class RoutingStatsProbe:
    """Per-layer routing statistics of an MoE model over the test images.

    Stores ``{"probe": {"images", "loss", "accuracy"}, "routing": {layer: stats}}`` at the model's trained
    routing settings (see :func:`recorded_eval`) and, for each inference capacity factor of
    ``capacity_factors``, ``"routing_at_capacity": {"<cf>": {"accuracy", "loss", "routing"}}``: the same
    test images with the experts' capacity set to that factor. A model evaluated with capacity factor ``E``
    drops no token, so the tokens its capacity drops *in training* are seen only at the training factor.
    A dense model gets ``{}``.

    Args:
        probe_images: evaluate on the first ``n`` test images (``None``: all).
        capacity_factors: extra inference capacity factors to measure the routing at (e.g. ``(1.0,)``, the
            training capacity factor of the book's test bed). Only for routers with a capacity factor.
        experts_per_image: also store each layer's ``mean_experts_per_image`` (distinct experts an image's tokens
            reach), from which a chapter counts the parameters one image activates.
    """

    probe_images: int | None = None
    capacity_factors: tuple[float, ...] = ()
    experts_per_image: bool = False

    def settings(self) -> dict[str, Any]:
        """The probe's settings as JSON values (they enter the results key)."""
        d = asdict(self)
        if not d["capacity_factors"]:
            d.pop("capacity_factors")  # the key of probes made before the field existed
        else:
            d["capacity_factors"] = [float(cf) for cf in d["capacity_factors"]]
        if not d["experts_per_image"]:
            d.pop("experts_per_image")  # likewise
        return {"routing_stats": d}

    def __call__(self, model: nn.Module, data: ImageDataset, device: torch.device) -> dict[str, Any]:
        from ..models.moe_utils import set_routing

        first = routing_record(model, data, device, self.probe_images, self.experts_per_image)
        if first is None:
            return {}
        loader, out = first
        if self.capacity_factors:
            routers = [layer.router for _, layer in moe_layers(model) if layer.router is not None]
            original = [r.eval_capacity_factor for r in routers]
            at: dict[str, Any] = {}
            try:
                for cf in self.capacity_factors:
                    set_routing(model, eval_capacity_factor=float(cf))
                    m, st = recorded_eval(model, loader, None)
                    at[f"{float(cf):g}"] = {**m, "routing": st}
            finally:
                for r, cf in zip(routers, original):
                    r.eval_capacity_factor = cf
            out["routing_at_capacity"] = at
        return out


@dataclass(frozen=True)
class ConfusionProbe:
    """The confusion matrix of a trained model on held-out images: what Mobile V-MoE clusters into super-classes.

    Stores ``{"confusion": {"split", "images", "accuracy", "matrix", "class_names"}}``: ``matrix[i][j]`` counts the
    ``split``'s images of class ``i`` predicted as ``j``, over all its images (the validation split by default: the
    test split stays unseen by every choice a chapter makes). Where the dataset has coarse labels (CIFAR-100's 20),
    also ``"coarse_of_class"``: each class's coarse label, read from the training split (every image of a class has
    the same one).

    Args:
        split: ``"val"`` (default) or ``"test"``.
    """

    split: str = "val"

    def __post_init__(self) -> None:
        check_choice("split", self.split, ("val", "test"))

    def settings(self) -> dict[str, Any]:
        """The probe's settings as JSON values (they enter the results key)."""
        return {"confusion": asdict(self)}

    def __call__(self, model: nn.Module, data: ImageDataset, device: torch.device) -> dict[str, Any]:
        loader = eval_loader(data, device, split=self.split)
        n = data.num_classes
        matrix = torch.zeros(n, n, dtype=torch.long)
        model.eval()
        with torch.no_grad():
            for images, labels in loader:
                with _autocast(images.device, True):
                    predicted = model(images).float().argmax(-1)
                matrix += torch.bincount(labels.cpu() * n + predicted.cpu(), minlength=n * n).view(n, n)
        out: dict[str, Any] = {"confusion": {
            "split": self.split, "images": int(matrix.sum()), "accuracy": float(matrix.diag().sum() / matrix.sum()),
            "matrix": matrix.tolist(), "class_names": list(data.class_names)}}
        coarse = data.extra_labels.get("coarse") if data.extra_labels else None
        if coarse is not None:
            _, fine = data.split("train")
            table = torch.full((n,), -1, dtype=torch.long)
            table[fine.cpu()] = coarse["train"].cpu()
            out["coarse_of_class"] = table.tolist()
        return out


def layer_specialisation(routing: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per MoE layer of a routing summary (:func:`recorded_eval` with classes): how much the expert a token goes to
    tells about its image's class, :func:`~vmoe_lib.analysis.class_expert_information` of the layer's class x expert
    table, each class weighted by its share of the layer's token-expert pairs (the split's own class balance)."""
    out = {}
    for name, st in routing.items():
        counts = np.asarray(st.get("class_assignments") or [], dtype=float)
        weights = counts / counts.sum() if counts.size and counts.sum() > 0 else None
        out[name] = class_expert_information(st["class_expert"], weights)
    return out


@dataclass(frozen=True)
class LayerAnalysisProbe:
    """ViMoE's routing analysis of a trained MoE model, and what each of its MoE layers carries.

    Stores what :class:`RoutingStatsProbe` stores (test split, per-layer routing statistics and class x expert tables)
    and ``"layer_analysis"``:

    * ``"specialisation"``: per MoE layer (by name: ``{"layer", "value"}``), :func:`layer_specialisation` on the
      **validation** split (the test split stays unseen by the ranking);
    * ``"ranking"``: the layers from least to most specialised (ties: the earlier block first);
    * ``"bypass"``: test accuracy with MoE layers bypassed at inference (:func:`~vmoe_lib.models.moe_utils.bypass_moe`,
      ``keep_shared=True``: a layer with a shared expert keeps it, i.e. is made dense again; one without outputs
      zeros): ``"all"`` (every MoE layer), ``"least"`` / ``"most"`` (the ``n // 2`` least / most specialised of the
      ``n`` MoE layers; absent for ``n < 2``) with which test images were right (packed bits), and ``"layer:<i>"`` for
      each block ``i`` alone (accuracy only);
    * ``"class_names"``: the dataset's class names (the rows of the class x expert tables).

    Args:
        probe_images: use the first ``n`` images of each split (``None``: all).
    """

    probe_images: int | None = None

    def settings(self) -> dict[str, Any]:
        """The probe's settings as JSON values (they enter the results key)."""
        return {"layer_analysis": asdict(self)}

    def __call__(self, model: nn.Module, data: ImageDataset, device: torch.device) -> dict[str, Any]:
        from ..models.moe_utils import bypass_moe

        first = routing_record(model, data, device, self.probe_images)
        if first is None:
            return {}
        loader, out = first
        _, val_routing = recorded_eval(model, eval_loader(data, device, self.probe_images, split="val"), data.num_classes)
        value = layer_specialisation(val_routing)
        index = {name: int(layer.layer_index) for name, layer in moe_layers(model)}
        ranking = sorted(value, key=lambda name: (value[name], index[name]))
        half = len(ranking) // 2
        sets: dict[str, tuple[list[str], bool]] = {"all": (ranking, True)}
        if half:
            sets["least"] = (ranking[:half], True)
            sets["most"] = (ranking[-half:], True)
        sets.update({f"layer:{index[name]}": ([name], False) for name in sorted(ranking, key=index.get)})
        bypass = {}
        for key, (names, bits) in sets.items():
            with bypass_moe(model, names, keep_shared=True):
                metrics, _ = recorded_eval(model, loader, None, bits=bits)
            bypass[key] = {"layers": sorted(index[n] for n in names), **metrics}
        out["layer_analysis"] = {
            "split": "val", "specialisation": {name: {"layer": index[name], "value": value[name]} for name in ranking},
            "ranking": [index[name] for name in ranking], "bypass": bypass, "class_names": list(data.class_names)}
        return out


@dataclass(frozen=True)
class CalibrationProbe:
    """What ensembles and calibration are judged on: every test image's log-probabilities, and for an E³ model its
    members'.

    Stores ``{"calibration": {...}}`` with (test split, eval mode):

    * ``"log_probs"``: each image's log-probabilities over the classes (:func:`~vmoe_lib.calibration.pack_log_probs`:
      float16, compressed), from which a chapter computes NLL, calibration and deep ensembles of several runs;
    * ``"accuracy"``, ``"nll"`` (nats) and ``"ece"`` (:data:`~vmoe_lib.calibration.ECE_BINS` equal-width bins), ``"bins"``;
    * for an E³ model, ``"members"``: each member's ``accuracy``, ``nll`` and ``ece`` on its own, and
      ``"disagreement"``: the share of images whose members predict different classes.

    and, for an MoE model, what :func:`routing_record` stores (per-layer routing statistics on the test split).

    Args:
        probe_images: the first ``n`` test images (``None``: all).
    """

    probe_images: int | None = None

    def settings(self) -> dict[str, Any]:
        """The probe's settings as JSON values (they enter the results key)."""
        return {"calibration": asdict(self)}

    def __call__(self, model: nn.Module, data: ImageDataset, device: torch.device) -> dict[str, Any]:
        from ..calibration import (ECE_BINS, collect_log_probs, confidence_correct, expected_calibration_error,
                                   nll_per_image, pack_log_probs)
        from ..models.ensemble import ensemble_size, member_log_probs

        def summary(lp: np.ndarray, y: np.ndarray) -> dict[str, float]:
            conf, right = confidence_correct(lp, y)
            return {"accuracy": float(right.mean()), "nll": float(nll_per_image(lp, y).mean()),
                    "ece": expected_calibration_error(conf, right, ECE_BINS)}

        first = routing_record(model, data, device, self.probe_images)
        out: dict[str, Any] = first[1] if first is not None else {}
        loader = eval_loader(data, device, self.probe_images)
        log_probs, labels = collect_log_probs(model, loader, autocast=lambda: _autocast(device, True))
        calibration: dict[str, Any] = {"split": "test", "bins": ECE_BINS, **summary(log_probs, labels),
                                       "log_probs": pack_log_probs(log_probs, labels)}
        if ensemble_size(model) > 1:
            members = []
            model.eval()
            for images, _ in loader:
                with _autocast(images.device, True):
                    members.append(member_log_probs(model, images).cpu())
            per_member = torch.cat(members, dim=1).numpy()  # (M, N, C)
            calibration["members"] = [summary(lp, labels) for lp in per_member]
            votes = per_member.argmax(-1)
            calibration["disagreement"] = float((votes != votes[0]).any(axis=0).mean())
        out["calibration"] = calibration
        return out
