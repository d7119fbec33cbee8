"""Speed and memory of the MoE layer, side by side with a dense MLP, its einsum reference,
peer PyTorch libraries, and end-to-end training of an MoE ViT.

Sections (all in one run, on whatever device is present or ``--device``):

``layer``
    One :class:`~vmoe_lib.layers.MoEMlp` (``backend="auto"``) per router, for
    E in {4, 8, 16}, k in {1, 2}, tokens 64x65 and 256x197, D in {192, 384} (the
    256x197 grid is trimmed to keep a full run near 15 minutes on 2 CPU cores;
    see ``layer_configs``), against two dense timm ``Mlp``: ``dense_H`` (hidden
    4D, one expert's width) and ``dense_kH`` (hidden = nominal experts per token
    x 4D, the same activated FLOPs). Forward (training mode, no grad) and
    forward+backward times, peak memory, pairs processed and drops.
    ``per_pair`` = (MoE time x tokens / pairs processed) / dense_H time: the cost
    of one processed token-expert pair relative to one token through the dense
    MLP, so dropped tokens and skipped second choices cannot flatter it. At E=8
    and D=192 the MoE time is also split into ``router`` (router alone) and
    ``experts`` (dispatch + experts on a precomputed routing).
``backends``
    The einsum reference vs the fast path on the same layer.
``peers``
    ``st-moe-pytorch``, ``mixture-of-experts`` (top-2), ``soft-moe-pytorch`` with
    identical sizes (same routing groups, FLOP-matched experts), vs our layer
    with the matching router; a peer that is missing or fails is recorded with why.
``e2e``
    Training throughput (images/s: forward, backward, AdamW step) of an MoE ViT vs
    its dense base model and the dense model with the same activated FLOPs.

Timing: candidates that are compared are measured interleaved (A, B, C, A, B, C...)
and the minimum over repeats is kept, which is robust to other jobs on a shared
machine; the load average before and after is recorded. With ``--threads auto``
(default) a CPU run uses 1 thread when the load average shows other jobs: on an
oversubscribed CPU, OpenMP threads spin waiting for descheduled peers and every
timing (dense and MoE alike) becomes 10-40x slower and meaningless. Peak memory
is the rise of glibc's allocated bytes (``mallinfo2``, sampled every
millisecond) during one forward+backward on CPU, or of
``torch.cuda.max_memory_allocated`` on CUDA.

Usage::

    python benchmarks/bench_moe.py --quick                  # a few configurations, < 1 min
    python benchmarks/bench_moe.py                          # full table, ~15 min on 2 cores
    python benchmarks/bench_moe.py --device cuda --out results/benchmarks/cuda/moe_layer.json

Writes ``--out`` (JSON, default ``results/benchmarks/<device>/moe_layer.json``, or
``moe_layer_quick.json`` with ``--quick``) and a CSV beside it, and prints the ratios.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Mlp

import vmoe_lib  # noqa: F401  (registers the models)
from vmoe_lib.layers import MoEMlp, collect_aux_loss
from vmoe_lib.routers import list_routers

ROOT = Path(__file__).resolve().parents[1]
TOKEN_CHOICE = ("softmax_token_choice", "sinkhorn_token_choice", "per_image")
EXPERT_CHOICE = ("softmax_expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice")
IMAGES_PER_GROUP = 8  # V-MoE's routing groups (soft and per_image: one image per group)
TARGETS = {"sparse_per_pair": 1.10, "soft_per_pair": 1.25, "fast_vs_einsum_speedup": 2.0}


# --------------------------------------------------------------------------- measuring
class Device:
    def __init__(self, name: str) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def interleaved_times(fns: dict[str, Callable[[], Any]], dev: Device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Minimum wall time (s) of each function, measured in turns so load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    dev.sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dev.sync()
            start = time.perf_counter()
            fn()
            dev.sync()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader() -> Callable[[], int] | None:
    """Bytes currently allocated by glibc malloc (all arenas + mmapped chunks), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def allocated() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return allocated


_HEAP_BYTES = _heap_reader()


