"""Which CPU dispatch settings change training numerics, whether pinned runs are bit-identical, and what pinning costs.

Every run is a fresh process started with :func:`vmoe_lib.numerics.worker_env` (the environment the sweep
engine gives its workers), so each library picks its kernels from that environment alone. A run trains
``vmoe_vit_pico_patch7_28`` on the first Fashion-MNIST training images with the library's pieces (its
model factory, :class:`~vmoe_lib.data.BatchLoader` with augmentation, timm's AdamW as in
:mod:`vmoe_lib.train`, label smoothing, MoE auxiliary losses, gradient clipping, warm-up + cosine schedule
over a fixed horizon) and records a hash of its parameters after ``--steps`` steps (and, for the long
runs, after ``--long-steps`` steps), the seconds per step, and what the libraries report they run
(ATen capability, oneMKL CNR branch, oneDNN ISA).

Configurations, with 1 and 2 threads (the last four with ``--extra-threads``, default 2 only):

``defaults``       torch's own dispatch (the pinned keys removed)
``pinned``         :data:`~vmoe_lib.numerics.PINNED_ENV` (long run: also the speed reference)
``pinned_again``   the same, a second process: must be bit-identical to ``pinned``
``aten_only`` / ``onednn_only`` / ``mkl_cbwr_only``   one dispatch variable alone
``pinned_strict``  ``MKL_CBWR=AVX2,STRICT`` instead of ``AVX2``
``pinned_compatible``  ``MKL_CBWR=COMPATIBLE`` (the one oneMKL branch shared by Intel and AMD)
``pinned_mkl_dynamic`` the pinned set without ``MKL_DYNAMIC=FALSE``
``defaults_openblas``  defaults with ``OPENBLAS_CORETYPE=Prescott`` (a control: torch's BLAS is oneMKL)

``defaults`` and ``pinned`` also run ``--long-steps`` steps (their ``--steps`` hash is taken on the way),
one right after the other, so ``pinned / defaults`` seconds per step is the speed cost of pinning.

Usage::

    python benchmarks/bench_numerics.py                  # ~3-4 min on 2 cores
    python benchmarks/bench_numerics.py --long-steps 0   # no long runs, ~2.5 min

Writes ``results/benchmarks/cpu/numerics.json`` and ``numerics.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vmoe_lib.numerics import PINNED_ENV, cpu_info, worker_env  # noqa: E402  (does not run a torch kernel)

MODEL = "vmoe_vit_pico_patch7_28"
BATCH_SIZE = 128
SEED = 0

# name -> (pinned, extra variables on top of worker_env's result)
CONFIGS: dict[str, tuple[bool, dict[str, str]]] = {
    "defaults": (False, {}),
    "pinned": (True, {}),
    "pinned_again": (True, {}),
    "aten_only": (False, {"ATEN_CPU_CAPABILITY": PINNED_ENV["ATEN_CPU_CAPABILITY"]}),
    "onednn_only": (False, {"ONEDNN_MAX_CPU_ISA": PINNED_ENV["ONEDNN_MAX_CPU_ISA"]}),
    "mkl_cbwr_only": (False, {"MKL_CBWR": PINNED_ENV["MKL_CBWR"]}),
    "pinned_strict": (True, {"MKL_CBWR": "AVX2,STRICT"}),
    "pinned_compatible": (True, {"MKL_CBWR": "COMPATIBLE"}),
    "pinned_mkl_dynamic": (True, {"MKL_DYNAMIC": None}),  # type: ignore[dict-item]  (None: remove)
    "defaults_openblas": (False, {"OPENBLAS_CORETYPE": "Prescott"}),
}
LONG = ("defaults", "pinned")
# Further variants, run only with --extra-threads (default 2) to keep the benchmark near 4 minutes.
EXTRAS = ("pinned_strict", "pinned_compatible", "pinned_mkl_dynamic", "defaults_openblas")


# ---------------------------------------------------------------------------
# Worker: one training run in this (fresh) process


def _param_hash(tensors: list[Any]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _worker(spec: dict[str, Any]) -> None:
    from vmoe_lib.numerics import apply_threads_from_env, check_pinning_effective

    threads = apply_threads_from_env()
    problems = check_pinning_effective(probe_onednn=False)  # oneDNN is probed after training, see below

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    import vmoe_lib  # noqa: F401  (registers the models)
    from vmoe_lib.data import BatchLoader
    from vmoe_lib.layers.aux import collect_aux_loss
    from vmoe_lib.models import create_model
    from vmoe_lib.numerics import numerics_settings, onednn_isa

    data = torch.load(spec["data"])
    steps, snapshot_at, horizon = spec["steps"], spec["snapshot_at"], spec["horizon"]
    torch.manual_seed(SEED)
    model = create_model(MODEL, num_classes=10, in_chans=1)
    model.train()
    loader = BatchLoader(
        data["images"][: horizon * BATCH_SIZE], data["labels"][: horizon * BATCH_SIZE], batch_size=BATCH_SIZE,
        mean=data["mean"], std=data["std"], shuffle=True, drop_last=True, augment=True, seed=SEED,
    )
    optimizer = create_optimizer_v2(model, opt="adamw", lr=2e-3, weight_decay=0.05)
    warmup = max(1, horizon // 10)

    def factor(step: int) -> float:  # warm-up then cosine over a fixed horizon, as vmoe_lib.train
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, horizon - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    params = [p for _, p in sorted(model.named_parameters())]
    step_seconds: list[float] = []
    hashes: dict[str, str] = {}
    losses: list[float] = []
    for step, (images, labels) in enumerate(loader.epoch(0), start=1):
        if step > steps:  # the batch order is that of the full horizon, so a short run is a prefix of a long one
            break
        started = time.perf_counter()
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        aux = collect_aux_loss(model)
        if aux is not None:
            loss = loss + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - started)
        if step == snapshot_at:
            hashes[str(step)] = _param_hash(params)
            torch.save(torch.cat([p.detach().flatten() for p in params]), spec["params_prefix"] + f"_{step}.pt")
    if str(steps) not in hashes:
        hashes[str(steps)] = _param_hash(params)
        torch.save(torch.cat([p.detach().flatten() for p in params]), spec["params_prefix"] + f"_{steps}.pt")
    timed = step_seconds[3:] if len(step_seconds) > 6 else step_seconds  # the first steps warm caches up
    result = {
        "threads": threads,
        "steps": len(step_seconds),
        "hashes": hashes,
        "final_loss": losses[-1],
        "seconds_per_step_median": statistics.median(timed),
        "seconds_per_step_mean": statistics.fmean(timed),
        "train_seconds": sum(step_seconds),
        "numerics": numerics_settings(),
        "onednn_isa": onednn_isa(),
        "pinning_problems": problems,
    }
    Path(spec["out"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# Parent


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _wait_for_quiet(limit: float, max_wait: float) -> float:
    waited, load = 0.0, _load()
    while load > limit and waited < max_wait:
        print(f"load average {load:.2f} > {limit}: waiting...", flush=True)
        time.sleep(15)
        waited += 15
        load = _load()
    return load


def _prepare_data(path: Path, n: int) -> None:
    import torch

    from vmoe_lib.data import load_dataset

    data = load_dataset("fashion_mnist", val_size=5000)
    torch.save(
        {"images": data.train_images[:n].clone(), "labels": data.train_labels[:n].clone(),
         "mean": data.mean, "std": data.std},
        path,
    )


def _run_one(name: str, threads: int, steps: int, snapshot_at: int, horizon: int, tmp: Path, data: Path) -> dict[str, Any]:
    pinned, extra = CONFIGS[name]
    env = worker_env(threads, pinned=pinned)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tag = f"{name}_t{threads}_{steps}"
    spec = {"data": str(data), "steps": steps, "snapshot_at": snapshot_at, "horizon": horizon,
            "params_prefix": str(tmp / tag), "out": str(tmp / f"{tag}.json")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(Path(spec["out"]).read_text())
    shown = {k: (env.get(k)) for k in (*PINNED_ENV, *{k for k in extra if k not in PINNED_ENV})}
    result.update(config=name, env={k: v for k, v in shown.items() if v is not None},
                  process_seconds=time.perf_counter() - started, params_prefix=spec["params_prefix"])
    print(f"  {tag:28s} {result['hashes']}  {result['seconds_per_step_median'] * 1000:6.1f} ms/step  "
          f"aten={result['numerics']['cpu_capability']} mkl={result['numerics']['mkl_cbwr_effective']} "
          f"onednn={result['onednn_isa']}", flush=True)
    return result


def _max_abs_diff(prefix_a: str, prefix_b: str, step: int) -> float:
    import torch

    a, b = torch.load(f"{prefix_a}_{step}.pt"), torch.load(f"{prefix_b}_{step}.pt")
    return float((a.double() - b.double()).abs().max())


def _versions() -> dict[str, Any]:
    import numpy
    import timm
    import torch

    config = torch.__config__.show()

    def grab(pattern: str) -> str | None:
        match = re.search(pattern, config)
        return match.group(1).strip() if match else None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "blas": grab(r"BLAS_INFO=([^,]+)"),
        "mkl": grab(r"Math Kernel Library Version ([^\n]+)"),
        "onednn": grab(r"MKL-DNN (v[^\s]+)"),
        "torch_cpu_capability_build": grab(r"CPU capability usage: ([^\n]+)"),
        "numpy_blas": _numpy_blas(),
    }


def _numpy_blas() -> str | None:
    try:
        import numpy

        info = numpy.show_config(mode="dicts")  # type: ignore[call-arg]
        blas = info.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001  (informational only)
        return None


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# CPU numerics: dispatch settings, bit-identity, cost of pinning",
        "",
        f"`python benchmarks/bench_numerics.py` ({report['finished_at']}). {MODEL}, batch {BATCH_SIZE}, seed {SEED}, "
        f"{report['steps']} training steps per run (fresh process each, `vmoe_lib.numerics.worker_env`); hash = sha256 "
        f"of all parameters after {report['steps']} steps; max |diff| vs `pinned` with the same thread count.",
        "",
        f"CPU: {report['cpu']['model']} ({report['cpu']['vendor']}, family {report['cpu']['family']} model "
        f"{report['cpu']['model_number']}), AVX-512: {report['cpu']['avx512']}, {report['cpu']['logical_cores']} "
        f"logical cores. torch {report['versions']['torch']}, BLAS {report['versions']['blas']} "
        f"(oneMKL {report['versions']['mkl']}), oneDNN {report['versions']['onednn']}. Load average "
        f"{report['load_before']:.2f} before, {report['load_after']:.2f} after.",
        "",
        f"`PINNED_ENV` = `{json.dumps(report['pinned_env'])}`",
        "",
        "| config | threads | settings | ATen | oneMKL CNR | oneDNN | hash | max abs diff vs pinned | identical to pinned | ms/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        env = ", ".join(f"{k}={v}" for k, v in r["env"].items()) or "(none)"
        lines.append(
            f"| {r['config']} | {r['threads']} | {env} | {r['numerics']['cpu_capability']} | "
            f"{r['numerics']['mkl_cbwr_effective']} | {r['onednn_isa']} | `{r['hash']}` | {r['max_abs_diff_vs_pinned']:.3g} | "
            f"{'yes' if r['identical_to_pinned'] else 'no'} | {r['seconds_per_step'] * 1000:.1f} |"
        )
    if report["speed"]:
        lines += ["", f"Speed over {report['long_steps']} steps (runs back to back; median seconds per step):", "",
                  "| threads | defaults ms/step | pinned ms/step | pinned / defaults | long-run hashes: pinned vs defaults |",
                  "| --- | --- | --- | --- | --- |"]
        for s in report["speed"]:
            lines.append(f"| {s['threads']} | {s['defaults_s'] * 1000:.1f} | {s['pinned_s'] * 1000:.1f} | "
                         f"{s['ratio']:.3f} | {'identical' if s['identical'] else 'differ'} |")
    lines += ["", "Checks:", ""]
    lines += [f"* {'PASS' if ok else 'FAIL'}: {text}" for text, ok in report["checks"]]
    lines += ["", "Findings:", ""] + [f"* {f}" for f in report["findings"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--long-steps", type=int, default=200, help="0: no long runs")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--extra-threads", default="2", help=f"thread counts that also run {', '.join(EXTRAS)}")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "cpu" / "numerics.json"))
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0

    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "pinned" not in configs:
        parser.error(f"--configs must include 'pinned' and name only {sorted(CONFIGS)}; got unknown {unknown}")
    thread_counts = [int(t) for t in args.threads.split(",")]
    extra_threads = {int(t) for t in args.extra_threads.split(",") if t}
    horizon = max(args.steps, args.long_steps)
    load_before = _wait_for_quiet(args.max_load, args.max_wait)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    speed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vmoe_numerics_") as tmpdir:
        tmp = Path(tmpdir)
        data = tmp / "data.pt"
        _prepare_data(data, horizon * BATCH_SIZE)
        for threads in thread_counts:
            print(f"threads={threads}", flush=True)
            by_name: dict[str, dict[str, Any]] = {}
            long_pair = [c for c in LONG if c in configs] if args.long_steps > args.steps else []
            # pinned first (the reference), then the long defaults run right after it (side by side timing)
            order = list(dict.fromkeys(["pinned", *long_pair, *configs]))
            if threads not in extra_threads:
                order = [c for c in order if c not in EXTRAS]
            for name in order:
                steps = args.long_steps if name in long_pair else args.steps
                by_name[name] = _run_one(name, threads, steps, args.steps, horizon, tmp, data)
            ref = by_name["pinned"]
            for name in order:
                r = by_name[name]
                r["hash"] = r["hashes"][str(args.steps)]
                r["identical_to_pinned"] = r["hash"] == ref["hashes"][str(args.steps)]
                r["max_abs_diff_vs_pinned"] = _max_abs_diff(r["params_prefix"], ref["params_prefix"], args.steps)
                r["seconds_per_step"] = r["seconds_per_step_median"]
                runs.append(r)
            if len(long_pair) == 2:
                d, p = by_name["defaults"], by_name["pinned"]
                speed.append({
                    "threads": threads, "steps": args.long_steps, "defaults_s": d["seconds_per_step_median"],
                    "pinned_s": p["seconds_per_step_median"],
                    "ratio": p["seconds_per_step_median"] / d["seconds_per_step_median"],
                    "identical": d["hashes"][str(args.long_steps)] == p["hashes"][str(args.long_steps)],
                    "pinned_hash": p["hashes"][str(args.long_steps)], "defaults_hash": d["hashes"][str(args.long_steps)],
                })
        # pinned 1 vs 2 threads: is the thread count part of the result?
        cross_threads = None
        if len(thread_counts) > 1:
            refs = [r for r in runs if r["config"] == "pinned"]
            cross_threads = {
                "identical": len({r["hash"] for r in refs}) == 1,
                "max_abs_diff": _max_abs_diff(refs[0]["params_prefix"], refs[1]["params_prefix"], args.steps),
            }
    for r in runs:
        r.pop("params_prefix", None)

    info = cpu_info()
    by = {(r["config"], r["threads"]): r for r in runs}
    checks: list[tuple[str, bool]] = []
    for t in thread_counts:
        if ("pinned_again", t) in by:
            checks.append((f"two pinned processes are bit-identical ({t} thread(s))", by[("pinned_again", t)]["identical_to_pinned"]))
        if ("defaults", t) in by and info.get("avx512"):
            checks.append((f"pinned differs from defaults on this AVX-512 machine ({t} thread(s))",
                           not by[("defaults", t)]["identical_to_pinned"]))
        pinned_runs = [r for r in runs if r["config"] in ("pinned", "pinned_again") and r["threads"] == t]
        checks.append((f"every pinned process reports no pinning problem ({t} thread(s))",
                       all(not r["pinning_problems"] for r in pinned_runs)))
    findings = []
    for name in ("aten_only", "onednn_only", "mkl_cbwr_only", "defaults_openblas", "pinned_strict", "pinned_compatible",
                 "pinned_mkl_dynamic"):
        rows = [r for r in runs if r["config"] == name]
        if not rows:
            continue
        ref_name = "defaults" if name.endswith("_only") or name == "defaults_openblas" else "pinned"
        same = []
        for r in rows:
            ref = by.get((ref_name, r["threads"]))
            if ref is not None:
                same.append(f"{r['threads']}t: {'same as' if ref['hash'] == r['hash'] else 'differs from'} {ref_name}")
        findings.append(f"{name}: " + "; ".join(same))
    if cross_threads is not None:
        findings.append(f"pinned with 1 vs 2 threads: {'identical' if cross_threads['identical'] else 'different'} "
                        f"(max abs diff {cross_threads['max_abs_diff']:.3g}): the thread count is part of the result")

    report = {
        "benchmark": "numerics",
        "command": "python benchmarks/bench_numerics.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": MODEL, "batch_size": BATCH_SIZE, "seed": SEED, "steps": args.steps, "long_steps": args.long_steps,
        "pinned_env": PINNED_ENV,
        "cpu": info,
        "versions": _versions(),
        "inherited_env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("OPENBLAS_", "MKL_", "OMP_", "ONEDNN_", "DNNL_", "ATEN_", "GLIBC_TUNABLES"))},
        "load_before": load_before, "load_after": _load(),
        "total_seconds": time.perf_counter() - started,
        "runs": runs, "speed": speed, "cross_threads": cross_threads,
        "checks": checks, "findings": findings,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')} in {report['total_seconds']:.0f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
