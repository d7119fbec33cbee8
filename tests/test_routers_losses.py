"""Auxiliary losses of vmoe_lib.routers: golden values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

import vmoe_lib.routers as R
from vmoe_lib.errors import ConfigError


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_importance_loss_golden_population_std():
    # One group, S=2, E=2: gates [[.9, .1], [.7, .3]] -> importance = column sums = [1.6, 0.4].
    # mean 1.0, population variance ((.6)^2 + (.6)^2)/2 = 0.36 -> (std/mean)^2 = 0.36.
    # (The unbiased estimator would give 0.72: the pitfall PAPERS.md warns about.)
    gates = torch.tensor([[[0.9, 0.1], [0.7, 0.3]]])
    torch.testing.assert_close(R.importance_loss(gates), torch.tensor(0.36))
    # A second, perfectly balanced group has loss 0; losses are averaged over groups: (0.36 + 0)/2.
    two = torch.cat([gates, torch.full((1, 2, 2), 0.5)])
    torch.testing.assert_close(R.importance_loss(two), torch.tensor(0.18))


def test_load_loss_golden():
    # S=1, E=2, k=1, sigma=1: clean logits [1, 0], noisy logits [1, .5]; threshold = top-1 noisy = 1.
    # p_e = 1 - Phi((1 - logit_e)/1): p_0 = 1 - Phi(0) = .5, p_1 = 1 - Phi(1) = .158655.
    # load = p (mean over one token); for two values (std/mean)^2 = ((a-b)/(a+b))^2 = 0.268578.
    a, b = 0.5, 1 - _phi(1.0)
    expected = ((a - b) / (a + b)) ** 2
    assert abs(expected - 0.268578) < 1e-5
    loss = R.load_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.5]]]), noise_std=1.0, k=1)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_load_loss_golden_k2():
    # S=1, E=3, k=2, sigma=.5: clean [2, 1, 0], noisy [2.1, .8, .9] -> 2nd largest noisy = .9.
    # p_e = 1 - Phi((.9 - clean_e)/.5) = 1 - Phi([-2.2, -.2, 1.8]).
    p = [1 - _phi(z) for z in (-2.2, -0.2, 1.8)]
    mean = sum(p) / 3
    var = sum((v - mean) ** 2 for v in p) / 3  # population variance
    loss = R.load_loss(torch.tensor([[[2.0, 1.0, 0.0]]]), torch.tensor([[[2.1, 0.8, 0.9]]]), noise_std=0.5, k=2)
    torch.testing.assert_close(loss, torch.tensor(var / mean**2))


def test_load_loss_gradient_reaches_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, requires_grad=True)
    noisy = logits + 0.25 * torch.randn(2, 6, 4)
    R.load_loss(logits, noisy, 0.25, 2).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_balance_loss_golden():
    # S=2, E=2. gates [[.9,.1],[.3,.7]]: mean gates P=[.6,.4], top-1 fractions f=[.5,.5];
    # E^2 * mean_e(f_e P_e) = 4 * (.3 + .2)/2 = 1.0 (the balanced value).
    torch.testing.assert_close(R.balance_loss(torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])), torch.tensor(1.0))
    # gates [[.9,.1],[.7,.3]]: P=[.8,.2], f=[1,0] -> 4 * (.8 + 0)/2 = 1.6.
    torch.testing.assert_close(R.balance_loss(torch.tensor([[[0.9, 0.1], [0.7, 0.3]]])), torch.tensor(1.6))


def test_z_loss_golden():
    # logits [0, 0]: logsumexp = ln 2 -> z = (ln 2)^2 = 0.480453; logits [ln 3, 0]: lse = ln 4 -> 1.921812.
    torch.testing.assert_close(R.z_loss(torch.zeros(1, 1, 2)), torch.tensor(math.log(2) ** 2))
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])
    torch.testing.assert_close(R.z_loss(logits), torch.tensor((math.log(2) ** 2 + math.log(4) ** 2) / 2))


def test_superclass_loss_is_cross_entropy():
    # logits [[0, 0]] with target 1: CE = ln 2.
    torch.testing.assert_close(R.superclass_loss(torch.zeros(1, 2), torch.tensor([1])), torch.tensor(math.log(2)))
    with pytest.raises(ConfigError, match="superclass_targets"):
        R.superclass_loss(torch.zeros(3, 2), torch.tensor([1]))


def test_losses_finite_at_extremes():
    torch.manual_seed(0)
    # all-equal gates: importance 0 with a finite gradient (var/mean^2, no sqrt at 0)
    logits = torch.zeros(2, 5, 4, requires_grad=True)
    loss = R.importance_loss(torch.softmax(logits, -1)) + R.balance_loss(torch.softmax(logits, -1))
    loss = loss + R.z_loss(logits) + R.load_loss(logits, logits.detach(), 0.25, 4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # huge logits
    big = (1e4 * torch.randn(2, 5, 4)).requires_grad_()
    total = R.importance_loss(torch.softmax(big, -1)) + R.z_loss(big) + R.load_loss(big, big.detach() + 1, 0.25, 2)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(big.grad).all()
