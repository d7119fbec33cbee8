"""Expert parallelism (vmoe_lib.distributed) on 2 gloo processes against one process.

Reference: one process, all ``E`` experts, the full batch (8 images). Expert-parallel run: 2
ranks, each routing its own half of the batch (whole routing groups) with ``E / 2`` experts.
Each rank builds the same seeded model, runs the reference itself, then the expert-parallel copy,
and reports the largest differences:

* outputs: the rank's half of the reference output;
* auxiliary loss: the mean over ranks vs the reference (each loss is a mean over groups);
* input gradients: the rank's half of the reference's;
* router and other replicated parameters: gradients averaged over the ranks
  (:func:`average_non_expert_gradients`) vs the reference;
* experts: the owner rank's shard of the gradient vs the reference's slice;
* eval mode under ``no_grad`` (eval capacity factor, no noise): outputs again.

Losses: reference ``sum(y * probe) + aux``; rank ``r`` of ``R``: ``R * sum(y_r * probe_r) + aux_r``,
whose mean over ranks is the reference loss. So the averaged replicated gradients and the expert
gradients (which the layer divides by ``R``) equal the reference's, and a rank's input gradient is
``R`` times its half of the reference's.

Router noise is made identical in both runs by replacing each router's ``add_noise`` with a
fixed draw indexed by global group, so the load loss (noisy routers only) is checked too.
Tolerance: float32, ``atol=1e-6, rtol=1e-5`` (measured differences are recorded by
``benchmarks/bench_distributed.py --sections ep_equality``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from distributed_helpers import spawn_gloo
from vmoe_lib.distributed import (
    DENSE_ROUTERS,
    average_non_expert_gradients,
    check_expert_parallel,
    enable_expert_parallel,
    expert_parameters,
    named_expert_parameters,
    non_expert_parameters,
    resolve_group,
)
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import MoEMlp, SharedRouting, collect_aux_loss
from vmoe_lib.routers import list_routers

ATOL, RTOL = 1e-6, 1e-5
E, D, H = 4, 8, 16
IMAGES, TOKENS = 8, 6  # the full batch; each of 2 ranks gets 4 images
DROPPING = {"capacity_factor": 0.5}  # with capacity_multiple=1: fewer slots than choices, drops certain

# name -> MoEMlp settings. Every sparse router at a capacity that drops, token choice with BPR,
# a skewed routing (everything to expert 0: one rank sends and receives nothing), per-image
# routing shared by a following layer (Mobile V-MoE), a shared expert (replicated parameters).
CASES: dict[str, dict[str, Any]] = {
    "softmax_token_choice k=1": {"router": "softmax_token_choice", "k": 1, **DROPPING},
    "softmax_token_choice k=2": {"router": "softmax_token_choice", "k": 2, **DROPPING, "shared_expert": True},
    "softmax_token_choice k=2 BPR": {"router": "softmax_token_choice", "k": 2, **DROPPING,
                                     "router_options": {"batch_priority": True}},
    "sinkhorn_token_choice k=2": {"router": "sinkhorn_token_choice", "k": 2, **DROPPING},
    "sinkhorn_token_choice k=2 BPR": {"router": "sinkhorn_token_choice", "k": 2, **DROPPING,
                                      "router_options": {"batch_priority": True}},
    "softmax_expert_choice": {"router": "softmax_expert_choice", **DROPPING},
    "sinkhorn_expert_choice": {"router": "sinkhorn_expert_choice", **DROPPING},
    "sparse_expert_choice": {"router": "sparse_expert_choice", **DROPPING},
    "per_image k=2 shared by 2 layers": {"router": "per_image", "k": 2, "shared_layers": 2},
    "skewed: all to expert 0": {"router": "softmax_token_choice", "k": 1, **DROPPING, "skewed": True},
}
DROPLESS = ("per_image",)  # per-image routing has no capacity: nothing is ever dropped


def build_model(case: dict[str, Any]) -> nn.Module:
    """The seeded model of a case: one MoEMlp, or per-image layers sharing one routing."""
    settings = dict(case)
    layers = settings.pop("shared_layers", 1)
    skewed = settings.pop("skewed", False)
    per_image = settings["router"] == "per_image"
    if per_image:  # noisy, guided by super-classes (set per forward); no batch-wide balance loss
        options = {"noise_std": 1.0, **settings.pop("router_options", {})}
    else:
        options = {"capacity_multiple": 1, **settings.pop("router_options", {})}
    if skewed:
        options["noise_std"] = 0.0
    torch.manual_seed(0)
    kwargs = {"num_experts": E, "router_options": options, "expert_init": "independent",
              "group_size": 1 if per_image else 2, **settings}
    share = SharedRouting() if layers > 1 else None
    model = nn.Sequential(*(MoEMlp(D, H, routing_share=share, routing_leader=i == 0, **kwargs) for i in range(layers)))
    if skewed:  # zero gate: equal logits, the stable top-1 picks expert 0 for every token
        with torch.no_grad():
            for p in model[0].router.parameters():
                p.zero_()
    return model


def _run(model: nn.Module, x: torch.Tensor, probe: torch.Tensor, scale: float, targets: torch.Tensor):
    for layer in model:
        layer.keep_routing = True
        if layer.router is not None and hasattr(layer.router, "superclass_targets"):
            layer.router.superclass_targets = targets
    x = x.clone().requires_grad_(True)
    y = model(x)
    aux = collect_aux_loss(model)
    loss = scale * (y * probe).sum() + aux
    loss.backward()
    return y.detach(), aux.detach(), x.grad


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, bool]:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) if a.numel() else 0.0, bool(torch.allclose(a, b, atol=ATOL, rtol=RTOL))


def compare_case(rank: int, world_size: int, name: str, group_or_mesh: Any = None) -> dict[str, Any]:
    """Reference and expert-parallel run of ``CASES[name]`` on this rank; the differences found."""
    case = CASES[name]
    torch.manual_seed(1)
    x = torch.randn(IMAGES, TOKENS, D)
    probe = torch.randn(IMAGES, TOKENS, D)
    targets = torch.randint(0, E, (IMAGES,))
    reference = build_model(case).train()
    ep_model = copy.deepcopy(reference)

    # Noise tables are indexed by group; the reference sees all groups, a rank its own.
    groups_per_image = 1 if case["router"] == "per_image" else 0.5
    half = IMAGES // world_size
    _fix_noise_tables(reference, 0, int(IMAGES * groups_per_image))
    y_ref, aux_ref, gx_ref = _run(reference, x, probe, 1.0, targets)

    enable_expert_parallel(ep_model, group_or_mesh)
    ep = ep_model[0].expert_parallel
    _fix_noise_tables(ep_model, int(rank * half * groups_per_image), int(IMAGES * groups_per_image))
    mine = slice(rank * half, (rank + 1) * half)
    y, aux, gx = _run(ep_model, x[mine], probe[mine], float(ep.size), targets[mine])
    average_non_expert_gradients(ep_model, group_or_mesh)
    aux_mean = aux.clone()
    dist.all_reduce(aux_mean, group=ep.group)
    aux_mean /= ep.size

    out: dict[str, Any] = {"case": name, "rank": rank, "ep_size": ep.size, "local_experts": list(ep.local_experts)}
    out["output"] = _max_diff(y, y_ref[mine])
    out["aux_loss"] = _max_diff(aux_mean, aux_ref)
    out["input_grad"] = _max_diff(gx / ep.size, gx_ref[mine])
    ref_params = dict(reference.named_parameters())
    experts = dict(named_expert_parameters(ep_model))
    router_diffs, other_diffs, expert_diffs = [], [], []
    for pname, p in ep_model.named_parameters():
        ref = ref_params[pname]
        if pname in experts:
            expert_diffs.append(_max_diff(p.grad, ref.grad[ep.first_expert:ep.first_expert + ep.num_local_experts]))
        elif ".router." in f".{pname}":
            router_diffs.append(_max_diff(p.grad, ref.grad))
        else:
            other_diffs.append(_max_diff(p.grad, ref.grad))
    for key, diffs in (("router_grad", router_diffs), ("expert_grad", expert_diffs), ("other_grad", other_diffs)):
        out[key] = (max(d for d, _ in diffs), all(ok for _, ok in diffs)) if diffs else None
    routing = reference[0].last_routing
    out["pairs"] = int(routing.expert_index.numel())
    out["choices"] = routing.num_groups * routing.group_size * getattr(reference[0].router, "k", 0)
    routed = torch.unique(routing.group_index * routing.group_size + routing.token_index).numel()
    out["tokens_unrouted"] = routing.num_groups * routing.group_size - routed
    out["rows_received"] = ep_model[0].last_dispatch.rows_computed
    with torch.no_grad():  # eval mode: the eval capacity factor, no noise, no autograd through the exchanges
        out["eval_output"] = _max_diff(ep_model.eval()(x[mine]), reference.eval()(x)[mine])
    return out


def _fix_noise_tables(model: nn.Module, first_group: int, total_groups: int) -> None:
    """Replace each router's noise with rows ``first_group...`` of one fixed ``(total_groups, ...)`` draw."""
    for layer in model:
        router = layer.router
        if router is None:
            continue

        def add_noise(logits: torch.Tensor, router: nn.Module = router) -> torch.Tensor:
            if not router.is_noisy:
                return logits
            table = torch.randn((total_groups, *logits.shape[1:]), generator=torch.Generator().manual_seed(7))
            return logits + router.noise_sigma * table[first_group:first_group + logits.shape[0]]

        router.add_noise = add_noise


