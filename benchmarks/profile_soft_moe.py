"""Where a Soft MoE layer's time goes, and the floor its own matmuls set (issue "MoE training speed").

Soft MoE (arXiv:2308.00951) must compute, besides its experts, three matmuls no implementation can
skip: the router logits ``x_n @ mu_n`` (``(G*S, D) x (D, E*P)``), the dispatch ``dispatch^T @ x``
(each slot a mix of its image's ``S`` tokens) and the combine ``combine @ slot_outputs``. Per slot
their forward costs ``3 * S * D`` multiply-adds against the expert's ``2 * D * H``: a share of
``1.5 * S / H`` of the experts' work (0.38 at ``S = 197``, ``H = 768``), backward alike. So per
processed slot, the layer cannot cost less than about ``1 + 1.5 S / H`` dense-MLP tokens, whatever
the kernels do.

This script times, interleaved and forward+backward on one thread (min over ``--repeats``):

* ``dense``: timm's ``Mlp(D, 4D)`` on the ``B*T`` tokens (the per-pair unit of ``bench_moe.py``);
* ``layer``: our ``MoEMlp(router="soft")``, exactly as ``bench_moe.py`` builds it;
* ``experts``: the expert bank alone on ``(E, B*P, D)`` slots;
* ``matmuls``: the three unavoidable matmuls alone, with their backward, on tensors of the layer's shapes.

and reports per processed slot: ``layer`` (what ``bench_moe.py`` reports as ``fb_per_pair``),
``floor`` = ``experts + matmuls`` (no softmax, no normalisation, no layout copies, nothing else) and the
rest. Writes ``results/benchmarks/<device>/soft_moe_floor.{json,md}``.

    .venv/bin/python benchmarks/profile_soft_moe.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from timm.layers import Mlp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import write_record  # noqa: E402
from bench_moe import TARGETS, build_moe, load_average  # noqa: E402


SIZES = ((64, 65), (256, 197))  # (images, tokens per image): bench_moe.py's two layer sizes
TARGET_256 = 1.40  # the Soft MoE target at 256x197 (1.25 at 64x65 is bench_moe.TARGETS)


def _timer(fn: Callable[[], None]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def _fb(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return run


def _matmuls(G: int, S: int, D: int, slots: int) -> Callable[[], None]:
    """Forward and backward of the logits, dispatch and combine matmuls alone, at the layer's shapes."""
    x = torch.randn(G, S, D, requires_grad=True)
    mu = torch.randn(D, slots, requires_grad=True)
    dispatch = torch.rand(G, S, slots, requires_grad=True)
    combine = torch.rand(G, S, slots, requires_grad=True)
    slot_out = torch.randn(G, slots, D, requires_grad=True)
    grad_logits = torch.randn(G * S, slots)
    grad_slots = torch.randn(G, slots, D)
    grad_y = torch.randn(G, S, D)

    def run() -> None:
        for tensor in (x, mu, dispatch, combine, slot_out):
            tensor.grad = None
        logits = x.reshape(G * S, D) @ mu
        slots_in = torch.bmm(dispatch.transpose(1, 2), x)
        y = torch.bmm(combine, slot_out)
        torch.autograd.backward([logits, slots_in, y], [grad_logits, grad_slots, grad_y])

    return run


def measure(B: int, T: int, D: int, E: int, k: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    layer = build_moe("soft", D, E, k, T)
    P = layer.router.slots_per_expert
    dense = Mlp(D, 4 * D)
    x = torch.randn(B, T, D, requires_grad=True)
    grad = torch.randn(B, T, D)
    slots = torch.randn(E, B * P, D, requires_grad=True)
    grad_slots = torch.randn(E, B * P, D)
    candidates = {
        "dense": _timer(_fb(dense, x, grad)),
        "layer": _timer(_fb(layer, x, grad)),
        "experts": _timer(_fb(layer.experts, slots, grad_slots)),
        "matmuls": _timer(_matmuls(B, T, D, E * P)),
    }
    for run in candidates.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            times[name].append(run())
    best = {name: min(values) for name, values in times.items()}
    per_slot = T / (E * P) / best["dense"]  # time -> dense-token units per processed slot
    floor = (best["experts"] + best["matmuls"]) * per_slot
    return {
        "B": B, "T": T, "D": D, "E": E, "k": k, "P": P, "slots_per_image": E * P,
        "seconds": best,
        "layer_per_pair": best["layer"] * per_slot,
        "experts_per_pair": best["experts"] * per_slot,
        "matmuls_per_pair": best["matmuls"] * per_slot,
        "floor_per_pair": floor,
        "rest_per_pair": best["layer"] * per_slot - floor,
        "analytic_floor": 1 + 1.5 * T / (4 * D),
        "target": TARGETS["soft_per_pair"] if T * B < 10_000 else TARGET_256,
    }


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# Soft MoE: the layer against the floor of its own matmuls",
        "",
        f"`{meta['command'].strip()}` at git {meta['git']}, {meta['when']}, {meta['cpu']}, {meta['threads']} thread, "
        f"torch {meta['torch']}, load average {meta['load_average_start']} -> {meta['load_average_end']}. Forward+backward, "
        f"min over {meta['repeats']} interleaved repeats; D = 192, E = 8, P slots per expert so that E x P ~ k x T. "
        "Every column is time per processed slot over a dense MLP's time per token (`bench_moe.py`'s `fb_per_pair`).",
        "",
        "| images x tokens | k | slots/image | layer | experts alone | 3 matmuls alone | floor = experts + matmuls | "
        "analytic floor 1 + 1.5 S/H | rest (softmaxes, normalisation, copies) | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['B']}x{row['T']} | {row['k']} | {row['slots_per_image']} | {row['layer_per_pair']:.2f} | "
            f"{row['experts_per_pair']:.2f} | {row['matmuls_per_pair']:.2f} | {row['floor_per_pair']:.2f} | "
            f"{row['analytic_floor']:.2f} | {row['rest_per_pair']:.2f} | <= {row['target']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "cpu" / "soft_moe_floor")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats={args.repeats} and --threads={args.threads} must both be >= 1")
    torch.set_num_threads(args.threads)
    from vmoe_lib.numerics import cpu_info
    from vmoe_lib.results import _git_sha, _versions

    meta: dict[str, Any] = {
        "git": (_git_sha() or "?")[:7], "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_info().get("model", "?"), "threads": torch.get_num_threads(), "versions": _versions(),
        "torch": torch.__version__, "repeats": args.repeats, "load_average_start": load_average(),
        "command": "python benchmarks/profile_soft_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = []
    for B, T in SIZES:
        for k in (1, 2):
            row = measure(B, T, 192, 8, k, args.repeats)
            print(f"{B}x{T} k={k}: layer {row['layer_per_pair']:.2f}, floor {row['floor_per_pair']:.2f}")
            rows.append(row)
    meta["load_average_end"] = load_average()
    report = {"meta": meta, "rows": rows}
    write_record(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
