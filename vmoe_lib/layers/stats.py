"""Routing statistics: the last forward's, and per-layer records over an evaluation.

Two levels, both read from :class:`~vmoe_lib.layers.moe.MoEMlp` layers:

* :func:`collect_routing_stats` returns what every MoE layer kept from its last
  forward (the router's detached ``metrics`` and what the dispatch processed).
  Free: the router computes these anyway.
* :class:`RoutingRecorder` (or :func:`record_routing`) accumulates, over many
  batches, per layer: the load of each expert, the fraction of tokens dropped,
  a histogram of experts per token, the mean entropy of the tokens' gate
  distributions (when the router reports it) and, given labels, which experts each
  class's tokens go to (ViMoE's routing analysis, arXiv:2410.15732, Sec. 4) and,
  with ``experts_per_image``, how many distinct experts an image's tokens reach
  (the parameters one image activates: Mobile V-MoE, arXiv:2309.04354).
  Layers only do this work while a recorder is attached: when off, the cost is
  one ``is None`` test per layer and forward.

For Soft MoE no token is dropped and every token reaches every expert; its
"load" and class-expert counts are the combine weights (each token's share of
output coming from each expert, summing to 1 per token).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..routers.base import Routing
from .aux import collect_aux_loss
from .moe import MoEMlp

__all__ = ["collect_aux_loss", "collect_routing_stats", "moe_layers", "RoutingRecorder", "record_routing"]


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    """``(name, layer)`` for every :class:`MoEMlp` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMlp)]


def collect_routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per MoE layer: its index, the router's metrics and the dispatch counts of the last forward."""
    stats = {}
    for name, layer in moe_layers(model):
        entry: dict[str, Any] = {"layer": layer.layer_index, "router": layer.router_name, **layer.last_metrics}
        if layer.last_dispatch is not None:
            entry["pairs_processed"] = layer.last_dispatch.pairs
            entry["rows_computed"] = layer.last_dispatch.rows_computed
            entry["backend"] = layer.last_dispatch.backend
        stats[name] = entry
    return stats


