"""Distributed training on gloo processes: what data and expert parallelism cost, and that they compute the same.

Sections (``--sections``, comma-separated; each is one function in ``SECTIONS``, which writes the
record it names):

``ep`` -> ``distributed.{json,md}``
    On 2 gloo processes (1 thread each), forward+backward time of one
    :class:`~vmoe_lib.layers.MoEMlp` (E=8, D=192, hidden 768, softmax token choice with k=1 and
    k=2, training capacity factor 1.05, routing groups of 8 images, 64 images x 65 tokens per
    rank) expert-parallel over the 2 ranks (4 experts each) vs the same layer local on each rank
    (8 experts, the ``segment`` backend), and the time spent inside the all_to_all exchanges
    (counts and token rows, forward and backward; :func:`vmoe_lib.distributed.exchange_timer`).
``ep_equality`` -> ``expert_parallel_equality.{json,md}``
    The cases of ``tests/test_expert_parallel.py`` (every sparse router at a capacity that drops
    tokens, BPR, a skewed routing, shared per-image routing), EP=2 vs one process: the largest
    absolute differences of outputs, aux loss and gradients, recorded.

``dp`` -> ``distributed.{json,md}``
    Training steps of the chapters' test bed and of its dense model on 2 gloo processes (DDP) vs 1,
    at the same batch per process (128 images): images/s and scaling efficiency.
``dp_equality`` -> ``data_parallel_equality.{json,md}``
    The test bed trained for 32 steps by one process and by 2 (DDP, FSDP2, then expert parallelism)
    with the same global batch: the largest differences of losses, accuracies and final parameters.

Each section is one entry of ``SECTIONS``: a function ``(args) -> dict`` returning its rows and a
``"markdown"`` key, and the record it belongs to. Sections of one record are merged into the
existing file, so they can be run separately.

Timing: compared candidates run interleaved (local, EP, local, EP, ...); a step's time is that of
its slower rank (an EP step ends when the last rank's exchange does) and the minimum over
``--repeats`` is kept; load average and thread counts are recorded. While it runs the script holds
``/tmp/vmoe_bench_lock`` (and waits, in 30 s steps, while someone else holds it).

Usage::

    python benchmarks/bench_distributed.py                          # all four sections, ~5 min on 2 cores
    python benchmarks/bench_distributed.py --sections ep --repeats 20
    python benchmarks/bench_distributed.py --sections ep_equality --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # the one gloo launcher (tests/distributed_helpers.py) and the equality cases

from _record import write_record  # noqa: E402
from distributed_helpers import spawn_gloo  # noqa: E402

LOCK = Path("/tmp/vmoe_bench_lock")
WORLD_SIZE = 2


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


@contextmanager
def bench_lock() -> Iterator[None]:
    """Hold ``/tmp/vmoe_bench_lock`` while measuring; wait while another benchmark holds it."""
    while LOCK.exists():
        print(f"{LOCK} exists (another benchmark): waiting 30 s", flush=True)
        time.sleep(30)
    LOCK.write_text(f"bench_distributed.py pid {os.getpid()}\n")
    try:
        yield
    finally:
        LOCK.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ ep
EP_LAYER = {"num_experts": 8, "dim": 192, "hidden": 768, "images": 64, "tokens": 65, "group_size": 8,
            "router": "softmax_token_choice"}


def _ep_worker(rank: int, world_size: int, k: int, repeats: int) -> dict[str, Any]:
    """One rank: the local layer and its expert-parallel copy, interleaved, on this rank's batch."""
    import copy

    import torch

    from vmoe_lib.distributed import enable_expert_parallel, exchange_timer
    from vmoe_lib.layers import MoEMlp

    cfg = EP_LAYER
    torch.manual_seed(0)
    local = MoEMlp(cfg["dim"], cfg["hidden"], num_experts=cfg["num_experts"], router=cfg["router"], k=k,
                   group_size=cfg["group_size"], expert_init="independent").train()
    ep = enable_expert_parallel(copy.deepcopy(local))
    torch.manual_seed(1 + rank)  # each rank its own batch
    x = torch.randn(cfg["images"], cfg["tokens"], cfg["dim"])
    grad = torch.randn_like(x)

    def step(layer: MoEMlp) -> tuple[float, float, float]:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        start = time.perf_counter()
        with exchange_timer() as forward_exchange:
            y = layer(xi)
        with exchange_timer() as backward_exchange:
            (y * grad).sum().backward()
        return time.perf_counter() - start, forward_exchange.seconds, backward_exchange.seconds

    for _ in range(2):  # warm-up
        step(local), step(ep)
    runs: dict[str, list[tuple[float, float, float]]] = {"local": [], "ep": []}
    for _ in range(repeats):
        runs["local"].append(step(local))
        runs["ep"].append(step(ep))
    return {
        "rank": rank, "threads": torch.get_num_threads(), "runs": runs,
        "isolated_exchange_s": _isolated_exchange_s(ep, x, repeats),
        "pairs": local.last_dispatch.pairs, "ep_rows_received": ep.last_dispatch.rows_computed,
        "tokens": cfg["images"] * cfg["tokens"],
    }


