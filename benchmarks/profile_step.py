"""Where one training step of an MoE ViT spends its time, next to its FLOP-matched dense model.

For each model spec: the MoE model, its dense base and the dense model with the same activated
FLOPs (``vmoe_lib.models.flops_matched_dense``) are built from the same seed and trained on the
same batch with the book's step (AdamW from timm's param groups, label-smoothed cross-entropy plus
the MoE auxiliary loss, gradient clipping), side by side:

1. **Throughput**: whole training steps of the three models, interleaved (A, B, C, A, B, C...),
   median over ``--steps``; images/s and the MoE / dense ratios.
2. **Profile**: ``torch.profiler`` over ``--steps`` steps of each model, with scopes put around
   the parts of the step from outside the library (monkeypatched wrappers, so the library carries
   no profiling code): forward, backward, optimizer (clipping + AdamW), and inside each MoE
   layer the router (gate logits, noise), its allocation (top-k with capacity, BPR), its auxiliary
   losses, its routing statistics, and the dispatch + experts + combine; one evaluation batch too.
   Backward time of the fused expert kernel is read off its autograd node.

    .venv/bin/python benchmarks/profile_step.py                   # pico (k=2 and the chapters' k=1) and nano
    .venv/bin/python benchmarks/profile_step.py --label before     # keep a labelled copy of the table

Writes ``results/benchmarks/<device>/profile_step[_<label>].{json,md}``. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import write_record  # noqa: E402

import vmoe_lib  # noqa: E402,F401  (registers the models)
from vmoe_lib.chapters.recipes import TEST_BED, TEST_BED_MOE  # noqa: E402
from vmoe_lib.layers import moe as moe_module  # noqa: E402
from vmoe_lib.layers.aux import collect_aux_loss  # noqa: E402
from vmoe_lib.routers import token_choice_routing  # noqa: E402
from vmoe_lib.routers.router import GatedRouter  # noqa: E402

# The chapters' test bed (routers_bpr cpu preset): E=8 in blocks 1 and 3, groups of 8 images.
CHAPTER_TC = {"router": "softmax_token_choice", "num_experts": 8, "k": 1, "group_size": 8, "capacity_factor": 1.0,
              "eval_capacity_factor": 1.0, "router_options": {"capacity_multiple": 1}}
SPECS: dict[str, dict[str, Any]] = {
    "pico_k2": {"model": "vmoe_vit_pico_patch7_28", "kwargs": {}, "note": "E=8, k=2, Last-2, cf 1.05 (V-MoE defaults)"},
    "pico_k1": {"model": "vmoe_vit_pico_patch7_28", "kwargs": CHAPTER_TC, "note": "chapter 1's softmax_tc: k=1, cf 1.0"},
    "nano_k2": {"model": "vmoe_vit_nano_patch7_28", "kwargs": {}, "note": "E=8, k=2, Last-2, cf 1.05"},
    "testbed": {"model": "vmoe_vit_pico_patch7_28", "kwargs": {"moe_layers": TEST_BED.placement, **TEST_BED_MOE},
                "note": f"the chapters' test bed {TEST_BED.name}: k=1, cf 1.0, MoE in every block"},
}
SCOPES = ("forward", "backward", "optimizer", "evaluation", "moe.router", "moe.router.allocation", "moe.router.aux_losses",
          "moe.router.routing_stats", "moe.dispatch_experts_combine")
EXPERT_BACKWARD_NODES = ("_SortedExpertsCombineBackward", "_SegmentLinearBackward")


@contextlib.contextmanager
def scopes_around_moe() -> Iterator[None]:
    """Wrap the MoE parts in ``record_function`` scopes for the duration (restored afterwards)."""
    from torch.profiler import record_function

    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return original(*args, **kwargs)

        patched.append((owner, name, original))
        setattr(owner, name, wrapped)

    wrap(moe_module.MoEMlp, "_route", "moe.router")
    wrap(moe_module, "dispatch_combine", "moe.dispatch_experts_combine")
    wrap(token_choice_routing, "top_k_token_choice", "moe.router.allocation")
    for cls in _router_classes():
        # aux_loss_and_metrics computes the weighted loss terms (loss_terms only builds them lazily).
        for name, label in (("aux_loss_and_metrics", "moe.router.aux_losses"), ("metrics", "moe.router.routing_stats")):
            if name in vars(cls):
                wrap(cls, name, label)
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _router_classes() -> list[type]:
    seen, todo = [], [GatedRouter]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def build(spec: dict[str, Any], device: torch.device) -> dict[str, nn.Module]:
    import timm

    from vmoe_lib.models import flops_matched_dense

    torch.manual_seed(0)
    moe = timm.create_model(spec["model"], **spec["kwargs"]).to(device)
    dense = timm.create_model(moe.moe_config["dense_model"]).to(device)
    matched = flops_matched_dense(moe, (1, 28, 28)).to(device)
    return {"moe": moe, "dense_base": dense, "dense_flops_matched": matched}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scoped: bool) -> Callable[[], None]:
    """The book's training step (vmoe_lib.train: its optimizer, loss and clipping), optionally with scopes."""
    from torch.profiler import record_function

    from vmoe_lib.train import TrainConfig, make_optimizer

    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.05))
    scope = record_function if scoped else (lambda _label: contextlib.nullcontext())

    def step() -> None:
        with scope("forward"):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            aux = collect_aux_loss(model)
            if aux is not None:
                loss = loss + aux
        loss.item(), (aux.item() if aux is not None else 0.0)  # the engine reads both every step
        optimizer.zero_grad(set_to_none=True)
        with scope("backward"):
            loss.backward()
        with scope("optimizer"):
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        (logits.argmax(-1) == y).sum().item()

    return step


