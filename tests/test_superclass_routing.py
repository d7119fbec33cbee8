"""Super-class guidance of the per-image router (Mobile V-MoE, Sec. 3): super-classes from a confusion matrix, the
router's class -> super-class map, and the training engine giving it each batch's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmoe_lib.analysis import superclasses_from_confusion
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import collect_aux_loss, set_routing_labels
from vmoe_lib.models import create_model
from vmoe_lib.routers.per_image_routing import PerImageRouter


def _blocks(sizes: list[int], within: float = 30.0, across: float = 1.0, correct: float = 500.0) -> np.ndarray:
    """A confusion matrix whose classes form blocks of ``sizes``: often confused within a block, rarely across."""
    n = sum(sizes)
    block = np.repeat(np.arange(len(sizes)), sizes)
    c = np.where(block[:, None] == block[None, :], within, across)
    np.fill_diagonal(c, correct)
    return c


def test_superclasses_group_the_classes_a_model_confuses():
    # classes 0-2, 3-5 and 6-9 are confused within their block: three super-classes, numbered by first class
    assert superclasses_from_confusion(_blocks([3, 3, 4]), 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    # interleaved blocks: classes {0, 2}, {1, 3}
    c = _blocks([2, 2])[[0, 2, 1, 3]][:, [0, 2, 1, 3]]
    assert superclasses_from_confusion(c, 2) == [0, 1, 0, 1]
    # confusion one way only counts for both classes (rates are symmetrised)
    one_way = np.diag([100.0, 100.0, 100.0, 100.0])
    one_way[0, 3] = 40.0
    one_way[1, 2] = 30.0
    assert superclasses_from_confusion(one_way, 2) == [0, 1, 1, 0]
    assert superclasses_from_confusion(_blocks([3, 3, 4]), 1) == [0] * 10
    assert superclasses_from_confusion(_blocks([3, 3, 4]), 10) == list(range(10))


@pytest.mark.parametrize("confusion, groups, match", [
    ([[1, 2, 3]], 1, "confusion of shape \\(1, 3\\) is invalid"),
    ([[5, -1], [0, 5]], 1, "confusion of shape \\(2, 2\\) is invalid"),
    ([[5, 1], [1, 5]], 3, "groups=3 is invalid; it must be an int from 1 to the 2 classes"),
    ([[5, 1], [1, 5]], 1.5, "groups=1.5 is invalid"),
    ([[5, 1], [0, 0]], 1, "no images for class\\(es\\) \\[1\\]"),
])
def test_superclasses_reject_bad_input(confusion, groups, match):
    with pytest.raises(ConfigError, match=match):
        superclasses_from_confusion(confusion, groups)


def test_the_router_maps_labels_to_superclass_targets():
    router = PerImageRouter(8, 3, superclasses=[0, 0, 1, 2, 2])
    router.set_labels(torch.tensor([4, 0, 2]))
    assert router.superclass_targets.tolist() == [2, 0, 1]
    router.set_labels(None)
    assert router.superclass_targets is None
    with pytest.raises(ConfigError, match="do not fit superclasses of 5 classes"):
        router.set_labels(torch.tensor([5]))
    plain = PerImageRouter(8, 3)
    plain.set_labels(torch.tensor([1]))  # no map: labels are ignored
    assert plain.superclass_targets is None
    for bad in ([0, 3], [0], "01", [0, True], [0, -1]):
        with pytest.raises(ConfigError, match="superclasses=.* is invalid; it must be a list with each class's"):
            PerImageRouter(8, 3, superclasses=bad)


def _guided_model(superclasses):
    torch.manual_seed(0)
    return create_model("vmoe_vit_test_patch7_28", num_classes=4, in_chans=1, num_experts=2, moe_layers="all",
                        router="per_image", router_options={"superclasses": superclasses})


def test_labels_add_the_guidance_loss_only_while_set():
    model = _guided_model([0, 0, 1, 1]).train()
    x, labels = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 0, 2])
    assert set_routing_labels(model, labels) is True
    model(x)
    guided = collect_aux_loss(model)
    assert guided is not None and float(guided.detach()) > 0
    assert set_routing_labels(model, None) is True
    model(x)
    plain = collect_aux_loss(model)
    assert plain is None or float(plain.detach()) < float(guided.detach())
    # a model without a label-routed router reports none
    assert set_routing_labels(create_model("vmoe_vit_test_patch7_28", num_classes=4, in_chans=1), labels) is False


@pytest.mark.usefixtures("one_torch_thread", "hermetic_data")
def test_training_guides_the_router_and_leaves_no_labels_behind(monkeypatch):
    from vmoe_lib.train import TrainConfig, train_model

    seen = []
    original = PerImageRouter.set_labels

    def recording(self, labels):
        seen.append(None if labels is None else labels.tolist())
        original(self, labels)
        assert (self.superclass_targets is None) == (labels is None)

    monkeypatch.setattr(PerImageRouter, "set_labels", recording)

    config = TrainConfig(model="vmoe_vit_test_patch7_28", val_size=50, train_subset=64, eval_subset=60, epochs=1,
                         batch_size=32, augment=False,
                         model_kwargs={"num_experts": 2, "moe_layers": "all", "router": "per_image",
                                       "router_options": {"superclasses": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]}})
    record = train_model(config, seed=0, progress=False)
    assert np.isfinite(record["final"]["test_accuracy"])
    # per step (2 steps of 32 images; the first MoE layer routes, the second reuses its decision): the batch's
    # labels before the forward, cleared after it
    batches = [labels for labels in seen if labels is not None]
    assert len(batches) == 2 and all(len(b) == 32 for b in batches)
    assert seen[-1] is None and seen.count(None) >= len(batches)
    with pytest.raises(ConfigError, match="superclasses=.* is invalid"):
        TrainConfig(model="vmoe_vit_test_patch7_28",
                    model_kwargs={"num_experts": 2, "router": "per_image", "router_options": {"superclasses": [0, 2]}})