def peak_memory(fn: Callable[[], Any], dev: Device) -> int | None:
    """Peak extra memory (bytes) of one call: CUDA allocator peak, or on CPU the peak of
    glibc's allocated bytes (mallinfo2, sampled every millisecond) above the level before."""
    gc.collect()
    if dev.cuda:
        torch.cuda.synchronize(dev.device)
        torch.cuda.reset_peak_memory_stats(dev.device)
        base = torch.cuda.memory_allocated(dev.device)
        fn()
        torch.cuda.synchronize(dev.device)
        return torch.cuda.max_memory_allocated(dev.device) - base
    if _HEAP_BYTES is None:
        return None
    base = _HEAP_BYTES()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _HEAP_BYTES())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _HEAP_BYTES()) - base


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------ layers
def nominal_experts_per_token(router: str, k: int, tokens_per_image: int, num_experts: int) -> float:
    """Expert applications per token the configuration asks for (before drops)."""
    if router == "soft":
        return num_experts * slots_per_expert(k, tokens_per_image, num_experts) / tokens_per_image
    return float(k)  # token choice / per-image: k; expert choice: capacity factor = k


def slots_per_expert(k: int, tokens_per_image: int, num_experts: int) -> int:
    """Soft MoE slots per expert so that E*P ~ k tokens per token (compute-matched to top-k)."""
    return math.ceil(k * tokens_per_image / num_experts)


def build_moe(router: str, D: int, E: int, k: int, T: int, backend: str = "auto", device: torch.device | None = None) -> MoEMlp:
    options: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if router in TOKEN_CHOICE:
        kwargs["k"] = k
    elif router in EXPERT_CHOICE:
        kwargs["capacity_factor"] = float(k)  # k experts per token on average (arXiv:2202.09368)
    elif router == "soft":
        options["slots_per_expert"] = slots_per_expert(k, T, E)
    group = 1 if router in ("soft", "per_image") else IMAGES_PER_GROUP
    layer = MoEMlp(D, 4 * D, num_experts=E, router=router, router_options=options, group_size=group, backend=backend, **kwargs)
    return layer.to(device).train()


def _fb(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        loss = (y * grad).sum()
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            loss = loss + aux
        loss.backward()

    return run


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def layer_configs(quick: bool) -> list[dict[str, Any]]:
    routers = list_routers()
    if quick:
        return [dict(B=64, T=65, D=192, E=8, k=k, router=r) for r in ("softmax_token_choice", "soft") for k in (1, 2)]
    configs = []
    for B, T in ((64, 65), (256, 197)):
        for D in (192, 384):
            for E in (4, 8, 16):
                for k in (1, 2):
                    for router in routers:
                        big = (B, T) == (256, 197)
                        # time budget: at 256x197 every router at E=8, D=192; for V-MoE's router also
                        # E=4/16 (D=192, k=2) and D=384 (E=8)
                        if big and not (
                            (E == 8 and D == 192)
                            or (router == "softmax_token_choice" and ((E != 8 and D == 192 and k == 2) or (E == 8 and D == 384)))
                        ):
                            continue
                        configs.append(dict(B=B, T=T, D=D, E=E, k=k, router=router))
    return configs


def bench_layer(cfg: dict[str, Any], dev: Device, repeats: int, attribute: bool) -> dict[str, Any]:
    B, T, D, E, k, router = cfg["B"], cfg["T"], cfg["D"], cfg["E"], cfg["k"], cfg["router"]
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=dev.device, requires_grad=True)
    grad = torch.randn(B, T, D, device=dev.device)
    moe = build_moe(router, D, E, k, T, device=dev.device)
    per_token = nominal_experts_per_token(router, k, T, E)
    dense_h = Mlp(D, 4 * D).to(dev.device)
    dense_kh = Mlp(D, round(per_token * 4 * D)).to(dev.device)
    fns = {"dense_H": _fb(dense_h, x, grad), "dense_kH": _fb(dense_kh, x, grad), "moe": _fb(moe, x, grad)}
    fb = interleaved_times(fns, dev, repeats)
    fwd = interleaved_times({"dense_H": _fwd(dense_h, x), "moe": _fwd(moe, x)}, dev, repeats)
    moe_fb = _fb(moe, x, grad)
    mem_moe = peak_memory(moe_fb, dev)
    mem_dense = peak_memory(fns["dense_kH"], dev)
    tokens = B * T
    pairs = moe.last_dispatch.pairs
    nominal_pairs = per_token * tokens
    row: dict[str, Any] = {
        **cfg,
        "tokens": tokens,
        "backend": moe.last_dispatch.backend,
        "pairs": pairs,
        "nominal_pairs": round(nominal_pairs),
        "choices_dropped": round(1 - pairs / nominal_pairs, 4),
        "tokens_dropped": round(float(moe.last_metrics.get("dropped_fraction", torch.tensor(0.0))), 4),
        "fb_dense_H_ms": 1e3 * fb["dense_H"],
        "fb_dense_kH_ms": 1e3 * fb["dense_kH"],
        "fb_moe_ms": 1e3 * fb["moe"],
        "fwd_dense_H_ms": 1e3 * fwd["dense_H"],
        "fwd_moe_ms": 1e3 * fwd["moe"],
        "fb_per_pair": (fb["moe"] * tokens / pairs) / fb["dense_H"],
        "fwd_per_pair": (fwd["moe"] * tokens / pairs) / fwd["dense_H"],
        "fb_vs_flops_matched": fb["moe"] / fb["dense_kH"],
        "peak_mem_moe_mb": None if mem_moe is None else mem_moe / 2**20,
        "peak_mem_dense_kH_mb": None if mem_dense is None else mem_dense / 2**20,
    }
    if attribute:
        row.update(attribute_time(moe, x, grad, dev, repeats, fb["dense_H"], tokens))
    return row