def equality_worker(rank: int, world_size: int, names: list[str]) -> list[dict[str, Any]]:
    """Every case in ``names`` on this rank (one process launch for all of them)."""
    return [compare_case(rank, world_size, name) for name in names]


def mesh_worker(rank: int, world_size: int) -> dict[str, Any]:
    """A ("dp", "ep") mesh of shape (1, 2) and one of shape (2, 1): both build and EP works on their "ep" dim."""
    from torch.distributed.device_mesh import init_device_mesh

    results: dict[str, Any] = {}
    for shape in ((1, world_size), (world_size, 1)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "ep"))
        if shape[1] == 1:  # ep size 1: each rank holds every expert and routes its own half
            results[str(shape)] = _ep_size_one(rank, world_size, mesh)
        else:
            results[str(shape)] = compare_case(rank, world_size, "softmax_token_choice k=2", mesh)
    try:
        resolve_group(mesh, "tp")
        results["bad_dim"] = "no error"
    except ConfigError as error:
        results["bad_dim"] = str(error)
    return results


def _ep_size_one(rank: int, world_size: int, mesh: Any) -> dict[str, Any]:
    case = CASES["softmax_token_choice k=2"]
    torch.manual_seed(1)
    x = torch.randn(IMAGES, TOKENS, D)
    mine = slice(rank * IMAGES // world_size, (rank + 1) * IMAGES // world_size)
    local = build_model({**case, "router_options": {"noise_std": 0.0}}).train()
    ep_model = enable_expert_parallel(copy.deepcopy(local), mesh)
    return {"ep_size": ep_model[0].expert_parallel.size, "output": _max_diff(ep_model(x[mine]), local(x[mine]))}


# ---------------------------------------------------------------------------------- tests
SPARSE = [name for name in list_routers() if name not in DENSE_ROUTERS]


def test_every_sparse_router_has_a_case():
    covered = {case["router"] for case in CASES.values()}
    assert set(SPARSE) <= covered, f"sparse routers without an expert-parallel case: {set(SPARSE) - covered}"


@pytest.fixture(scope="module")
def equality_results() -> dict[str, list[dict[str, Any]]]:
    per_rank = spawn_gloo(equality_worker, 2, list(CASES))
    return {name: [rank_results[i] for rank_results in per_rank] for i, name in enumerate(CASES)}


@pytest.mark.parametrize("name", list(CASES))
def test_ep2_matches_one_process(equality_results, name):
    """Outputs, aux loss, input/router/expert/replicated gradients and the eval-mode output of EP=2
    equal the one-process run."""
    ranks = equality_results[name]
    assert [r["local_experts"] for r in ranks] == [[0, 1], [2, 3]]
    for r in ranks:
        for key in ("output", "aux_loss", "input_grad", "router_grad", "expert_grad", "other_grad", "eval_output"):
            if r[key] is None:
                continue
            diff, ok = r[key]
            assert ok, f"{name} rank {r['rank']}: {key} differs by {diff:.3g} (atol {ATOL}, rtol {RTOL})"
    ref = ranks[0]
    if CASES[name]["router"] not in DROPLESS:
        dropped = ref["choices"] - ref["pairs"] if ref["choices"] else ref["tokens_unrouted"]
        assert dropped > 0, f"{name}: the capacity dropped nothing, so drops are not tested"
    if "skewed" in CASES[name]:
        assert [r["rows_received"] for r in ranks][1] == 0, "rank 1 (experts 2, 3) should receive no row"


def test_ep_over_a_dp_ep_device_mesh():
    results = spawn_gloo(mesh_worker, 2)
    for r in results:
        assert r["(1, 2)"]["ep_size"] == 2 and r["(1, 2)"]["output"][1] and r["(1, 2)"]["expert_grad"][1]
        assert r["(2, 1)"]["ep_size"] == 1 and r["(2, 1)"]["output"][1]
        assert "mesh_dim='tp'" in r["bad_dim"] and "('dp', 'ep')" in r["bad_dim"]


# -------------------------------------------------------------- bad input (no processes)
def test_bad_input_fails_early_naming_the_setting():
    with pytest.raises(ConfigError, match=r"num_experts=6 .* not divisible by the expert-parallel size 4"):
        check_expert_parallel(MoEMlp(D, H, num_experts=6, k=1), 4)
    with pytest.raises(ConfigError, match=r"router='soft' .* no expert-parallel mode"):
        check_expert_parallel(nn.Sequential(MoEMlp(D, H, num_experts=4, router="soft")), 2)
    with pytest.raises(ConfigError, match="has no MoEMlp layer"):
        check_expert_parallel(nn.Linear(2, 2), 2)
    with pytest.raises(ConfigError, match=r"ep_size=0 is invalid"):
        check_expert_parallel(MoEMlp(D, H, num_experts=4, k=1), 0)
    layer = MoEMlp(D, H, num_experts=4, k=1)
    assert check_expert_parallel(layer, 2) == [layer] and check_expert_parallel(layer, 4) == [layer]
    if not dist.is_initialized():
        with pytest.raises(ConfigError, match="torch.distributed is not initialised"):
            enable_expert_parallel(layer)


def test_parameter_split_without_expert_parallel():
    """Before enabling, nothing is an expert-parallel parameter; the helpers cover every parameter."""
    layer = MoEMlp(D, H, num_experts=4, k=1, shared_expert=True)
    assert expert_parameters(layer) == [] and len(non_expert_parameters(layer)) == len(list(layer.parameters()))
