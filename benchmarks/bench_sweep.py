"""Sweep throughput: one worker with every thread vs one worker per core, on a real chapter's runs.

The same slice of a chapter's sweep (its first ``--runs`` (config, seed) pairs, in sweep order) is
trained twice, side by side in one invocation, into scratch folders (the results of record are never
touched): once by the ``local`` executor with one worker and all cores' threads (what a sequential
sweep does), once with one worker per core and one thread each. Both use the pinned numerics.
Reports runs per hour of each and their ratio, plus each run's own training time, which is what
explains a ratio short of the core count (a one-thread run is slower than half a two-thread run
when the two threads scale well).

    .venv/bin/python benchmarks/bench_sweep.py                  # routers_bpr, cpu preset, 4 runs (~15 min)
    .venv/bin/python benchmarks/bench_sweep.py --preset smoke   # a check of the script (~1 min)

Run it on an otherwise idle machine: anything else on the cores changes both numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import write_record  # noqa: E402


def _slice(chapter_name: str, preset: str, n: int):
    from vmoe_lib.chapters import get_chapter

    chapter = get_chapter(chapter_name)
    specs = {spec.name: spec for spec in chapter.plan(preset).specs if spec.chapter == chapter.name}
    pairs = [(name, seed) for name, spec in specs.items() for seed in spec.seeds][:n]
    runs = {name: specs[name] for name, _ in pairs}
    return chapter, runs, pairs


def _train(chapter, runs, pairs, preset: str, workers: int, scratch: Path) -> dict:
    """Train exactly the slice's pairs with ``workers`` local workers into ``scratch``; time it."""
    from vmoe_lib.results import regenerate_command
    from vmoe_lib.sweep import RunTask, run_tasks

    tasks = []
    for name, seed in pairs:
        spec = runs[name]
        path = scratch / "results" / preset / chapter.name / f"{spec.file_stem}__s{seed}.json"
        tasks.append(RunTask(chapter.name, preset, name, seed, spec.config, spec.key, path, scratch / "cache",
                             hash_extra=spec.hash_extra, extra_eval=spec.extra_eval,
                             regenerate=regenerate_command(chapter.name, preset)))
    started = time.perf_counter()
    outcomes = run_tasks(tasks, executor="local", workers=workers, progress=True)
    wall = time.perf_counter() - started
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise RuntimeError(f"benchmark runs failed: {bad}")
    stored = [json.loads(t.path.read_text()) for t in tasks]
    return {
        "workers": workers,
        "threads_per_worker": stored[0]["manifest"]["hardware"]["torch_threads"],
        "runs": len(tasks),
        "wall_s": wall,
        "runs_per_hour": 3600.0 * len(tasks) / wall,
        "run_train_s": [float(s["record"]["wall_time_s"]) for s in stored],
        "run_session_s": [float(s["manifest"]["session_seconds"]) for s in stored],
        "pinned": all(s["manifest"]["numerics"]["pinned"] for s in stored),
    }


_STEP_PROBE = r"""
import json, statistics, sys, time
import torch, torch.nn.functional as F
from vmoe_lib.numerics import apply_threads_from_env
from vmoe_lib.models import create_model
from vmoe_lib.layers.aux import collect_aux_loss
from vmoe_lib.train import TrainConfig
apply_threads_from_env()
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
steps = int(sys.argv[2])
torch.manual_seed(0)
model = create_model(config.model, num_classes=10, in_chans=1, **config.model_kwargs)
size = config.image_size or 28
x, y = torch.randn(config.batch_size, 1, size, size), torch.randint(0, 10, (config.batch_size,))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
times = []
for i in range(steps + 5):
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    aux = collect_aux_loss(model)
    opt.zero_grad(set_to_none=True)
    (loss if aux is None else loss + aux).backward()
    opt.step()
    if i >= 5:
        times.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "median_step_ms": 1000 * statistics.median(times)}))
"""