class _LayerRecord:
    """Running sums of one layer's routing over the batches seen while recording."""

    def __init__(self, recorder: RoutingRecorder, num_experts: int) -> None:
        self.recorder = recorder
        E = num_experts
        self.num_experts = E
        self.expert_load = torch.zeros(E, dtype=torch.float64)
        self.experts_per_token = torch.zeros(E + 1, dtype=torch.float64)
        self.tokens = 0
        self.dropped = 0
        self.entropy_sum = 0.0  # token-weighted sum of the router's mean gate entropy per forward (nats)
        self.entropy_tokens = 0
        self.class_expert = None if recorder.num_classes is None else torch.zeros(recorder.num_classes, E, dtype=torch.float64)
        self.images = 0
        self.image_expert_pairs = 0  # distinct (image, expert) pairs: summed experts per image

    @torch.no_grad()
    def update(self, routing: Routing, images_per_group: int, tokens_per_image: int, copies: int = 1) -> None:
        """Add one forward's routing. ``copies``: an E³ layer routes ``copies`` member-major copies of the batch
        (copy ``m`` of image ``i`` is image ``m * B + i``), so each label is used for every copy."""
        routing = routing.compact()  # a static routing's dropped choices are not assignments
        E = self.num_experts
        G, S = routing.num_groups, routing.group_size
        labels = self.recorder.labels
        if labels is not None and self.class_expert is not None:
            labels = labels.to("cpu").long()
            if copies > 1:
                labels = labels.repeat(copies)
            if labels.numel() != G * images_per_group:
                raise ValueError(f"recorder labels hold {labels.numel()} images; the layer saw {G * images_per_group}")
        self.tokens += G * S
        entropy = routing.metrics.get("gate_entropy") if routing.metrics else None
        if entropy is not None:
            self.entropy_sum += float(entropy) * G * S
            self.entropy_tokens += G * S
        if routing.is_sparse:
            token = (routing.group_index * S + routing.token_index).cpu()
            expert = routing.expert_index.cpu()
            per_token = torch.bincount(token, minlength=G * S)
            self.experts_per_token += torch.bincount(per_token.clamp(max=E), minlength=E + 1).double()
            self.dropped += int((per_token == 0).sum())
            self.expert_load += torch.bincount(expert, minlength=E).double()
            with_labels = labels is not None and self.class_expert is not None
            if self.recorder.experts_per_image or with_labels:  # the image of each (token, expert) pair
                image = routing.group_index.cpu() * images_per_group + routing.token_index.cpu() // tokens_per_image
            if self.recorder.experts_per_image:
                self.images += G * images_per_group
                self.image_expert_pairs += int(torch.unique(image * E + expert).numel())
            if with_labels:
                self.class_expert.index_put_((labels[image], expert), torch.ones(expert.numel(), dtype=torch.float64), accumulate=True)
        else:
            share = routing.combine_dense.detach().sum(-1).double().cpu()  # (G, S, E)
            self.experts_per_token[E] += G * S
            self.expert_load += share.sum((0, 1))
            if labels is not None and self.class_expert is not None:
                per_image = share.view(G * images_per_group, tokens_per_image, E).sum(1)
                self.class_expert.index_add_(0, labels, per_image)

    def summary(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        load = self.expert_load
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "expert_load": (load / load.sum().clamp(min=1e-12)).tolist(),
            "dropped_fraction": self.dropped / tokens,
            "experts_per_token_hist": (self.experts_per_token / tokens).tolist(),
            "mean_experts_per_token": float((self.experts_per_token * torch.arange(self.num_experts + 1)).sum() / tokens),
        }
        if self.entropy_tokens:
            # Mean entropy (nats) of a token's gate distribution over the E experts: log(E) is uniform, 0 one-hot.
            out["gate_entropy"] = self.entropy_sum / self.entropy_tokens
        if self.images:
            # Distinct experts an image's tokens reach in this layer (dropped tokens reach none).
            out["mean_experts_per_image"] = self.image_expert_pairs / self.images
        if self.class_expert is not None:
            rows = self.class_expert.sum(1, keepdim=True).clamp(min=1e-12)
            out["class_expert"] = (self.class_expert / rows).tolist()  # row c: where class c's tokens go
            out["class_assignments"] = self.class_expert.sum(1).tolist()  # token-expert pairs of each class
        return out


class RoutingRecorder:
    """Accumulates per-layer routing statistics while active (a context manager).

    Example::

        with RoutingRecorder(model, num_classes=10) as rec:
            for images, labels in loader:
                rec.labels = labels   # optional: enables the class x expert table
                model(images)
        table = rec.summary()         # {layer name: {...}}

    ``experts_per_image=True`` adds ``mean_experts_per_image`` to each sparse layer's summary: the mean number of
    distinct experts an image's tokens reach (1 for per-image routing with k = 1; up to ``E`` for per-token routing).
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None, experts_per_image: bool = False) -> None:
        self.model = model
        self.num_classes = num_classes
        self.experts_per_image = bool(experts_per_image)
        self.labels: torch.Tensor | None = None
        self.records: dict[str, _LayerRecord] = {}
        self._layers = moe_layers(model)

    def __enter__(self) -> RoutingRecorder:
        for name, layer in self._layers:
            self.records.setdefault(name, _LayerRecord(self, layer.num_experts))
            layer._recorder = self.records[name]
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, layer in self._layers:
            layer._recorder = None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per layer: normalised expert load, dropped fraction, experts-per-token histogram, gate entropy, class x expert."""
        layer_index = {name: layer.layer_index for name, layer in self._layers}
        return {name: {"layer": layer_index[name], **rec.summary()} for name, rec in self.records.items()}


def record_routing(model: nn.Module, num_classes: int | None = None, experts_per_image: bool = False) -> RoutingRecorder:
    """Shorthand for :class:`RoutingRecorder` (``with record_routing(model, 10) as rec: ...``)."""
    return RoutingRecorder(model, num_classes, experts_per_image)