def attribute_time(moe: MoEMlp, x: torch.Tensor, grad: torch.Tensor, dev: Device, repeats: int, dense_s: float, tokens: int) -> dict[str, Any]:
    """Split the layer's forward+backward into the router alone and dispatch+experts alone."""
    from vmoe_lib.layers import dispatch_combine, images_per_group

    B, T, D = x.shape
    per_group = images_per_group(B, moe.group_size)
    xg = x.detach().reshape(B // per_group, per_group * T, D).requires_grad_(True)
    gg = grad.reshape(xg.shape)
    with torch.no_grad():
        routing = moe.router(xg)
    weight_name = "combine_weight" if routing.is_sparse else "combine_dense"
    setattr(routing, weight_name, getattr(routing, weight_name).detach().requires_grad_(True))

    def router_only() -> None:
        xg.grad = None
        r = moe.router(xg)
        w = r.combine_weight if r.is_sparse else r.combine_dense + r.dispatch_dense
        (w.sum() + r.aux_loss).backward()

    def experts_only() -> None:
        xg.grad = None
        y, _ = dispatch_combine(xg, routing, moe.experts, moe.backend)
        y.backward(gg)

    t = interleaved_times({"router": router_only, "experts": experts_only}, dev, repeats)
    pairs = routing.expert_index.numel() if routing.is_sparse else routing.dispatch_dense.shape[0] * routing.dispatch_dense.shape[2] * routing.dispatch_dense.shape[3]
    return {
        "fb_router_ms": 1e3 * t["router"],
        "fb_experts_ms": 1e3 * t["experts"],
        "router_vs_dense_H": t["router"] / dense_s,
        "experts_per_pair": (t["experts"] * tokens / pairs) / dense_s,
    }


# ---------------------------------------------------------------------------- backends
def bench_backends(configs: list[dict[str, Any]], dev: Device, repeats: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for cfg in configs:
        B, T, D, E, k, router = cfg["B"], cfg["T"], cfg["D"], cfg["E"], cfg["k"], cfg["router"]
        torch.manual_seed(0)
        x = torch.randn(B, T, D, device=dev.device, requires_grad=True)
        grad = torch.randn(B, T, D, device=dev.device)
        fast = build_moe(router, D, E, k, T, "auto", dev.device)
        reference = build_moe(router, D, E, k, T, "einsum", dev.device)
        reference.load_state_dict(fast.state_dict())
        reps = 1 if B * T > 20_000 else repeats
        t = interleaved_times({"einsum": _fb(reference, x, grad), "fast": _fb(fast, x, grad)}, dev, reps)
        row = {
            **cfg,
            "fast_backend": fast.last_dispatch.backend,
            "fb_einsum_ms": 1e3 * t["einsum"],
            "fb_fast_ms": 1e3 * t["fast"],
            "speedup": t["einsum"] / t["fast"],
            "peak_mem_einsum_mb": _mb(peak_memory(_fb(reference, x, grad), dev)),
            "peak_mem_fast_mb": _mb(peak_memory(_fb(fast, x, grad), dev)),
        }
        log(f"backends {router} {B}x{T} D={D} E={E} k={k}: einsum {row['fb_einsum_ms']:.0f} ms, fast {row['fb_fast_ms']:.0f} ms -> {row['speedup']:.2f}x")
        rows.append(row)
    return rows


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


# ------------------------------------------------------------------------------- peers
class _GroupedInput(nn.Module):
    """Feeds a peer layer (G, S, D) routing groups of IMAGES_PER_GROUP images, like ours."""

    def __init__(self, layer: nn.Module, images_per_group: int) -> None:
        super().__init__()
        self.layer, self.images_per_group = layer, images_per_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        out = self.layer(x.reshape(B // self.images_per_group, self.images_per_group * T, D))
        out = out[0] if isinstance(out, tuple) else out
        if hasattr(out, "output"):
            out = out.output
        return out.reshape(B, T, D)


def build_peer(name: str, D: int, E: int, k: int, T: int) -> tuple[nn.Module, Callable[[torch.Tensor], int], str]:
    """(peer layer on (B, T, D), pairs counter, our router to compare with)."""
    if name == "st-moe-pytorch":
        from st_moe_pytorch import MoE

        # GEGLU experts with hidden 2/3 * 4D: the same FLOPs per token as a 4D GELU MLP.
        layer = MoE(dim=D, num_experts=E, gating_top_n=k, expert_hidden_mult=4, capacity_factor_train=1.05)
        wrapped = _GroupedInput(layer, IMAGES_PER_GROUP)

        def pairs(x: torch.Tensor) -> int:
            with torch.no_grad():
                dispatch = layer.gate(x.reshape(x.shape[0] // IMAGES_PER_GROUP, -1, D))[0]
            return int(dispatch.sum())

        return wrapped, pairs, "softmax_token_choice"
    if name == "mixture-of-experts":
        from mixture_of_experts import MoE

        if k != 2:
            raise ValueError("mixture-of-experts routes top-2 only")
        layer = MoE(dim=D, num_experts=E, hidden_dim=4 * D, activation=nn.GELU, capacity_factor_train=1.05)
        wrapped = _GroupedInput(layer, IMAGES_PER_GROUP)

        def pairs(x: torch.Tensor) -> int:
            with torch.no_grad():
                dispatch = layer.gate(x.reshape(x.shape[0] // IMAGES_PER_GROUP, -1, D))[0]
            return int(dispatch.sum())

        return wrapped, pairs, "softmax_token_choice"
    if name == "soft-moe-pytorch":
        from soft_moe_pytorch import SoftMoE

        P = slots_per_expert(k, T, E)
        layer = SoftMoE(dim=D, num_experts=E, num_slots=P, expert_mult=4)
        return layer, (lambda x: x.shape[0] * E * P), "soft"
    raise ValueError(name)


PEERS = ("st-moe-pytorch", "mixture-of-experts", "soft-moe-pytorch")


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def bench_peers(configs: list[dict[str, Any]], dev: Device, repeats: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for cfg in configs:
        B, T, D, E, k = cfg["B"], cfg["T"], cfg["D"], cfg["E"], cfg["k"]
        for peer in PEERS:
            row: dict[str, Any] = {**cfg, "peer": peer, "version": _package_version(peer)}
            try:
                torch.manual_seed(0)
                layer, count_pairs, ours_name = build_peer(peer, D, E, k, T)
                layer = layer.to(dev.device).train()
                ours = build_moe(ours_name, D, E, k, T, device=dev.device)
                dense = Mlp(D, 4 * D).to(dev.device)
                x = torch.randn(B, T, D, device=dev.device, requires_grad=True)
                grad = torch.randn(B, T, D, device=dev.device)
                reps = max(1, repeats // 2) if B * T > 20_000 else repeats
                t = interleaved_times({"dense": _fb(dense, x, grad), "peer": _fb(layer, x, grad), "ours": _fb(ours, x, grad)}, dev, reps)
                peer_pairs = count_pairs(x)
                row.update(
                    router=ours_name,
                    fb_dense_H_ms=1e3 * t["dense"],
                    fb_peer_ms=1e3 * t["peer"],
                    fb_ours_ms=1e3 * t["ours"],
                    peer_pairs=peer_pairs,
                    ours_pairs=ours.last_dispatch.pairs,
                    peer_per_pair=(t["peer"] * B * T / max(peer_pairs, 1)) / t["dense"],
                    ours_per_pair=(t["ours"] * B * T / ours.last_dispatch.pairs) / t["dense"],
                    status="ok",
                )
                row["ours_faster_per_pair"] = row["ours_per_pair"] < row["peer_per_pair"]
                log(f"peer {peer} {B}x{T} E={E} k={k}: per pair peer {row['peer_per_pair']:.2f} vs ours {row['ours_per_pair']:.2f}")
            except Exception as error:  # noqa: BLE001  (a failing peer is a result, not a crash)
                row.update(status="failed", error=f"{type(error).__name__}: {error}"[:300])
                log(f"peer {peer} {B}x{T} E={E} k={k}: {row['error']}")
                if not isinstance(error, (ImportError, ValueError)):
                    traceback.print_exc()
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------- e2e
def bench_e2e(specs: list[dict[str, Any]], dev: Device, steps: int, log: Callable[[str], None]) -> list[dict]:
    import timm

    from vmoe_lib.models import flops_matched_dense, flops_per_image
    from vmoe_lib.train import TrainConfig, make_optimizer

    rows = []
    for spec in specs:
        torch.manual_seed(0)
        moe = timm.create_model(spec["moe"], **spec["moe_kwargs"]).to(dev.device)
        dense = timm.create_model(spec["dense"]).to(dev.device)
        matched = flops_matched_dense(moe).to(dev.device)
        models = {"moe": moe, "dense": dense, "dense_flops_matched": matched}
        shape = spec["input"]
        x = torch.randn(spec["batch"], *shape, device=dev.device)
        y = torch.randint(0, 10, (spec["batch"],), device=dev.device)
        steppers = {}
        for name, model in models.items():
            model.train()
            opt = make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))  # the engine's (fused) AdamW

            def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                aux = collect_aux_loss(model)
                (loss if aux is None else loss + aux).backward()
                opt.step()

            steppers[name] = step
        t = interleaved_times(steppers, dev, steps, warmup=2)
        flops = {name: flops_per_image(m.to(dev.device), shape)["flops_per_image"] if name == "moe" else None for name, m in models.items()}
        row = {
            "moe_model": spec["moe"],
            "moe_kwargs": spec["moe_kwargs"],
            "dense_model": spec["dense"],
            "flops_matched_dense": matched.description,
            "batch": spec["batch"],
            **{f"images_per_s_{name}": spec["batch"] / t[name] for name in models},
            "moe_flops_per_image": flops["moe"],
        }
        row["moe_vs_dense_throughput"] = row["images_per_s_moe"] / row["images_per_s_dense"]
        row["moe_vs_flops_matched_throughput"] = row["images_per_s_moe"] / row["images_per_s_dense_flops_matched"]
        log(f"e2e {spec['moe']}: {row['images_per_s_moe']:.0f} img/s vs dense {row['images_per_s_dense']:.0f}, flops-matched {row['images_per_s_dense_flops_matched']:.0f}")
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- main
def manifest(dev: Device, args: argparse.Namespace, free_flag: bool) -> dict[str, Any]:
    import timm

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None
    info: dict[str, Any] = {
        "command": "python benchmarks/bench_moe.py" + (" --quick" if args.quick else ""),
        "device": str(dev.device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vmoe_lib": vmoe_lib.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "quiet_flag_seen": free_flag,
        "load_average_start": load_average(),
    }
    try:
        info["uptime_start"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if dev.cuda:
        info["gpu"] = torch.cuda.get_device_name(dev.device)
    return info


def wait_for_flag(path: str | None, minutes: float, log: Callable[[str], None]) -> bool:
    if not path:
        return False
    deadline = time.time() + 60 * minutes
    while not os.path.exists(path):
        if time.time() > deadline:
            log(f"{path} did not appear in {minutes} min; running anyway (load recorded)")
            return False
        log(f"waiting for {path} (load {load_average()})")
        time.sleep(30)
    return True


def summarise(layer_rows: list[dict], backend_rows: list[dict], peer_rows: list[dict]) -> dict[str, Any]:
    """The issue's targets, checked on the rows at E=8 (per-pair forward+backward cost)."""
    checks = []
    for row in layer_rows:
        if row["E"] != 8:
            continue
        limit = TARGETS["soft_per_pair"] if row["router"] == "soft" else TARGETS["sparse_per_pair"]
        checks.append({
            "what": f"{row['router']} {row['B']}x{row['T']} D={row['D']} k={row['k']}",
            "fb_per_pair": round(row["fb_per_pair"], 3),
            "target": limit,
            "met": row["fb_per_pair"] <= limit,
            "experts_per_pair": round(row["experts_per_pair"], 3) if "experts_per_pair" in row else None,
            "router_vs_dense_H": round(row["router_vs_dense_H"], 3) if "router_vs_dense_H" in row else None,
        })
    for row in backend_rows:
        if (row["B"], row["T"]) == (256, 197):
            checks.append({"what": f"fast vs einsum {row['router']} 256x197", "speedup": round(row["speedup"], 2), "target": TARGETS["fast_vs_einsum_speedup"], "met": row["speedup"] >= TARGETS["fast_vs_einsum_speedup"]})
    for row in peer_rows:
        if row.get("status") == "ok":
            checks.append({"what": f"vs {row['peer']} {row['B']}x{row['T']} E={row['E']} k={row['k']}", "ours_per_pair": round(row["ours_per_pair"], 3), "peer_per_pair": round(row["peer_per_pair"], 3), "met": row["ours_faster_per_pair"]})
    return {"targets": TARGETS, "checks": checks, "met": sum(c["met"] for c in checks), "total": len(checks)}


def print_table(rows: list[dict], columns: list[str], title: str) -> None:
    print(f"\n== {title}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_csv(path: Path, sections: dict[str, list[dict]]) -> None:
    keys: list[str] = ["section"]
    for rows in sections.values():
        for row in rows:
            keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for section, rows in sections.items():
            for row in rows:
                writer.writerow({"section": section, **{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations (< 1 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (CSV written beside it)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5 at 64x65 tokens, 2 at 256x197)")
    parser.add_argument(
        "--threads", default="auto",
        help="torch CPU threads; 'auto': torch's default on an idle machine, 1 when the load average "
        "shows other jobs (oversubscribed OpenMP threads spin and distort every timing)",
    )
    parser.add_argument("--sections", default="layer,backends,peers,e2e")
    parser.add_argument("--filter", default=None, help="only layer configurations matching e.g. 'B=256,E=8,D=192'")
    parser.add_argument("--wait-for", default=None, help="wait until this file exists before measuring (quiet machine)")
    parser.add_argument("--wait-minutes", type=float, default=45.0)
    args = parser.parse_args()
    dev = Device(args.device)
    sections = set(args.sections.split(","))
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    free_flag = wait_for_flag(args.wait_for, args.wait_minutes, log)
    load = load_average()
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    elif dev.device.type == "cpu" and load is not None and load[0] > 0.5 * (os.cpu_count() or 1):
        torch.set_num_threads(1)
        log(f"load average {load}: other jobs are running, measuring with 1 thread (--threads to override)")
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / dev.device.type / ("moe_layer_quick.json" if args.quick else "moe_layer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"manifest": manifest(dev, args, free_flag)}

    def save() -> None:  # after every section, so an interrupted run keeps what it measured
        result["manifest"]["load_average_end"] = load_average()
        result["manifest"]["wall_s"] = round(time.time() - started, 1)
        out.write_text(json.dumps(result, indent=1, default=str))

    layer_rows: list[dict] = []
    if "layer" in sections:
        wanted = dict(item.split("=") for item in args.filter.split(",")) if args.filter else {}
        for cfg in layer_configs(args.quick):
            if any(str(cfg[key]) != value for key, value in wanted.items()):
                continue
            big = cfg["B"] * cfg["T"] > 20_000
            repeats = args.repeats or (2 if big else 5)
            row = bench_layer(cfg, dev, repeats, attribute=cfg["E"] == 8 and cfg["D"] == 192)
            layer_rows.append(row)
            extra = f", router {row['router_vs_dense_H']:.2f}x dense, experts {row['experts_per_pair']:.2f}/pair" if "experts_per_pair" in row else ""
            log(f"layer {cfg['router']} {cfg['B']}x{cfg['T']} D={cfg['D']} E={cfg['E']} k={cfg['k']}: per pair {row['fb_per_pair']:.2f} (fwd {row['fwd_per_pair']:.2f}), vs FLOP-matched {row['fb_vs_flops_matched']:.2f}, drops {row['choices_dropped']:.3f}{extra}")
    result["layer"] = layer_rows
    save()

    backend_cfgs = [dict(B=64, T=65, D=192, E=8, k=2, router=r) for r in ("softmax_token_choice", "soft")]
    if not args.quick:
        backend_cfgs.append(dict(B=256, T=197, D=192, E=8, k=2, router="softmax_token_choice"))
    result["backends"] = bench_backends(backend_cfgs, dev, args.repeats or 3, log) if "backends" in sections else []
    save()

    peer_cfgs = [dict(B=64, T=65, D=192, E=8, k=2)]
    if not args.quick:
        peer_cfgs += [dict(B=64, T=65, D=192, E=8, k=1), dict(B=256, T=197, D=192, E=8, k=2)]
    result["peers"] = bench_peers(peer_cfgs, dev, args.repeats or 3, log) if "peers" in sections else []
    save()

    e2e_specs = [dict(moe="vmoe_vit_pico_patch7_28", moe_kwargs=dict(num_experts=8, k=2), dense="vit_pico_patch7_28", input=(1, 28, 28), batch=128)]
    if not args.quick:
        e2e_specs.append(dict(moe="vmoe_vit_tiny_patch4_32", moe_kwargs=dict(num_experts=8, k=2), dense="vit_tiny_patch4_32", input=(1, 32, 32), batch=64))
    result["e2e"] = bench_e2e(e2e_specs, dev, 4 if args.quick else 6, log) if "e2e" in sections else []

    result["summary"] = summarise(result["layer"], result["backends"], result["peers"])
    save()
    write_csv(out.with_suffix(".csv"), {k: result[k] for k in ("layer", "backends", "peers", "e2e")})

    print_table(result["layer"], ["router", "B", "T", "D", "E", "k", "backend", "choices_dropped", "fb_per_pair", "fwd_per_pair", "fb_vs_flops_matched", "router_vs_dense_H", "experts_per_pair", "peak_mem_moe_mb", "peak_mem_dense_kH_mb"], "layer: forward+backward cost per processed pair (x dense MLP per token)")
    print_table(result["backends"], ["router", "B", "T", "fast_backend", "fb_einsum_ms", "fb_fast_ms", "speedup", "peak_mem_einsum_mb", "peak_mem_fast_mb"], "einsum reference vs fast path")
    print_table(result["peers"], ["peer", "version", "B", "T", "E", "k", "status", "peer_per_pair", "ours_per_pair", "error"], "peer libraries (per processed pair, x dense MLP)")
    print_table(result["e2e"], ["moe_model", "images_per_s_moe", "images_per_s_dense", "images_per_s_dense_flops_matched", "moe_vs_dense_throughput", "moe_vs_flops_matched_throughput"], "end-to-end training throughput")
    summary = result["summary"]
    print(f"\ntargets met: {summary['met']}/{summary['total']}; load average start {result['manifest']['load_average_start']} end {result['manifest']['load_average_end']}")
    print(f"wrote {out} and {out.with_suffix('.csv')} in {result['manifest']['wall_s']} s")


if __name__ == "__main__":
    main()
