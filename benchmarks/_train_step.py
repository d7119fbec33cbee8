"""The training step of a chapter's models, side by side: the shared part of the chapters' sizing benchmarks.

``measure`` builds each config's model, counts its costs (parameters in total and activated per image, forward FLOPs
per image), and times one training step of 128 images (forward, loss with the auxiliary loss, backward, the engine's
AdamW step) and the evaluation throughput (no gradients, batches of 1000), interleaved across the models, the
minimum over the repeats kept, on random images of the chapter's shape. ``main`` is the command line of a benchmark
that names its configs (``bench_expert_count.py``, ``bench_model_scale.py``, ``bench_image_routing.py``,
``bench_shared_experts.py``, ``bench_efficient_ensembles.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def _reexec_as_worker() -> None:
    """Run in the environment a sweep worker trains in (1 thread, pinned numerics), as the chapter's runs do."""
    if os.environ.get("VMOE_BENCH_WORKER_ENV") == "1":
        return
    from vmoe_lib.numerics import worker_env

    env = worker_env(1)
    env["VMOE_BENCH_WORKER_ENV"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def measure(configs: dict[str, Any], command: str, repeats: int, device: str, reference: str = "dense") -> dict[str, Any]:
    """Train-step and evaluation times of each config, interleaved, with the costs; ``vs_dense`` is relative to
    ``configs[reference]``."""
    import torch
    import torch.nn as nn

    from bench_moe import Device, interleaved_times, load_average
    from vmoe_lib.costs import model_costs
    from vmoe_lib.layers import collect_aux_loss, set_routing_labels
    from vmoe_lib.models import create_model
    from vmoe_lib.models.ensemble import ensemble_size, ensemble_targets
    from vmoe_lib.numerics import apply_threads_from_env, cpu_info
    from vmoe_lib.train import make_optimizer

    apply_threads_from_env()
    dev = Device(device)
    batch, shape = 128, (1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(dev.device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev.device)
    x_eval = torch.randn(1000, *shape, generator=gen).to(dev.device)
    steps, evals, costs = {}, {}, {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = create_model(config.model, num_classes=10, in_chans=1, **config.model_kwargs).to(dev.device)
        costs[name] = model_costs(model, (1, *shape))
        opt = make_optimizer(model, config)

        labelled = set_routing_labels(model, None)  # a super-class-guided router learns from the labels, as in training

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, labelled: bool = labelled) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            if labelled:
                set_routing_labels(model, y)
            loss = nn.functional.cross_entropy(model(x), ensemble_targets(y, ensemble_size(model)))  # E³: M B rows
            aux = collect_aux_loss(model)
            if labelled:
                set_routing_labels(model, None)
            (loss if aux is None else loss + aux).backward()
            opt.step()

        def evaluate(model: nn.Module = model) -> None:
            model.eval()
            with torch.no_grad():
                model(x_eval)

        steps[name], evals[name] = step, evaluate
    load_start = load_average()
    step_s = interleaved_times(steps, dev, repeats, warmup=2)
    eval_s = interleaved_times(evals, dev, max(3, repeats // 4), warmup=1)
    rows = [{"model": name, **costs[name], "step_s": step_s[name], "vs_dense": step_s[name] / step_s[reference],
             "train_images_per_s": batch / step_s[name], "eval_images_per_s": 1000 / eval_s[name]}
            for name in steps]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None
    import timm

    manifest = {"command": command + (f" --repeats {repeats}" if repeats != 20 else ""),
                "device": device, "repeats": repeats, "batch": batch, "torch": torch.__version__,
                "timm": timm.__version__, "python": platform.python_version(), "git_sha": sha,
                "platform": platform.platform(), "cpu_model": cpu_info().get("model") if device == "cpu" else None,
                "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                "load_average_end": load_average(),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return {"manifest": manifest, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | params (k) | activated (k) | MFLOPs / image | train step (ms) | vs dense | eval images/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['params_total'] / 1e3:.0f} | {r['params_activated'] / 1e3:.0f} | "
                     f"{r['flops_per_image'] / 1e6:.2f} | {1e3 * r['step_s']:.1f} | {r['vs_dense']:.2f}x | "
                     f"{r['eval_images_per_s']:.0f} |")
    m = report["manifest"]
    lines.append("")
    lines.append(f"`{m['command']}` at {str(m['git_sha'] or '')[:7]}, {m['device']}, {m['torch_threads']} thread(s), "
                 f"batch {m['batch']}, minimum of {m['repeats']} interleaved repeats; load average "
                 f"{m['load_average_start']} -> {m['load_average_end']}.")
    return "\n".join(lines) + "\n"


def main(description: str, configs: Callable[[], dict[str, Any]], script: str, record: str) -> None:
    """Command line of a sizing benchmark: ``configs()`` gives the models (a ``"dense"`` one is the reference),
    ``script`` the benchmark's path for the manifest, ``record`` the name of its table of record under
    ``results/benchmarks/<device>/``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved repeats; the minimum is kept (default 20)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write (default results/benchmarks/<device>/{record}.json)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid; it must be an int >= 1")
    if args.device == "cpu":
        _reexec_as_worker()
    from _record import write_record

    report = measure(configs(), f"python {script}", args.repeats, args.device)
    out = args.out or ROOT / "results" / "benchmarks" / args.device / f"{record}.json"
    text = markdown(report)
    print(text)
    write_record(out, report, text)
