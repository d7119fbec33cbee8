"""Allocation time of every router for V-MoE-sized routing groups.

Setting: G=64 groups of S=65 tokens (one 224px image at patch 32: 64 patches + class
token), E=8 experts, D=192, k=2 where a router has a k. For each router it times
(median over repeats, in milliseconds):

* ``alloc``: the pure allocation step on precomputed logits (softmax/Sinkhorn/OT + the
  top-k / top-C assignment), i.e. what differs between routers;
* ``forward``: the full router forward in training mode (gate, noise, allocation, compact
  routing, auxiliary losses and metrics);
* ``fwd+bwd``: forward plus backward of ``sum(combine weights) + aux_loss``.

Usage::

    python benchmarks/bench_routers.py [--device cpu] [--repeats 30] [--threads N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

import vmoe_lib.routers as R
from vmoe_lib.routers.ops import stable_top_k

G, S, E, D, K = 64, 65, 8, 192, 2


def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn: Callable[[], object], repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return measure


def allocation_functions(logits: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The allocation step of each router on fixed logits ``(G, S, E)`` (tokens ``x`` for Soft MoE)."""
    tc_capacity = R.compute_capacity(S * K, E, 1.05)  # 20
    ec_capacity = R.compute_capacity(S, E, 2.0)  # 20
    mu = torch.randn(D, E, 1, device=x.device)
    image_logits = logits.mean(1)  # (G, E) stand-in for the pooled image logits
    return {
        "softmax_token_choice": lambda: R.top_k_token_choice(torch.softmax(logits, -1), K, tc_capacity),
        "softmax_token_choice+bpr": lambda: R.top_k_token_choice(torch.softmax(logits, -1), K, tc_capacity, True),
        "sinkhorn_token_choice": lambda: R.top_k_token_choice(R.sinkhorn(logits), K, tc_capacity),
        "softmax_expert_choice": lambda: R.expert_choice(torch.softmax(logits, -1), ec_capacity),
        "sinkhorn_expert_choice": lambda: R.expert_choice(R.sinkhorn(logits), ec_capacity),
        "sparse_expert_choice": lambda: R.sparse_expert_choice(torch.softmax(logits, -1), ec_capacity),
        "soft": lambda: R.soft_moe_weights(x, mu, 1.0),
        "per_image": lambda: stable_top_k(torch.softmax(image_logits, -1), K),
    }


def router_options(name: str) -> tuple[str, dict]:
    if name == "softmax_token_choice+bpr":
        return "softmax_token_choice", {"k": K, "batch_priority": True}
    return name, ({"k": K} if "k" in R.router_options(name) else {})


def run(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    measure = _timer(device)
    x = torch.randn(G, S, D, device=device)
    logits = torch.randn(G, S, E, device=device)
    rows = []
    with torch.no_grad():
        allocations = allocation_functions(logits, x)
    for label, alloc in allocations.items():
        name, options = router_options(label)
        router = R.create_router(name, dim=D, num_experts=E, **options).to(device).train()
        with torch.no_grad():
            alloc_ms = measure(alloc, repeats, warmup)
            forward_ms = measure(lambda: router(x), repeats, warmup)

        def step() -> None:
            router.zero_grad(set_to_none=True)
            routing = router(x)
            _, combine = routing.dense() if not routing.is_sparse else (None, routing.combine_weight)
            (combine.sum() + routing.aux_loss).backward()

        backward_ms = measure(step, repeats, warmup)
        rows.append({"router": label, "alloc_ms": alloc_ms, "forward_ms": forward_ms, "fwd_bwd_ms": backward_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = run(device, args.repeats, args.warmup)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"G={G} S={S} E={E} D={D} k={K}  device={device}  torch={torch.__version__}", end="  ")
    print(f"threads={torch.get_num_threads()}")
    print(f"load average before/after: {load_before} / {load_after}")
    print(f"{'router':28s} {'alloc ms':>10s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    for row in rows:
        print(f"{row['router']:28s} {row['alloc_ms']:10.2f} {row['forward_ms']:11.2f} {row['fwd_bwd_ms']:11.2f}")
    if args.out:
        record = {
            "setting": {"G": G, "S": S, "E": E, "D": D, "k": K, "repeats": args.repeats, "statistic": "median"},
            "device": str(device),
            "device_name": (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or platform.machine()
            ),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": rows,
        }
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
