"""timm's model contract for every registered ``vmoe_*`` model (issue #15).

The checks of timm's own ``tests/test_models.py``, written against timm's public API and run on
tiny inputs: build from the registry, forward/backward, the registered pretrained config,
``forward_features`` / ``forward_head`` / ``forward_intermediates``, ``reset_classifier``,
``features_only`` with ``out_indices``, ``torch.fx`` tracing with timm's leaf modules, and
TorchScript. A check a model is excluded from (``TIMM_CONTRACT_EXCLUSIONS``, each with its reason)
is asserted to still fail the way the reason says, so an exclusion cannot outlive its cause.

Tiny inputs: the small-image models at their own size (28 or 32 pixels); the 224 ViTs built with
``img_size=32`` (2x2 patches) and the 224 ConvNeXts fed 32x32 images (size-agnostic), so the
ImageNet-size models cost their build time only.
"""

from __future__ import annotations

import fnmatch

import pytest
import timm
import torch
import torch.fx
from timm.models import get_notrace_functions, get_notrace_modules, get_pretrained_cfg

import vmoe_lib  # noqa: F401  (registers the models)
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import MoEMlp
from vmoe_lib.models import moe_convnext_from_dense, moe_convnext_model_names, moe_vit_from_dense, moe_vit_model_names
from vmoe_lib.models.dense import DENSE_CONVNEXT_SIZES, DENSE_VIT_SIZES
from vmoe_lib.models.timm_contract import TIMM_CONTRACT_EXCLUSIONS, excluded_from

NAMES = timm.list_models("vmoe_*")
TIMM_MODEL_TESTS = (  # the tests of timm's tests/test_models.py an exclusion may name
    "test_model_forward", "test_model_backward", "test_model_default_cfgs", "test_model_default_cfgs_non_std",
    "test_model_forward_torchscript", "test_model_forward_features", "test_model_forward_intermediates_features",
    "test_model_forward_intermediates", "test_model_forward_fx", "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
)
BATCH = 2


def _is_vit(name: str) -> bool:
    return name.startswith("vmoe_vit_")


def _tiny(name: str) -> tuple[dict, tuple[int, int, int]]:
    """Model kwargs and input size ``(C, H, W)`` of the tiny-input build of ``name``."""
    base = name.removeprefix("vmoe_")
    if base in DENSE_VIT_SIZES or base in DENSE_CONVNEXT_SIZES:
        return {}, tuple(get_pretrained_cfg(name).input_size)
    in_chans = get_pretrained_cfg(name).input_size[0]
    return ({"img_size": 32} if _is_vit(name) else {}), (in_chans, 32, 32)