def throughput(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    steppers = {name: make_step(m, x, y, scoped=False) for name, m in models.items()}
    for _ in range(3):
        for fn in steppers.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, fn in steppers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """Milliseconds per step in each scope (inclusive), plus the experts' backward node."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    step = make_step(model, x, y, scoped=True)
    totals = {scope: 0.0 for scope in SCOPES}
    totals["experts_backward"] = 0.0
    with scopes_around_moe():
        for _ in range(3):
            step()
        # Training steps and evaluation forwards are profiled apart, so the MoE scopes of the
        # table (router, dispatch...) are those of the training step only.
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        for event in prof.key_averages():
            if event.key in totals:
                totals[event.key] += event.cpu_time_total
            elif any(node in event.key for node in EXPERT_BACKWARD_NODES) and event.key.startswith("autograd::engine"):
                totals["experts_backward"] += event.cpu_time_total
        model.eval()
        with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof_eval:
            for _ in range(steps):
                with record_function("evaluation"):
                    model(x)
        model.train()
    totals["evaluation"] = sum(e.cpu_time_total for e in prof_eval.key_averages() if e.key == "evaluation")
    return {scope: us / 1000.0 / steps for scope, us in totals.items()}


def run(spec_names: list[str], steps: int, device: torch.device, batch: int = 128) -> list[dict[str, Any]]:
    rows = []
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for name in spec_names:
        spec = SPECS[name]
        models = build(spec, device)
        t = throughput(models, x, y, steps)
        prof = {label: profile(m, x, y, steps) for label, m in models.items()}
        moe = prof["moe"]
        moe_parts = sum(moe[k] for k in ("moe.router", "moe.dispatch_experts_combine"))
        row = {
            "spec": name, "model": spec["model"], "kwargs": spec["kwargs"], "note": spec["note"],
            "flops_matched": models["dense_flops_matched"].description, "batch": x.shape[0],
            **{f"step_ms_{k}": v * 1000 for k, v in t.items()},
            **{f"img_per_s_{k}": x.shape[0] / v for k, v in t.items()},
            "moe_vs_flops_matched": t["dense_flops_matched"] / t["moe"],
            "moe_vs_dense_base": t["dense_base"] / t["moe"],
            "profile_ms": prof,
            "moe_forward_outside_moe_layers_ms": moe["forward"] - moe_parts,
        }
        print(f"{name}: MoE {row['img_per_s_moe']:.0f} img/s, FLOP-matched dense {row['img_per_s_dense_flops_matched']:.0f} "
              f"({row['moe_vs_flops_matched']:.2f}x), dense base {row['img_per_s_dense_base']:.0f} ({row['moe_vs_dense_base']:.2f}x)",
              flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| spec | MoE img/s | FLOP-matched dense img/s | dense base img/s | MoE / FLOP-matched | MoE / dense base |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['spec']} ({r['note']}) | {r['img_per_s_moe']:.0f} | {r['img_per_s_dense_flops_matched']:.0f} | "
                     f"{r['img_per_s_dense_base']:.0f} | {r['moe_vs_flops_matched']:.2f}x | {r['moe_vs_dense_base']:.2f}x |")
    lines += ["", f"Milliseconds per training step (batch {rows[0]['batch'] if rows else '-'}) in each part; MoE parts are summed over the MoE layers. "
              "Profiled steps run slower than the throughput steps (profiler overhead); compare within a column.", ""]
    parts = [("forward", "forward"), ("  MoE router: gate, noise", "moe.router"), ("    allocation (top-k, capacity)", "moe.router.allocation"),
             ("    auxiliary losses", "moe.router.aux_losses"), ("    routing statistics", "moe.router.routing_stats"),
             ("  dispatch + experts + combine", "moe.dispatch_experts_combine"), ("backward", "backward"),
             ("  experts' fused backward node", "experts_backward"), ("optimizer (clip + AdamW)", "optimizer"),
             ("evaluation forward (1 batch)", "evaluation")]
    for r in rows:
        lines += [f"**{r['spec']}** ({r['flops_matched']})", "", "| part | MoE | FLOP-matched dense |", "|---|---|---|"]
        for label, key in parts:
            dense = r["profile_ms"]["dense_flops_matched"].get(key, 0.0)
            dense_text = f"{dense:.2f}" if key in ("forward", "backward", "optimizer", "evaluation") else "-"
            lines.append(f"| {label} | {r['profile_ms']['moe'][key]:.2f} | {dense_text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, from {sorted(SPECS)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="images per step (the chapters train with 256)")
    parser.add_argument("--pinned", action="store_true", help="the engine's pinned CPU numerics (vmoe_lib.numerics)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default="", help="suffix of the output files, e.g. 'before'")
    args = parser.parse_args(argv)
    if args.pinned and os.environ.get("VMOE_PROFILE_PINNED") != "1":
        # The pinning variables are read when the libraries load: restart this script under them.
        from vmoe_lib.numerics import worker_env

        env = {**worker_env(args.threads, pinned=True), "VMOE_PROFILE_PINNED": "1"}
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)
    names = [s.strip() for s in args.specs.split(",") if s.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"--specs {unknown} unknown; choose from {sorted(SPECS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()
    if args.batch < 1:
        parser.error(f"--batch {args.batch} is invalid; it must be a positive number of images")
    rows = run(names, args.steps, device, args.batch)
    from vmoe_lib.numerics import cpu_info
    from vmoe_lib.results import _git_sha, _versions

    report = {
        "benchmark": "profile_step", "rows": rows, "threads": torch.get_num_threads(), "device": str(device),
        "cpu": cpu_info(), "pinned_numerics": bool(args.pinned), "versions": _versions(), "git_sha": _git_sha(), "load_average_before": load,
        "load_average_after": os.getloadavg(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    header = (f"# One training step, profiled{f' ({args.label})' if args.label else ''}\n\n`{report['command']}` at git "
              f"{report['git_sha']}, {report['finished_at']}; {report['cpu'].get('model')}, {report['threads']} thread(s)"
              f"{', pinned numerics' if args.pinned else ''}, "
              f"load average {load[0]:.2f} before, {report['load_average_after'][0]:.2f} after.")
    text = markdown(rows, header)
    print(text)
    write_record(ROOT / "results" / "benchmarks" / device.type / f"profile_step{'_' + args.label if args.label else ''}",
                 report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
