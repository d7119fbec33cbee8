"""Efficient ensembles of experts (E³, Allingham et al., "Sparse MoEs meet Efficient Ensembles", TMLR 2022,
arXiv:2110.03360) on the ``vmoe_*`` models: ``timm.create_model("vmoe_vit_pico_patch7_28", ensemble_size=2, ...)``.

What ``ensemble_size=M`` (``M >= 2``) changes, as the reference (google-research/vmoe ``vit_moe_ensemble.py``,
``ensemble_routing.py``, ``evaluate/ensemble.py``) does:

* **Tiling.** Just before the first MoE block, each image is repeated ``M`` times: the blocks before it run once, the
  ones from it on run on ``M`` copies of the batch. The copies are member-major (``x.repeat(M, ...)``: copy ``m`` of
  image ``i`` is row ``m * B + i``); the reference repeats image-major, a layout choice with the same result, since
  each member routes only its own copies (next point).
* **Partitioned routing.** Every MoE layer splits its ``E`` experts into ``M`` disjoint sets of ``E / M``; copy ``m``
  routes only within set ``m``, with its own router (:class:`~vmoe_lib.routers.ensemble_routing.EnsembleRouter`;
  ``k`` is per member).
* **Outputs.** In training the model returns the ``M B`` members' logits (member-major): each member gets the ordinary
  cross-entropy with the labels repeated ``M`` times (:func:`ensemble_targets`; the training engine does it). In
  evaluation it returns the ensemble's **log-probabilities** ``log (1/M) sum_m softmax(logits_m)`` of shape ``(B,
  classes)``: their argmax is the ensemble's prediction and the cross-entropy of them is the ensemble's negative
  log-likelihood (a softmax of them gives back the mean probabilities). :func:`member_log_probs` gives each member's.

FLOPs and activated parameters are per input image: the blocks from the first MoE block on count ``M`` times and each
token of an image uses ``k`` experts in each of the ``M`` members. ``forward_features`` / ``forward_head`` are timm's
(no tiling or combining happens outside ``forward``), so ``features_only=True`` is refused with an ensemble.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["attach_ensemble", "ensemble_size", "ensemble_targets", "ensemble_log_probs", "member_log_probs",
           "members_apart"]


def _tile(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the first MoE block: its input repeated ``M`` times along the batch (member-major)."""
    x = args[0]
    return (x.repeat(module.ensemble_tile, *([1] * (x.ndim - 1))), *args[1:])


def ensemble_log_probs(logits: torch.Tensor, members: int) -> torch.Tensor:
    """``log (1/M) sum_m softmax(logits_m)`` for member-major ``logits`` of shape ``(M B, C)``: ``(B, C)``, float32."""
    if logits.ndim != 2 or logits.shape[0] % members:
        raise ConfigError(f"ensemble_log_probs: logits of shape {tuple(logits.shape)} are not (M B, C) with M={members}")
    log_p = F.log_softmax(logits.float(), dim=-1).view(members, -1, logits.shape[-1])
    return torch.logsumexp(log_p, dim=0) - math.log(members)


def _combine(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of the model: in eval mode the members' logits become the ensemble's log-probabilities."""
    if module.training or not module.ensemble_combine:
        return out
    return ensemble_log_probs(out, module.ensemble_size)


def attach_ensemble(model: nn.Module, first_moe_block: nn.Module, members: int) -> None:
    """Make ``model`` an E³ model of ``members`` members (its MoE layers already built with ``ensemble_size=members``):
    tile before ``first_moe_block``, combine the members' outputs in eval mode. Sets ``model.ensemble_size``."""
    if not isinstance(members, int) or isinstance(members, bool) or members < 2:
        raise ConfigError(f"attach_ensemble: members={members!r} is invalid; it must be an integer >= 2")
    if getattr(model, "ensemble_size", 1) > 1:
        raise ConfigError("attach_ensemble: the model is already an ensemble")
    first_moe_block.ensemble_tile = members
    first_moe_block.register_forward_pre_hook(_tile)
    model.ensemble_size = members
    model.ensemble_combine = True
    model.register_forward_hook(_combine)


def ensemble_size(model: nn.Module) -> int:
    """``M`` of an E³ model (1 for any other model; DDP/FSDP wrappers are looked through)."""
    inner = getattr(model, "module", model)
    return int(getattr(inner, "ensemble_size", getattr(model, "ensemble_size", 1)))


def ensemble_targets(labels: torch.Tensor, members: int) -> torch.Tensor:
    """The labels of the ``M B`` member-major training outputs of an E³ model: ``labels`` repeated ``M`` times."""
    return labels if members == 1 else labels.repeat(members)


@contextmanager
def members_apart(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block an E³ model in eval mode returns the members' logits ``(M B, C)`` (member-major) instead of
    the ensemble's log-probabilities."""
    if ensemble_size(model) < 2:
        raise ConfigError("members_apart: the model is not an ensemble (ensemble_size < 2)")
    model.ensemble_combine = False
    try:
        yield model
    finally:
        model.ensemble_combine = True


@torch.no_grad()
def member_log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each member's log-probabilities for the images ``x``: ``(M, B, C)`` float32 (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with members_apart(model):
            logits = model(x)
    finally:
        model.train(was_training)
    M = ensemble_size(model)
    return F.log_softmax(logits.float(), dim=-1).view(M, -1, logits.shape[-1])