def _build(name: str, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    extra, size = _tiny(name)
    torch.manual_seed(seed)
    model = timm.create_model(name, **extra, **kwargs)
    x = torch.randn(BATCH, *size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def test_registry_holds_exactly_our_models_with_configs_and_no_weights():
    assert sorted(NAMES) == sorted(moe_vit_model_names() + moe_convnext_model_names())
    assert timm.list_models("vmoe_*", pretrained=True) == []  # no weight location is registered
    assert timm.list_models("vmoe_*", name_matches_cfg=True) == NAMES  # every model has its config


def test_every_exclusion_names_a_timm_test_a_model_and_a_reason():
    for exclusion in TIMM_CONTRACT_EXCLUSIONS:
        assert exclusion.test in TIMM_MODEL_TESTS, exclusion
        assert fnmatch.filter(NAMES, exclusion.models), f"{exclusion.models} matches no registered model"
        assert len(exclusion.reason) > 40 and issubclass(exclusion.raises, Exception)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_describes_the_model(name):
    cfg = get_pretrained_cfg(name).to_dict()
    model, x = _build(name)
    assert model.pretrained_cfg == cfg and model.default_cfg is model.pretrained_cfg
    assert not any(cfg.get(key) for key in ("url", "file", "hf_hub_id", "state_dict"))  # no weights
    assert cfg["license"] and cfg["paper_ids"].startswith("arXiv:") and cfg["paper_name"]
    in_chans = cfg["input_size"][0]
    assert len(cfg["mean"]) == len(cfg["std"]) == in_chans
    state = model.state_dict()
    assert state[cfg["first_conv"] + ".weight"].shape[1] == in_chans  # the input the config describes
    assert state[cfg["classifier"] + ".weight"].shape[0] == cfg["num_classes"] == model.num_classes
    default, _ = _tiny(name)
    if not default:  # built at its configured size: the configured input runs
        assert model.eval()(torch.randn(1, *cfg["input_size"])).shape == (1, cfg["num_classes"])


SMALL_AND_TWO_224 = [n for n in NAMES if n.endswith(("_28", "_32"))] + ["vmoe_vit_tiny_patch16_224", "vmoe_convnext_atto"]


@pytest.mark.parametrize("name", SMALL_AND_TWO_224)
def test_registry_build_is_the_dense_model_with_its_mlps_replaced(name):
    # Models of record were trained with weights drawn this way: building through timm's
    # build_model_with_cfg (for the pretrained config and features_only) must not change them.
    base = name.removeprefix("vmoe_")
    from_dense = moe_vit_from_dense if _is_vit(name) else moe_convnext_from_dense
    torch.manual_seed(0)
    model = timm.create_model(name)
    torch.manual_seed(0)
    direct = from_dense(timm.create_model(base), name=name, dense_name=base, **model.moe_config["moe_kwargs"])
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.moe_config == direct.moe_config


def test_pretrained_cfg_overlay_is_applied_and_recorded():
    # timm reads num_classes / in_chans from the config; the stored moe_config must rebuild the same model.
    model = timm.create_model("vmoe_vit_test_patch7_28", pretrained_cfg_overlay=dict(num_classes=5))
    assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    config = model.moe_config
    rebuilt = timm.create_model(config["model"], **config["model_kwargs"], **config["moe_kwargs"])
    assert rebuilt.num_classes == 5


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_true_says_no_weights_exist(name):
    with pytest.raises(ConfigError, match=rf"pretrained=True is invalid for {name}: no pretrained weights exist"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_head_and_reset_classifier(name):
    # timm's test_model_backward, then test_model_default_cfgs(_non_std)'s head checks.
    model, x = _build(name, num_classes=5)
    model.train()
    out = model(x)
    assert out.shape == (BATCH, 5) and torch.isfinite(out).all()
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert torch.equal(model.forward_head(features), model(x))
        if _is_vit(name):  # tokens (B, N, C)
            assert features.ndim == 3 and features.shape[-1] == model.num_features
        else:  # NCHW at the configured pool size (1x1 at 32 pixels)
            assert features.shape[1] == model.num_features and features.shape[-1] == x.shape[-1] // 32
        assert pre_logits.shape == (BATCH, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0
        assert torch.equal(model(x), pre_logits)
        model.reset_classifier(0, "")  # no pooling either: the unpooled features
        assert model(x).shape == features.shape
        model.reset_classifier(7, "avg")
        assert model(x).shape == (BATCH, 7)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    model, x = _build(name)
    model.eval()
    levels = model.feature_info
    assert len(levels) == (len(model.blocks) if _is_vit(name) else 4)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(intermediates) == len(levels)
        for level, out in zip(levels, intermediates):
            assert out.shape[:2] == (BATCH, level["num_chs"])  # NCHW
            assert out.shape[-1] == -(-x.shape[-1] // level["reduction"])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:])] == [True, True]


@pytest.mark.parametrize("name", NAMES)
def test_features_only_with_out_indices(name):
    full, x = _build(name)
    levels = len(full.feature_info)
    out_indices = (0, levels - 1)  # the first level and the last one (MoE blocks with the default placement)
    extractor, _ = _build(name, features_only=True, out_indices=out_indices)
    assert any(isinstance(m, MoEMlp) for m in extractor.modules())  # the MoE blocks were kept
    assert extractor.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in out_indices]
    full.eval(), extractor.eval()
    with torch.no_grad():
        maps = extractor(x)
        expected = full.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert len(maps) == 2 and all(torch.equal(a, b) for a, b in zip(maps, expected))

    default, x = _build(name, features_only=True)
    expected_levels = min(3, levels) if _is_vit(name) else 4  # timm's family defaults (ViT: the last 3 blocks)
    assert len(default.feature_info.channels()) == expected_levels
    with torch.no_grad():
        assert len(default.eval()(x)) == expected_levels


def test_features_only_bad_out_indices_fail_early():
    with pytest.raises(ConfigError, match=r"out_indices=\(0, 9\) is invalid for vmoe_convnext_test_32.*\[-4, 3\]"):
        timm.create_model("vmoe_convnext_test_32", features_only=True, out_indices=(0, 9))
    with pytest.raises(ConfigError, match=r"out_indices=3 is invalid for vmoe_vit_test_patch7_28.*1 <= n <= 2"):
        timm.create_model("vmoe_vit_test_patch7_28", features_only=True, out_indices=3)


class _TimmTracer(torch.fx.Tracer):
    """torch.fx with timm's leaf modules and wrapped functions (as timm's fx feature extraction)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(get_notrace_modules())) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_forward_and_backward(name):
    assert MoEMlp in get_notrace_modules()
    model, x = _build(name, num_classes=5)
    model.eval()
    graph = torch.fx.GraphModule(model, _TimmTracer().trace(model))
    assert any(n.op == "call_module" and isinstance(graph.get_submodule(n.target), MoEMlp) for n in graph.graph.nodes)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
    graph.train()
    graph(x).mean().backward()
    assert [n for n, p in graph.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_torchscript(name):
    model, x = _build(name)
    model.eval()
    exclusion = excluded_from("test_model_forward_torchscript", name)
    if exclusion is not None:  # the reason still holds, and the error says so plainly
        with pytest.raises(exclusion.raises, match="MoEMlp cannot be compiled by TorchScript"):
            torch.jit.script(model)
        return
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), model(x))
