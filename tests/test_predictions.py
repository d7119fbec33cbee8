"""Per-image predictions stored in a run's record, and the MoE bypass behind the positive control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import vmoe_lib  # noqa: F401  (registers the models)
from vmoe_lib.data import BatchLoader
from vmoe_lib.errors import ConfigError
from vmoe_lib.models.moe_utils import bypass_moe
from vmoe_lib.predictions import collect_predictions, pack_bits, pack_predictions, unpack_bits, unpack_predictions


def test_round_trip_and_size():
    rng = np.random.default_rng(0)
    n = 10_000
    pred, labels = rng.integers(0, 10, n), rng.integers(0, 10, n)
    p_true = rng.random(n).astype(np.float32)
    stored = pack_predictions(pred, labels, p_true)
    text = json.dumps(stored)
    assert len(text) <= 50_000  # the budget per run for 10,000 test images
    back = unpack_predictions(json.loads(text))
    assert (back.pred == pred).all() and (back.correct == (pred == labels)).all()
    assert np.allclose(back.p_true, p_true, atol=1e-3)  # float16
    assert back.accuracy == pytest.approx((pred == labels).mean())


def test_bits_round_trip_any_length():
    for n in (1, 7, 8, 9, 1001):
        flags = np.random.default_rng(n).random(n) < 0.5
        assert (unpack_bits(pack_bits(flags)) == flags).all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="one value per image"):
        pack_predictions(np.array([1, 2]), np.array([1]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="0..255"):
        pack_predictions(np.array([300]), np.array([1]), np.array([0.5]))
    with pytest.raises(ValueError, match="format"):
        unpack_predictions({"format": 99})


def _loader(n=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return BatchLoader(images, labels, batch_size=8, mean=(0.5,), std=(0.25,), device=torch.device("cpu"))


def test_collect_predictions_matches_the_model():
    torch.manual_seed(0)
    model = timm.create_model("vit_test_patch7_28", num_classes=10, in_chans=1)
    loader = _loader()
    pred, labels, p_true = collect_predictions(model, loader)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    probs = logits.softmax(-1)
    assert (pred == logits.argmax(-1).numpy()).all()
    assert np.allclose(p_true, probs[torch.arange(len(labels)), torch.as_tensor(labels)].numpy())


def test_bypass_moe_puts_every_token_on_the_residual():
    torch.manual_seed(0)
    model = timm.create_model("vmoe_vit_test_patch7_28", num_classes=10, in_chans=1, num_experts=4, k=1, moe_layers="all")
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        normal = model(x)
        with bypass_moe(model):
            bypassed = model(x)
        again = model(x)
    # the same model with each MoE layer's output forced to zero by hand
    hooks = [m.register_forward_hook(lambda mod, a, out: out * 0) for _, m in vmoe_lib.layers.stats.moe_layers(model)]
    with torch.no_grad():
        by_hand = model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(bypassed, by_hand)
    assert not torch.allclose(normal, bypassed)
    assert torch.equal(normal, again)  # the hooks are gone after the block


def test_bypass_moe_rejects_a_dense_model():
    with pytest.raises(ConfigError, match="no MoE layers"):
        with bypass_moe(timm.create_model("vit_test_patch7_28", num_classes=10, in_chans=1)):
            pass