def _step_probe(config, steps: int = 60) -> dict:
    """Median training-step time of the slice's first model: 2 threads alone, 1 thread alone, and
    1 thread each in two processes at once (what the parallel sweep does). Explains the ratio:
    it is at most 2 x (2-thread step) / (1-thread step beside a neighbour)."""
    import subprocess

    from vmoe_lib.numerics import worker_env

    def launch(threads: int) -> subprocess.Popen:
        env = worker_env(threads)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.Popen([sys.executable, "-c", _STEP_PROBE, json.dumps(config.to_dict()), str(steps)],
                                stdout=subprocess.PIPE, text=True, env=env)

    def result(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate()
        return json.loads(out.strip().splitlines()[-1])["median_step_ms"]

    two_alone = result(launch(2))
    one_alone = result(launch(1))
    pair = [launch(1), launch(1)]
    one_beside = [result(p) for p in pair]
    beside = sum(one_beside) / 2
    return {
        "model": config.model, "steps": steps,
        "step_ms_2_threads_alone": two_alone, "step_ms_1_thread_alone": one_alone,
        "step_ms_1_thread_beside_another": one_beside,
        "two_thread_speedup": one_alone / two_alone,
        "slowdown_from_the_neighbour": beside / one_alone,
        "ratio_bound_from_steps": 2 * two_alone / beside,
    }


def render(report: dict) -> str:
    """The markdown table of record from a report (``--render report.json`` redraws a saved one)."""
    rows, probe, cores = report["rows"], report["step_probe"], int(report["ideal_ratio"])
    sequential = rows[0]
    ratio, per_run = report["ratio_runs_per_hour"], report["one_thread_run_vs_all_threads_run"]
    lines = [
        f"# Sweep throughput: {report['chapter']}/{report['preset']}, {len(report['pairs'])} runs",
        "",
        f"`{report['command']}`: {report['cpu'].get('model', '?')}, {cores} cores, git {report['git_sha']}, "
        f"{report['finished_at']}, pinned numerics: {all(r['pinned'] for r in rows)}.",
        "",
        "| executor | wall (min) | runs per hour | mean training time per run (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workers']} worker(s) x {r['threads_per_worker']} thread(s) | {r['wall_s'] / 60:.1f} | "
                     f"{r['runs_per_hour']:.1f} | {sum(r['run_train_s']) / len(r['run_train_s']):.0f} |")
    slowdown = probe["slowdown_from_the_neighbour"]
    neighbour = (f"a neighbour slows a one-thread run by {slowdown:.2f}x (the cores share caches and memory bandwidth)"
                 if slowdown > 1.02 else f"a neighbour does not slow a one-thread run ({slowdown:.2f}x)")
    lines += [
        "",
        f"**Ratio: {ratio:.2f}x runs per hour** with {cores} workers (ideal {cores}x, goal 1.8x). A one-thread run "
        f"takes {per_run:.2f}x the training time of a {sequential['threads_per_worker']}-thread run, so the ratio is "
        f"bounded by {cores}/{per_run:.2f} = {cores / per_run:.2f}x; the rest is worker start-up and the last round's "
        "idle worker.",
        "",
        f"Why (step probe, {probe['model']}, median of {probe['steps']} training steps on random batches): "
        f"{probe['step_ms_2_threads_alone']:.1f} ms with 2 threads alone, {probe['step_ms_1_thread_alone']:.1f} ms with "
        f"1 thread alone, {' / '.join(f'{v:.1f}' for v in probe['step_ms_1_thread_beside_another'])} ms with 1 thread "
        f"each in two processes at once. {neighbour[0].upper() + neighbour[1:]}; what caps the ratio is that one run "
        f"already gains {probe['two_thread_speedup']:.2f}x from its second thread, so two one-thread workers can give at "
        f"most 2 x {probe['step_ms_2_threads_alone']:.1f} / {sum(probe['step_ms_1_thread_beside_another']) / 2:.1f} = "
        f"{probe['ratio_bound_from_steps']:.2f}x the steps per hour of one 2-thread worker.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", default="routers_bpr")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--runs", type=int, default=4, help="how many (config, seed) pairs of the sweep (>= 4 of record)")
    parser.add_argument("--out", default=None, help="default: results/benchmarks/cpu/sweep.{json,md} (cpu preset only)")
    parser.add_argument("--render", default=None, metavar="JSON", help="only redraw the markdown of a saved report")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        print(f"redrawn {path.with_suffix('.md')}")
        return 0

    from vmoe_lib.numerics import cpu_info
    from vmoe_lib.results import _git_sha, _versions

    cores = os.cpu_count() or 1
    chapter, runs, pairs = _slice(args.chapter, args.preset, args.runs)
    print(f"{len(pairs)} runs of {args.chapter}/{args.preset}: {pairs}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmoe-bench-sweep-") as scratch:
        for workers in (1, cores):
            print(f"== {workers} worker(s)", flush=True)
            rows.append(_train(chapter, runs, pairs, args.preset, workers, Path(scratch) / f"w{workers}"))
    print("== step probe (one model, alone and beside another process)", flush=True)
    probe = _step_probe(next(iter(runs.values())))
    sequential, parallel = rows
    ratio = parallel["runs_per_hour"] / sequential["runs_per_hour"]
    per_run = (sum(parallel["run_train_s"]) / len(pairs)) / (sum(sequential["run_train_s"]) / len(pairs))
    report = {
        "benchmark": "bench_sweep",
        "chapter": args.chapter, "preset": args.preset, "pairs": pairs,
        "rows": rows,
        "ratio_runs_per_hour": ratio,
        "one_thread_run_vs_all_threads_run": per_run,
        "ideal_ratio": float(cores),
        "step_probe": probe,
        "cpu": cpu_info(), "versions": _versions(), "git_sha": _git_sha(),
        "python": platform.python_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = render(report)
    print(text)
    if args.out or args.preset == "cpu":
        write_record(Path(args.out) if args.out else ROOT / "results" / "benchmarks" / "cpu" / "sweep", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