def _isolated_exchange_s(layer: Any, x: Any, repeats: int) -> float:
    """The data movement alone: the step's 4 row exchanges (rows out, results back, and the same two
    volumes in backward) with the layer's split sizes, started together after a barrier; min over repeats."""
    import torch
    import torch.distributed as dist

    mode = layer.expert_parallel
    layer.keep_routing = True
    with torch.no_grad():
        layer(x)
    routing = layer.last_routing
    layer.keep_routing = False
    counts = torch.bincount(routing.expert_index, minlength=mode.num_experts)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts)
    send_splits = counts.view(mode.size, -1).sum(1).tolist()
    recv_splits = recv.view(mode.size, -1).sum(1).tolist()
    D, O = layer.in_features, layer.out_features
    rows_out, rows_back = torch.randn(sum(send_splits), D), torch.randn(sum(recv_splits), O)
    buffers = {name: torch.empty(n, width) for name, n, width in
               (("in", sum(recv_splits), D), ("back", sum(send_splits), O))}
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(2):  # forward, then the same volumes in backward
            dist.all_to_all_single(buffers["in"], rows_out, recv_splits, send_splits)
            dist.all_to_all_single(buffers["back"], rows_back, send_splits, recv_splits)
        best = min(best, time.perf_counter() - start)
    return best


