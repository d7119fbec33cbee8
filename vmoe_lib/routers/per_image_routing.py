"""Per-image routing (Mobile V-MoE, Daxberger et al., arXiv:2309.04354).

One routing decision per image instead of per token: a router reads a pooled
image representation and sends *all* of the image's tokens to the image's ``k``
chosen experts; Mobile V-MoE shares this decision across the following MoE
layers (that sharing is the MoE layers' job: see ``vmoe_lib.layers.moe.SharedRouting``).

The router can be guided by super-classes (Sec. 3, "semantic super-classes"):
with per-image super-class labels in ``superclass_targets`` (one super-class per
expert), the auxiliary loss adds ``superclass_loss_weight * CE(router logits, super-class)``
(paper: 0.3), which replaces load balancing. Given ``superclasses`` (each class's
super-class), the training engine sets the targets from each batch's labels through
:meth:`PerImageRouter.set_labels` (see :func:`vmoe_lib.layers.set_routing_labels`).

The image representation is, by default, the mean over the image's tokens entering the
leading MoE layer; ``route_from="class_token"`` reads the image's first token instead, which in
a ViT with a class token is that token (the paper's choice: the router reads the class token
after the dense blocks). Choices the paper leaves open, made here and documented: combine weights are the raw softmax gates of the
chosen experts (as V-MoE; ``renormalize=True`` to make them sum to 1); no training
noise by default; balance losses are available but off.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, check_choice, check_positive
from .base import Routing
from .losses import balance_loss, importance_loss, load_loss, superclass_loss, z_loss
from .ops import Setting, axis_index, check_bool_setting, check_int_setting, check_rank3, float32_math, softmax_experts, stable_top_k
from .router import GatedRouter
from .stats import gate_entropy, sparse_routing_metrics

__all__ = ["PerImageRouter", "ROUTE_FROM"]

#: What a per-image router reads: the mean of the image's tokens, or its first token (a ViT's class token).
ROUTE_FROM = ("mean", "class_token")


class PerImageRouter(GatedRouter):
    """Route whole images: ``forward(x: (G, S, D))`` with one group per image.

    Every token ``s`` of image ``g`` goes to each of the image's ``k`` experts, in slot ``s``
    (``capacity = S``); nothing is dropped.

    Args:
        dim: ``D``.
        num_experts: ``E`` (with super-class guidance: the number of super-classes).
        k: experts per image (Mobile V-MoE ablates 1 and 2); changeable after construction.
        renormalize: make the ``k`` combine weights of an image sum to 1.
        superclass_loss_weight: ``lambda`` of the guidance loss (paper: 0.3); used only when
            :attr:`superclass_targets` is set.
        superclasses: each class's super-class (a list of ints in ``[0, E)``, one per class, e.g. from
            :func:`vmoe_lib.analysis.superclasses_from_confusion`); ``None``: no guidance from labels.
        route_from: ``"mean"`` (the mean of the image's tokens) or ``"class_token"`` (its first token: a ViT's
            class token; MoE ViTs without one and ConvNeXts refuse it).
        noise_std, gate, gate_hidden_dim: as :class:`.GatedRouter`.
        importance_loss_weight, load_loss_weight, balance_loss_weight, z_loss_weight: as
            :class:`.GatedRouter`; the balance losses treat the batch of images as one routing group.

    Attributes:
        superclass_targets: ``LongTensor (G,)`` or ``None``; set by the caller before ``forward``.
    """

    name = "per_image"

    renormalize = Setting(check_bool_setting)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        k: int = 1,
        renormalize: bool = False,
        noise_std: float = 0.0,
        gate: str = "linear",
        gate_hidden_dim: int | None = None,
        superclass_loss_weight: float = 0.3,
        superclasses: list[int] | tuple[int, ...] | None = None,
        route_from: str = "mean",
        importance_loss_weight: float = 0.0,
        load_loss_weight: float = 0.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            dim,
            num_experts,
            gate=gate,
            gate_hidden_dim=gate_hidden_dim,
            noise_std=noise_std,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.k = k
        self.renormalize = renormalize
        check_positive("superclass_loss_weight", superclass_loss_weight, allow_zero=True)
        self.superclass_loss_weight = float(superclass_loss_weight)
        self.superclass_targets: torch.Tensor | None = None
        check_choice("route_from", route_from, ROUTE_FROM)
        self.route_from = route_from
        self.superclasses: tuple[int, ...] | None = None
        if superclasses is not None:
            ok = isinstance(superclasses, (list, tuple)) and len(superclasses) >= 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_experts for v in superclasses)
            if not ok:
                raise ConfigError(f"superclasses={superclasses!r} is invalid; it must be a list with each class's "
                                  f"super-class, ints from 0 to {num_experts - 1} (one super-class per expert)")
            self.superclasses = tuple(superclasses)

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Set :attr:`superclass_targets` from a batch's class labels (``LongTensor (G,)``, one image per group)
        through :attr:`superclasses`; ``None`` clears them (evaluation). Without ``superclasses``: nothing."""
        if self.superclasses is None:
            return
        if labels is None:
            self.superclass_targets = None
            return
        table = torch.tensor(self.superclasses, dtype=torch.long, device=labels.device)
        if labels.ndim != 1 or int(labels.min()) < 0 or int(labels.max()) >= len(table):
            raise ConfigError(f"labels of shape {tuple(labels.shape)} with values {int(labels.min())}.."
                              f"{int(labels.max())} do not fit superclasses of {len(table)} classes")
        self.superclass_targets = table[labels]

    @property
    def k(self) -> int:
        """Experts per image (validated: ``1 <= k <= E``)."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = check_int_setting("k", value, low=1, high=self.num_experts)

    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights(), "superclass_loss": self.superclass_loss_weight}

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x: (G, S, D)``, one image per group, from the mean of its tokens or its first token
        (``route_from``)."""
        check_rank3("x", x, self.dim)
        with float32_math(x.device):
            image = x[:, 0].float() if self.route_from == "class_token" else x.float().mean(dim=1)
            routing = self.route_images(image, x.shape[1], dtype=x.dtype)
        return routing

    def route_images(self, image_repr: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> Routing:
        """Route images given their representation ``image_repr: (G, D)``; each has ``group_size`` tokens.

        Lets a backbone route from another representation (e.g. the class token).
        """
        if image_repr.ndim != 2 or image_repr.shape[-1] != self.dim:
            raise ConfigError(f"image_repr must have shape (G, D={self.dim}), got {tuple(image_repr.shape)}")
        check_int_setting("group_size", group_size)
        with float32_math(image_repr.device):
            logits = self.gate(image_repr.float())  # (G, E)
            num_images, num_experts = logits.shape
            k = self.k
            noisy_logits = self.add_noise(logits)
            gates = softmax_experts(noisy_logits)
            top_gates, top_experts = stable_top_k(gates, k)  # (G, K)
            if self.renormalize:
                top_gates = top_gates / top_gates.sum(dim=-1, keepdim=True)
            device = logits.device
            shape = (num_images, group_size, k)
            token = axis_index(shape, 1, device)
            routing = Routing(
                num_groups=num_images,
                group_size=group_size,
                num_experts=num_experts,
                capacity=group_size,
                group_index=axis_index(shape, 0, device),
                token_index=token,
                expert_index=top_experts.unsqueeze(1).expand(shape).reshape(-1),
                slot_index=token,
                combine_weight=top_gates.to(dtype or image_repr.dtype).unsqueeze(1).expand(shape).reshape(-1),
            )
            # Balance losses over the batch of images, seen as one group of G "tokens".
            clean_gates = softmax_experts(logits)
            terms = {
                "importance_loss": lambda: importance_loss(clean_gates[None]),
                "balance_loss": lambda: balance_loss(gates[None]),
                "z_loss": lambda: z_loss(logits[None]),
            }
            if self.is_noisy:
                sigma = self.noise_sigma
                terms["load_loss"] = lambda: load_loss(logits[None], noisy_logits[None], sigma, k)
            targets = self.superclass_targets
            if targets is not None:
                targets = targets.to(device)
                terms["superclass_loss"] = lambda: superclass_loss(logits, targets)

            def statistics() -> dict[str, torch.Tensor]:
                metrics = sparse_routing_metrics(
                    routing.group_index,
                    routing.token_index,
                    routing.expert_index,
                    num_groups=num_images,
                    group_size=group_size,
                    num_experts=num_experts,
                    num_bins=k + 1,
                )
                metrics["gate_entropy"] = gate_entropy(clean_gates)
                if targets is not None:
                    metrics["superclass_accuracy"] = (logits.argmax(-1) == targets).float().mean()
                return metrics

            routing.aux_loss, routing.metrics = self.aux_loss_and_metrics(terms, logits, statistics)
            return routing
