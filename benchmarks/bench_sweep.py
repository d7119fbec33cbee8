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


def _slice(chapter_name: str, preset: str, n: int):
    from vmoe_lib.chapters import get_chapter

    chapter = get_chapter(chapter_name)
    configs = chapter.experiment(preset)
    seeds = chapter.PRESETS[preset].seeds
    pairs = [(name, seed) for name in configs for seed in seeds][:n]
    runs = {name: configs[name] for name, _ in pairs}
    return chapter, runs, pairs


def _train(chapter, runs, pairs, preset: str, workers: int, scratch: Path) -> dict:
    """Train exactly the slice's pairs with ``workers`` local workers into ``scratch``; time it."""
    from vmoe_lib.results import config_hash, regenerate_command
    from vmoe_lib.sweep import RunTask, run_tasks

    options = chapter.run_options(preset)
    tasks = []
    for name, seed in pairs:
        key = config_hash(runs[name], options.get("hash_extra"))
        path = scratch / "results" / preset / chapter.NAME / f"{name}__{key}__s{seed}.json"
        tasks.append(RunTask(chapter.NAME, preset, name, seed, runs[name], key, path, scratch / "cache",
                             hash_extra=options.get("hash_extra"), extra_eval=options.get("extra_eval"),
                             regenerate=regenerate_command(chapter.NAME, preset)))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", default="routers_bpr")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--runs", type=int, default=4, help="how many (config, seed) pairs of the sweep (>= 4 of record)")
    parser.add_argument("--out", default=None, help="default: results/benchmarks/cpu/sweep.{json,md} (cpu preset only)")
    args = parser.parse_args(argv)

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
        "cpu": cpu_info(), "versions": _versions(), "git_sha": _git_sha(),
        "python": platform.python_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    lines = [
        f"# Sweep throughput: {args.chapter}/{args.preset}, {len(pairs)} runs",
        "",
        f"{report['cpu'].get('model', '?')}, {cores} cores, git {report['git_sha']}, {report['finished_at']}, "
        f"pinned numerics: {all(r['pinned'] for r in rows)}.",
        "",
        "| executor | wall (min) | runs per hour | mean training time per run (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workers']} worker(s) x {r['threads_per_worker']} thread(s) | {r['wall_s'] / 60:.1f} | "
                     f"{r['runs_per_hour']:.1f} | {sum(r['run_train_s']) / len(r['run_train_s']):.0f} |")
    lines += [
        "",
        f"**Ratio: {ratio:.2f}x runs per hour** with {cores} workers (ideal {cores}x). A one-thread run takes "
        f"{per_run:.2f}x the training time of a {sequential['threads_per_worker']}-thread run, so the ratio is bounded by "
        f"{cores}/{per_run:.2f} = {cores / per_run:.2f}x; the rest is worker start-up and the last round's idle worker.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out or args.preset == "cpu":
        out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / "cpu" / "sweep"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
        print(f"written to {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