def run_ep(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for k in (1, 2):
        print(f"ep: k={k}, {args.repeats} repeats", flush=True)
        per_rank = spawn_gloo(_ep_worker, WORLD_SIZE, k, args.repeats)
        # A step lasts until its slower rank is done: per repeat the max over ranks, then the min over repeats.
        steps = {name: [max(r["runs"][name][i][0] for r in per_rank) for i in range(args.repeats)] for name in ("local", "ep")}
        best = min(range(args.repeats), key=lambda i: steps["ep"][i])
        slow = max(per_rank, key=lambda r: r["runs"]["ep"][best][0])  # the rank that ended the fastest EP step
        _, forward_exchange, backward_exchange = slow["runs"]["ep"][best]
        local_s, ep_s = min(steps["local"]), steps["ep"][best]
        exchange = forward_exchange + backward_exchange
        rows.append({
            "k": k, **{key: EP_LAYER[key] for key in ("num_experts", "dim", "hidden", "images", "tokens")},
            "local_fb_ms": 1e3 * local_s, "ep_fb_ms": 1e3 * ep_s, "ep_vs_local": ep_s / local_s,
            "exchange_ms": 1e3 * exchange, "exchange_forward_ms": 1e3 * forward_exchange,
            "exchange_backward_ms": 1e3 * backward_exchange, "exchange_share_of_ep": exchange / ep_s,
            "ep_outside_exchange_ms": 1e3 * (ep_s - exchange),
            "isolated_exchange_ms": 1e3 * max(r["isolated_exchange_s"] for r in per_rank),
            "ranks": per_rank,
        })
    lines = [
        "## Expert parallelism: one MoE layer, EP=2 vs local (forward+backward)",
        "",
        f"2 gloo processes on one machine, 1 thread each; per rank {EP_LAYER['images']} images x {EP_LAYER['tokens']} "
        f"tokens, D={EP_LAYER['dim']}, hidden {EP_LAYER['hidden']}, E={EP_LAYER['num_experts']} "
        f"({EP_LAYER['num_experts'] // WORLD_SIZE} per rank under EP), {EP_LAYER['router']}, capacity factor 1.05, "
        f"groups of {EP_LAYER['group_size']} images. Step time = the slower rank's, min over {args.repeats} interleaved "
        "repeats; exchange times are those of the rank that ended the fastest EP step.",
        "",
        "| k | pairs per rank | local (ms) | EP=2 (ms) | EP / local | in all_to_all (ms): fwd + bwd = total | share of EP step | EP outside exchanges (ms) | row exchanges alone (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {max(rank['pairs'] for rank in r['ranks'])} | {r['local_fb_ms']:.1f} | {r['ep_fb_ms']:.1f} | "
            f"{r['ep_vs_local']:.2f}x | {r['exchange_forward_ms']:.1f} + {r['exchange_backward_ms']:.1f} = "
            f"{r['exchange_ms']:.1f} | {100 * r['exchange_share_of_ep']:.0f}% | {r['ep_outside_exchange_ms']:.1f} | "
            f"{r['isolated_exchange_ms']:.1f} |"
        )
    extra = [100 * (r["ep_vs_local"] - 1) for r in rows]
    alone = [r["isolated_exchange_ms"] for r in rows]
    inside = [r["exchange_ms"] for r in rows]
    lines += [
        "",
        f"Reading: the expert-parallel step costs {min(extra):.0f}-{max(extra):.0f}% more than the local layer. Of the "
        f"{min(inside):.1f}-{max(inside):.1f} ms inside the exchanges, moving the rows takes {min(alone):.1f}-{max(alone):.1f} ms "
        "(row exchanges alone); the rest is one rank waiting for the other. Outside the exchanges the EP step does "
        "the local layer's work (half the experts, on both ranks' tokens), plus the regrouping by local expert.",
        "",
        "The exchange time is wall time inside the blocking `all_to_all_single` calls (5 per step: the counts, "
        "rows out and results back in forward, the two reverse exchanges in backward), so it includes waiting for the "
        "other rank (the ranks route different batches, so one reaches the exchange first). *Row exchanges alone*: the "
        "same four row exchanges with the same split sizes, started together after a barrier: the data movement "
        "itself. Both ranks share one machine's memory: this is the software cost of gloo over loopback, not a network.",
        "",
    ]
    return {"rows": rows, "markdown": "\n".join(lines)}


# --------------------------------------------------------------------------- ep_equality
def run_ep_equality(args: argparse.Namespace) -> dict[str, Any]:
    from test_expert_parallel import ATOL, CASES, RTOL, equality_worker

    print(f"ep_equality: {len(CASES)} cases", flush=True)
    per_rank = spawn_gloo(equality_worker, WORLD_SIZE, list(CASES))
    keys = ("output", "aux_loss", "input_grad", "router_grad", "expert_grad", "other_grad", "eval_output")
    rows = []
    for i, name in enumerate(CASES):
        results = [rank_results[i] for rank_results in per_rank]
        row: dict[str, Any] = {"case": name}
        for key in keys:
            values = [r[key] for r in results if r[key] is not None]
            row[key] = max(d for d, _ in values) if values else None
            row[f"{key}_within_tolerance"] = all(ok for _, ok in values) if values else None
        ref = results[0]
        row["pairs"] = ref["pairs"]
        row["dropped"] = ref["choices"] - ref["pairs"] if ref["choices"] else ref["tokens_unrouted"]
        row["rows_received_per_rank"] = [r["rows_received"] for r in results]
        rows.append(row)

    def cell(value: float | None) -> str:
        return "–" if value is None else ("0" if value == 0 else f"{value:.1e}")

    lines = [
        "## Expert parallelism: EP=2 vs one process (max abs difference, float32)",
        "",
        "Reference: one process, all 4 experts, 8 images x 6 tokens. EP=2: each of 2 gloo ranks routes its 4 images "
        "with 2 experts. Output and input gradient: each rank's half; aux loss: mean over ranks; router (and other "
        "replicated) gradients: averaged over ranks; expert gradients: the owner rank's shard. Max over both ranks. "
        f"Tolerance of the test: atol {ATOL}, rtol {RTOL}. `dropped`: choices dropped (token choice) or tokens "
        "routed to no expert (expert choice), in the reference.",
        "",
        "| case | output | aux loss | input grad | router grad | expert grad | other grad | eval output | pairs | dropped | rows received (rank 0, 1) | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = all(r[f"{key}_within_tolerance"] in (True, None) for key in keys)
        lines.append(
            f"| {r['case']} | " + " | ".join(cell(r[key]) for key in keys)
            + f" | {r['pairs']} | {r['dropped']} | {', '.join(map(str, r['rows_received_per_rank']))} | {'yes' if ok else 'NO'} |"
        )
    lines += ["", "Other grad: the shared expert (a replicated parameter), in the case that has one.", ""]
    return {"rows": rows, "tolerance": {"atol": ATOL, "rtol": RTOL}, "markdown": "\n".join(lines)}


# --------------------------------------------------------------------------- dp and dp_equality
DP_BATCH = 128  # images per process in the scaling section (the chapters' cpu presets use 256 on one process)
DP_EQUALITY = dict(train_subset=4096, eval_subset=2000, epochs=2, batch_size=256, eval_batch_size=500)


def _test_bed(dense: bool) -> tuple[str, dict[str, Any]]:
    """The chapters' test bed (``vmoe_lib.chapters.recipes.TEST_BED``) or its dense model: timm name and kwargs."""
    from vmoe_lib.chapters.recipes import TEST_BED, TEST_BED_MOE

    if dense:
        return TEST_BED.dense, {}
    return f"vmoe_{TEST_BED.dense}", {"moe_layers": TEST_BED.placement, **TEST_BED_MOE}


def _dp_steps(rank: int, world_size: int, dense: bool, steps: int, batch: int) -> dict[str, float]:
    """Median training step of the test bed (or its dense model) on ``batch`` images per process; DDP when world_size > 1."""
    import statistics

    import timm
    import torch

    import vmoe_lib  # noqa: F401  (registers the models)
    from profile_step import make_step
    from vmoe_lib.distributed import DistributedContext, wrap_model

    name, kwargs = _test_bed(dense)
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    if world_size > 1:
        model = wrap_model(model, DistributedContext.from_process_group(), torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    step = make_step(model, x, y, scoped=False)
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_step_s": statistics.median(times)}


def _one_process_steps(dense: bool, steps: int, batch: int) -> float:
    import torch

    torch.set_num_threads(1)
    return _dp_steps(0, 1, dense, steps, batch)["median_step_s"]


def run_dp(args: argparse.Namespace) -> dict[str, Any]:
    steps = max(5, args.repeats)
    rows = []
    for dense in (False, True):
        label = "dense ViT-pico" if dense else "test bed (MoE ViT-pico, all 4 MLPs, E=8, k=1)"
        one, two = [], []
        for _ in range(3):  # 1 process, 2 processes, 1, 2, ...: a slow spell of the machine is seen by both
            print(f"dp: {label}, 1 process", flush=True)
            one.append(_one_process_steps(dense, steps, DP_BATCH))
            print(f"dp: {label}, 2 processes", flush=True)
            two.append(max(r["median_step_s"] for r in spawn_gloo(_dp_steps, WORLD_SIZE, dense, steps, DP_BATCH)))
        t1, t2 = min(one), min(two)
        rows.append({"model": label, "batch_per_process": DP_BATCH, "steps": steps,
                     "one_step_ms": 1e3 * t1, "two_step_ms": 1e3 * t2,
                     "one_img_s": DP_BATCH / t1, "two_img_s": WORLD_SIZE * DP_BATCH / t2,
                     "speedup": (WORLD_SIZE * DP_BATCH / t2) / (DP_BATCH / t1),
                     "efficiency": (DP_BATCH / t2) / (DP_BATCH / t1)})
    lines = [
        "## Data parallelism: 2 processes vs 1 at the same per-process batch (training steps)",
        "",
        f"The book's training step (AdamW, label smoothing, aux loss, clipping) on {DP_BATCH} images per process, "
        f"1 thread per process; 2 processes: DDP over gloo (global batch {WORLD_SIZE * DP_BATCH}). Median over {steps} "
        "steps after 3 warm-up steps, the best of three alternating measurements; for 2 processes the slower rank.",
        "",
        "| model | 1 process: ms/step | img/s | 2 processes: ms/step | img/s | speed-up | scaling efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['one_step_ms']:.0f} | {r['one_img_s']:.0f} | {r['two_step_ms']:.0f} | "
                     f"{r['two_img_s']:.0f} | {r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% |")
    lines += [
        "",
        "Scaling efficiency = per-process throughput with 2 processes over the 1-process throughput. The 2 processes "
        "have one core each of this 2-core machine, so they also share its memory bandwidth and caches; the gradient "
        "all-reduce of DDP runs over gloo on loopback, overlapped with the backward pass in buckets. Its cost grows "
        "with the parameters, not the activated ones: the MoE test bed all-reduces 1.13M parameters (its 32 experts "
        "included) against the dense model's 0.21M. Between runs of this section on this machine the efficiencies "
        "move by more than 10 points (the MoE's from 76 to 89 %, the dense model's from 85 to 96 %, in four runs; a fifth, "
        "disturbed, gave the dense model 106 %), so "
        "read them as 'about 80-95 %' and not as a difference between the two models.",
        "",
    ]
    return {"rows": rows, "markdown": "\n".join(lines)}


def _dp_equality_rank(rank: int, world_size: int, config: dict, strategy: str, weights: str) -> dict | None:
    from vmoe_lib.distributed import DistributedContext
    from vmoe_lib.train import TrainConfig, train_model

    context = DistributedContext.from_process_group(strategy)
    return train_model(TrainConfig(**config), 0, device="cpu", progress=False, distributed=context, weights_path=weights)


def run_dp_equality(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    from safetensors.torch import load_file

    from vmoe_lib.train import TrainConfig, train_model

    name, kwargs = _test_bed(dense=False)
    config = {"model": name, "model_kwargs": kwargs, **DP_EQUALITY}
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        print("dp_equality: 1 process", flush=True)
        one = train_model(TrainConfig(**config), 0, device="cpu", progress=False, weights_path=f"{folder}/one.safetensors")
        w1 = load_file(f"{folder}/one.safetensors")
        for strategy in ("ddp", "fsdp2", "ep"):
            print(f"dp_equality: 2 processes, {strategy}", flush=True)
            two = spawn_gloo(_dp_equality_rank, WORLD_SIZE, config, strategy, f"{folder}/{strategy}.safetensors")[0]
            w2 = load_file(f"{folder}/{strategy}.safetensors")
            row: dict[str, Any] = {"strategy": strategy}
            for key in ("train_loss", "aux_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
                row[key] = max(abs(a[key] - b[key]) for a, b in zip(one["history"], two["history"]))
            row["bypass_accuracy"] = abs(one["moe_bypass"]["accuracy"] - two["moe_bypass"]["accuracy"])
            row["parameters"] = max((w1[k] - w2[k]).abs().max().item() for k in w1)
            row["parameters_relative"] = max(((w1[k] - w2[k]).abs().max() / w1[k].abs().max().clamp_min(1e-12)).item() for k in w1)
            rows.append(row)
    steps = DP_EQUALITY["epochs"] * DP_EQUALITY["train_subset"] // DP_EQUALITY["batch_size"]
    lines = [
        "## Data parallelism: 2 processes vs 1 (max abs difference, float32)",
        "",
        f"The chapters' test bed (`{name}`, all 4 MLPs MoE, softmax token choice k=1 with router noise, groups of 8 "
        f"images) on Fashion-MNIST: {DP_EQUALITY['train_subset']} training images, global batch "
        f"{DP_EQUALITY['batch_size']} ({DP_EQUALITY['batch_size'] // WORLD_SIZE} per process), {steps} steps, seed 0; "
        f"evaluated on {DP_EQUALITY['eval_subset']} validation and test images after each epoch. One process vs 2 gloo "
        "processes with 1 thread each; the largest difference over the epochs.",
        "",
        "| strategy | train loss | aux loss | train acc. | val loss | val acc. | test loss | test acc. | bypass acc. | parameters (abs) | parameters (rel. to the tensor's max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r[k] for k in ("train_loss", "aux_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                                "test_accuracy", "bypass_accuracy", "parameters", "parameters_relative")]
        lines.append(f"| {r['strategy']} | " + " | ".join("0" if c == 0 else f"{c:.1e}" for c in cells) + " |")
    lines += [
        "",
        "Accuracies are fractions (5e-4 = 1 image in 2000). The processes multiply matrices of half the rows (another "
        "blocking, other roundings) and sum the gradients, losses and accuracies in another order than one process does, "
        "and AdamW's normalised step magnifies the last bits. (The three strategies came out with the same largest loss "
        "and accuracy differences; their parameters differ.) Over a few steps the "
        "runs agree within float tolerance (`tests/test_distributed_training.py`: 16 steps of a smaller MoE, 1e-5 "
        "relative on losses, accuracies equal, 2e-4 on parameters). Over longer training the differences grow, as they "
        "do between 1 and 2 threads: once a token's top-1 expert flips, the runs take different paths. Here, after 32 "
        "steps, 2 training images and 1 test image of 2000 are classified differently. So an N-process run is a "
        "statistically equivalent rerun of the 1-process run, not a bit-for-bit copy of its numbers.",
        "",
    ]
    return {"rows": rows, "markdown": "\n".join(lines)}


# ---------------------------------------------------------------------------------- main
@dataclass
class Section:
    run: Callable[[argparse.Namespace], dict[str, Any]]
    record: str  # results/benchmarks/<device>/<record>.{json,md}
    title: str


SECTIONS: dict[str, Section] = {
    "dp": Section(run_dp, "distributed", "Distributed training on CPU (gloo)"),
    "ep": Section(run_ep, "distributed", "Distributed training on CPU (gloo)"),
    "dp_equality": Section(run_dp_equality, "data_parallel_equality", "Data parallelism: equality with one process"),
    "ep_equality": Section(run_ep_equality, "expert_parallel_equality", "Expert parallelism: equality with one process"),
}


def manifest(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vmoe_lib.numerics import cpu_info
    from vmoe_lib.results import _git_sha, _versions

    return {
        "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
        "world_size": WORLD_SIZE, "backend": "gloo", "threads_per_rank": 1,
        "parent_torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "repeats": args.repeats, "cpu": cpu_info(), "versions": _versions(), "git_sha": _git_sha(),
        "python": platform.python_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_sections(out_dir: Path, record: str, results: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    """Merge ``results`` (section name -> result) into ``out_dir/record.json`` and redraw its markdown."""
    path = out_dir / f"{record}.json"
    report = json.loads(path.read_text()) if path.exists() else {"benchmark": "bench_distributed", "sections": {}}
    for name, result in results.items():
        start, end = result.pop("load_average")
        report["sections"][name] = {**result, "manifest": {**info, "load_average_start": start, "load_average_end": end}}
    title = next(section.title for section in SECTIONS.values() if section.record == record)
    parts = [f"# {title}", ""]
    for name in SECTIONS:
        if name in report["sections"]:
            section = report["sections"][name]
            m = section["manifest"]
            parts += [section["markdown"],
                      f"`{m['command']}`: {m['cpu'].get('model')}, {m['cpu'].get('logical_cores')} cores, "
                      f"{m['world_size']} ranks x {m['threads_per_rank']} thread, load average {m['load_average_start']} "
                      f"-> {m['load_average_end']}, git {(m['git_sha'] or '?')[:12]}, torch {m['versions']['torch']}, {m['finished_at']}.", ""]
    write_record(path, report, "\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "cpu"), help="folder of the records")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per candidate (min kept)")
    args = parser.parse_args(argv)
    names = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    by_record: dict[str, dict[str, dict[str, Any]]] = {}
    with bench_lock():
        for name in names:
            start_load = load_average()
            result = SECTIONS[name].run(args)
            result["load_average"] = [start_load, load_average()]
            by_record.setdefault(SECTIONS[name].record, {})[name] = result
            print(result["markdown"], flush=True)
    info = manifest(args)
    for record, results in by_record.items():
        write_sections(Path(args.out), record, results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
