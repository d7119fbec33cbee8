"""Registry-wide tests of the dense small-image backbones (timm registration, forward, backward)."""

from __future__ import annotations

import pytest
import timm
import torch

import vmoe_lib
from helpers_foundation import single_torch_thread
from vmoe_lib.errors import ConfigError
from vmoe_lib.models import DENSE_CONVNEXT_SIZES, DENSE_VIT_SIZES, dense_model_names

NAMES = dense_model_names()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_torch_thread():
        yield


def _input_size(name: str) -> int:
    """28 for the Fashion-MNIST ViTs (``*_28``), 32 for ConvNeXt and the CIFAR ViTs (``*_32``)."""
    return 28 if name.endswith("_28") else 32


def test_registry_lists_every_size():
    assert NAMES == sorted([*DENSE_VIT_SIZES, *DENSE_CONVNEXT_SIZES]) and len(NAMES) == 9
    assert all(name.endswith(("_28", "_32")) for name in NAMES)
    assert set(NAMES) <= set(timm.list_models()) and set(NAMES) <= set(vmoe_lib.list_models())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("factory", ["timm", "vmoe_lib"])
def test_forward_and_backward(name, factory):
    torch.manual_seed(0)
    create = timm.create_model if factory == "timm" else vmoe_lib.create_model
    model = create(name)
    size = _input_size(name)
    x = torch.randn(3, 1, size, size)
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["vit_test_patch7_28", "vit_nano_patch4_32", "convnext_test_32"])
def test_channels_and_classes_are_arguments(name):
    # What the training engine passes for CIFAR-100: 3 channels, 100 classes.
    size = _input_size(name)
    model = vmoe_lib.create_model(name, in_chans=3, num_classes=100)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 100)


def test_sizes_are_the_documented_ones():
    vit = vmoe_lib.create_model("vit_pico_patch7_28")
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (64, 4, 4)
    assert vit.patch_embed.num_patches == 16  # (28 / 7)^2
    cifar = vmoe_lib.create_model("vit_nano_patch4_32")
    assert cifar.patch_embed.num_patches == 64  # (32 / 4)^2
    convnext = vmoe_lib.create_model("convnext_test_32", img_size=32)  # img_size accepted and ignored
    assert [len(stage.blocks) for stage in convnext.stages] == [1, 1, 1, 1]
    assert convnext.num_features == 64


def test_same_seed_same_weights():
    torch.manual_seed(1)
    a = vmoe_lib.create_model("vit_test_patch7_28")
    torch.manual_seed(1)
    b = vmoe_lib.create_model("vit_test_patch7_28")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        vmoe_lib.create_model("nope")
    message = str(err.value)
    assert "model='nope'" in message
    for name in NAMES:
        assert repr(name) in message


@pytest.mark.parametrize("name", ["vit_test_patch7_28", "convnext_test_32"])
def test_pretrained_weights_do_not_exist(name):
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(ValueError, match="pretrained"):
        vmoe_lib.create_model(name, pretrained=True)
