"""Auxiliary losses that keep routers balanced (and their logits small).

All functions take tensors with leading group axes ``(..., S, E)``, compute
the loss *per group* and return the mean over groups (a scalar), as the
reference does with ``jax.vmap`` over groups (google-research/vmoe
``nn/routing.py``). The MoE model sums these over its MoE layers.

Pitfall avoided: ``torch.std``/``torch.var`` default to the unbiased
estimator; V-MoE uses the population statistic (``correction=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["balance_loss", "importance_loss", "load_loss", "superclass_loss", "z_loss"]


def _check(name: str, tensor: torch.Tensor) -> None:
    if tensor.ndim < 2:
        raise ConfigError(f"{name} must have shape (..., S, E), got shape {tuple(tensor.shape)}")


def _squared_cv(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last axis, population variance: ``(..., E) -> (...)``.

    Computed as var/mean^2 rather than (std/mean)^2 to avoid the undefined
    gradient of ``sqrt`` at 0 when all values are equal (as the reference does).
    """
    return values.var(dim=-1, correction=0) / values.mean(dim=-1).square()


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """V-MoE importance loss (arXiv:2106.05974, App. A.2, Eq. 6-7).

    ``imp_e = sum_s gates[s, e]``; ``L_imp = (std(imp) / mean(imp))^2`` with the
    population std, per group, averaged over groups.

    Args:
        gates: ``(..., S, E)`` softmax gates of the *clean* logits.

    Returns:
        Scalar loss.
    """
    _check("gates", gates)
    importance = gates.float().sum(dim=-2)  # (..., E)
    return _squared_cv(importance).mean()


def load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, k: int) -> torch.Tensor:
    """V-MoE load loss for a noisy top-k router (arXiv:2106.05974, App. A.2, Eq. 8-11).

    For each token the threshold is its ``k``-th largest *noisy* logit; the
    probability that expert ``e`` would still be selected if only its own noise
    were re-sampled is ``p[s, e] = 1 - Phi((threshold[s] - logits[s, e]) / sigma)``.
    ``load_e = mean_s p[s, e]`` and ``L_load = (std(load) / mean(load))^2``.

    Args:
        logits: ``(..., S, E)`` clean router logits.
        noisy_logits: ``(..., S, E)`` the same logits plus ``N(0, sigma^2)`` noise.
        noise_std: ``sigma`` (V-MoE: ``noise_std / E`` with ``noise_std = 1``); must be > 0.
        k: number of selected experts per token.

    Returns:
        Scalar loss.
    """
    _check("logits", logits)
    if noisy_logits.shape != logits.shape:
        raise ConfigError(f"noisy_logits shape {tuple(noisy_logits.shape)} != logits shape {tuple(logits.shape)}")
    if not noise_std > 0:
        raise ConfigError(f"noise_std={noise_std!r}: the load loss needs a noisy router (noise_std > 0)")
    if not 1 <= k <= logits.shape[-1]:
        raise ConfigError(f"k={k!r} must satisfy 1 <= k <= E={logits.shape[-1]}")
    logits, noisy_logits = logits.float(), noisy_logits.float()
    # torch.topk even for k = 1, though max is several times cheaper on a CPU over a short expert axis: a max
    # node changes the order in which autograd sums the logits' gradients, so trained models (and the
    # chapters' records) would no longer be bit-identical (measured: a test-bed record's rerun differed).
    threshold = torch.topk(noisy_logits, k, dim=-1).values[..., -1:]  # (..., S, 1)
    # 1 - Phi(z) == Phi(-z); ndtr(-z) keeps precision when Phi(z) is close to 1.
    prob = torch.special.ndtr((logits - threshold) / noise_std)  # (..., S, E)
    return _squared_cv(prob.mean(dim=-2)).mean()


def balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """GShard / Switch balance loss (arXiv:2006.16668 Alg. 1; arXiv:2101.03961 Eq. 4).

    ``L = E^2 * mean_e(f_e * P_e)`` where ``P_e`` is the mean gate of expert
    ``e`` and ``f_e`` the fraction of tokens whose top-1 (argmax) is ``e``; equal
    to Switch's ``E * sum_e f_e P_e``. It is 1 for a perfectly balanced router.
    Only ``P`` carries gradient.

    Args:
        gates: ``(..., S, E)`` softmax gates (the ones used for dispatch).

    Returns:
        Scalar loss.
    """
    _check("gates", gates)
    gates = gates.float()
    num_experts = gates.shape[-1]
    mean_gates = gates.mean(dim=-2)  # (..., E)
    top1 = F.one_hot(gates.argmax(dim=-1), num_experts).to(gates.dtype).mean(dim=-2)  # (..., E)
    return ((mean_gates * top1).mean(dim=-1) * num_experts**2).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, arXiv:2202.08906 Eq. 5): mean over tokens of ``logsumexp(logits)^2``.

    Args:
        logits: ``(..., S, E)`` router logits.

    Returns:
        Scalar loss (per-group means averaged over groups; groups have equal size).
    """
    _check("logits", logits)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def superclass_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mobile V-MoE super-class guidance (arXiv:2309.04354 Sec. 3): ``CE(router logits, super-class)``.

    Args:
        logits: ``(G, E)`` per-image router logits (one super-class per expert).
        targets: ``(G,)`` super-class index of each image.

    Returns:
        Scalar mean cross-entropy (unweighted; the router multiplies by ``superclass_loss_weight``).
    """
    if logits.ndim != 2:
        raise ConfigError(f"logits must have shape (G, E), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ConfigError(
            f"superclass_targets must have shape (G,) = {tuple(logits.shape[:1])}, got {tuple(targets.shape)}"
        )
    return F.cross_entropy(logits.float(), targets.long())
