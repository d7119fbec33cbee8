"""What the ``vmoe_*`` models promise timm users, and the few places they cannot.

timm's model contract (what its ``tests/test_models.py`` checks for every model): a registered
pretrained config (``model.pretrained_cfg`` / ``default_cfg``: input size, mean/std, classifier and
first-conv names, number of classes), ``forward_features`` / ``forward_head`` /
``forward_intermediates``, ``reset_classifier``, ``features_only=True`` with ``out_indices``,
``torch.fx`` tracing with timm's leaf modules, and TorchScript.

* :func:`moe_pretrained_cfg` is the config of ``vmoe_<base>``: the input and head fields of the dense
  base (timm's own config for the 224 sizes, :func:`~.dense.dense_input_cfg` for the small-image
  sizes), no weight location (none are published), and the paper.
* :class:`~vmoe_lib.layers.MoEMlp` is registered as a timm leaf module, so timm's fx tracer (and
  ``features_only=True, feature_cls="fx"``) keeps it as one call: routing is data-dependent
  (top-k, capacity, sorting), which symbolic tracing cannot follow.
* :data:`TIMM_CONTRACT_EXCLUSIONS` names each of timm's model tests a ``vmoe_*`` model is excluded
  from, with the reason. ``tests/test_timm_contract.py`` skips exactly these and checks that they
  still fail the way the reason says; ``scripts/timm_suite_conftest.py`` marks them
  ``xfail(strict=True)`` when timm's own suite is run against these models.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from timm.models import get_pretrained_cfg, register_notrace_module

from ..layers.moe import MoEMlp
from .dense import DENSE_CONVNEXT_SIZES, DENSE_VIT_SIZES, dense_input_cfg

__all__ = ["TIMM_CONTRACT_EXCLUSIONS", "TimmContractExclusion", "excluded_from", "moe_pretrained_cfg"]

register_notrace_module(MoEMlp)  # timm's fx tracer treats an MoE layer as one opaque call

# Pretrained-config fields that describe the architecture's input and head (not a weight file).
_INPUT_FIELDS = (
    "input_size", "min_input_size", "fixed_input_size", "pool_size", "crop_pct", "interpolation",
    "mean", "std", "num_classes", "first_conv", "classifier",
)
NO_WEIGHTS_NOTE = (
    "No pretrained weights are published for this model; pretrained=True raises. Train it, or "
    "start from a dense checkpoint with vmoe_lib.models.upcycle_from_dense."
)


def moe_pretrained_cfg(base: str, *, paper_name: str, paper_ids: str) -> dict[str, Any]:
    """The timm pretrained config of ``vmoe_<base>`` (a dict for ``generate_default_cfgs``).

    Input and head fields come from the dense ``base``; there is no ``url`` / ``hf_hub_id``, so
    timm lists the model as having no pretrained weights (``timm.list_pretrained()`` omits it).
    The dense base's test-time fields (``test_input_size``...) describe its published weights
    and are not copied.
    """
    if base in DENSE_VIT_SIZES or base in DENSE_CONVNEXT_SIZES:
        fields = dense_input_cfg(base)
    else:
        dense = get_pretrained_cfg(base).to_dict()
        fields = {key: dense[key] for key in _INPUT_FIELDS if dense.get(key) is not None}
    return dict(
        url="",
        **fields,
        license="apache-2.0",
        paper_name=paper_name,
        paper_ids=paper_ids,
        notes=(NO_WEIGHTS_NOTE, f"Architecture: timm's {base} with MoE layers replacing block MLPs."),
    )


@dataclass(frozen=True)
class TimmContractExclusion:
    """One of timm's model tests (``tests/test_models.py``) that the models matching ``models`` skip."""

    test: str
    models: str  # an fnmatch pattern over model names, as timm's own exclusion lists
    reason: str
    raises: type[Exception]  # how the test fails on these models (an xfail that fails otherwise is a new bug)


_NO_TORCHSCRIPT = (
    "MoEMlp is not TorchScript-compilable: the routers return a Routing dataclass with optional "
    "fields, are chosen from a registry by name, and the dispatch backend is picked at run time "
    "(Python control flow over objects TorchScript cannot type). torch.jit.script raises a clear "
    "error naming MoEMlp. Eager mode and torch.fx (MoEMlp is a timm leaf module) work."
)
TIMM_CONTRACT_EXCLUSIONS: tuple[TimmContractExclusion, ...] = (
    TimmContractExclusion("test_model_forward_torchscript", "vmoe_*", _NO_TORCHSCRIPT, RuntimeError),
    TimmContractExclusion(
        "test_model_forward_fx_torchscript", "vmoe_*",
        "The fx graph keeps MoEMlp as a leaf module, which TorchScript must then compile. " + _NO_TORCHSCRIPT,
        RuntimeError,
    ),
    TimmContractExclusion(
        "test_model_default_cfgs", "vmoe_vit_*",
        "A ViT: forward_features returns tokens (B, N, C) and pool_size is None, so the spatial (NCHW) "
        "checks of this test do not apply. timm sends its own ViTs to test_model_default_cfgs_non_std "
        "through the name pattern 'vit_*' of its NON_STD_FILTERS, which 'vmoe_vit_*' does not match; "
        "tests/test_timm_contract.py applies the non-standard (token output) checks to these models.",
        TypeError,  # pool_size None is indexed
    ),
    TimmContractExclusion(
        "test_model_forward_features", "vmoe_vit_test_patch7_28",
        "The unit-test ViT has 2 blocks, so 2 feature levels; the test requires at least 3 for every "
        "model. Adding a block would change the model of record; features_only works with its 2 levels.",
        AssertionError,
    ),
)


def excluded_from(test: str, model_name: str) -> TimmContractExclusion | None:
    """The exclusion of ``model_name`` from timm's model test ``test``, or ``None``."""
    for exclusion in TIMM_CONTRACT_EXCLUSIONS:
        if exclusion.test == test and fnmatch.fnmatch(model_name, exclusion.models):
            return exclusion
    return None
