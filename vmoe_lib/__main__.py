"""Command line of the book's experiments.

``python -m vmoe_lib run <chapter> --preset cpu [--workers N]`` regenerates a chapter's results;
``python -m vmoe_lib verify <chapter> --preset cpu --sample N`` reruns recorded runs and compares;
``python -m vmoe_lib list`` lists chapters and presets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _slurm_options(args: argparse.Namespace) -> dict:
    from .errors import ConfigError

    extra = {}
    for item in args.slurm_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm-option {item!r} is invalid; it must be key=value, e.g. --slurm-option account=myproj")
        extra[key.strip()] = value.strip()
    out = {"cluster": args.slurm_cluster, "options": extra, "wait": not args.no_wait}
    for name in ("partition", "time", "gpus_per_job", "cpus_per_job", "folder"):
        value = getattr(args, f"slurm_{name}" if name == "folder" else name)
        if value is not None:
            out[name] = value
    return out


# The options of the slurm executor: flag -> (argparse destination, its default, which means "not given").
_SLURM_FLAGS = {
    "--partition": ("partition", None), "--time": ("time", None), "--gpus-per-job": ("gpus_per_job", None),
    "--cpus-per-job": ("cpus_per_job", None), "--slurm-option": ("slurm_option", None),
    "--slurm-folder": ("slurm_folder", None), "--slurm-cluster": ("slurm_cluster", "slurm"), "--no-wait": ("no_wait", False),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from .chapters import CHAPTERS

    parser = argparse.ArgumentParser(prog="python -m vmoe_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train what is missing of a chapter's preset and store the results")
    run.add_argument("chapter", choices=sorted(CHAPTERS), help="the chapter whose sweep to run")
    run.add_argument("--preset", default="cpu", help="smoke, cpu (the results of record) or gpu; default cpu")
    run.add_argument("--seeds", type=int, nargs="*", default=None, help="default: the preset's seeds")
    run.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    run.add_argument("--compile", action="store_true",
                     help="train the missing runs under torch.compile (the MoE layers' static-shape path); off by "
                     "default, recorded in each manifest; the results of record are eager")
    run.add_argument("--overrides", default=None,
                     help='JSON dict of TrainConfig fields, e.g. \'{"epochs": 2}\'; nested dicts (model_kwargs) merge')
    run.add_argument("--workers", default="1",
                     help="parallel worker processes: an int or 'auto' (one per core with 1 thread each; one per GPU)")
    run.add_argument("--executor", default="local", choices=["local", "inline", "slurm", "torchrun"],
                     help="local: pinned worker processes here; inline: this process; slurm: a job array via submitit; "
                     "torchrun: one run at a time, data-parallel over --workers processes")
    run.add_argument("--distributed", default=None, metavar="N",
                     help="train each run on N data-parallel processes (DDP; one GPU each on CUDA, 'auto': every GPU "
                     "here) started by torchrun, one run at a time: the same as --executor torchrun --workers N")
    run.add_argument("--partition", default=None, help="slurm: the partition")
    run.add_argument("--time", type=int, default=None, help="slurm: minutes per job (default 120)")
    run.add_argument("--gpus-per-job", type=int, default=None, help="slurm: GPUs per job")
    run.add_argument("--cpus-per-job", type=int, default=None, help="slurm: CPUs (and torch threads) per job (default 2)")
    run.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                     help="slurm: any other sbatch option, e.g. account=myproj (repeatable)")
    run.add_argument("--slurm-folder", default=None, help="slurm: where submitit keeps job logs (default .cache/vmoe/slurm)")
    run.add_argument("--slurm-cluster", default="slurm", choices=["slurm", "local", "debug"],
                     help="slurm: submitit's backend; local/debug run the jobs here without SLURM (tests)")
    run.add_argument("--no-wait", action="store_true", help="slurm: submit and return; rerun the command to collect")
    run.add_argument("--no-progress", action="store_true")
    verify = sub.add_parser("verify", help="rerun recorded runs with their recorded settings and compare bit for bit")
    verify.add_argument("chapter", choices=sorted(CHAPTERS), help="the chapter whose records to rerun")
    verify.add_argument("--preset", default="cpu", help="the preset of the records (default cpu)")
    verify.add_argument("--sample", type=int, default=1, help="how many recorded runs to rerun")
    verify.add_argument("--seed", type=int, default=0, help="chooses which runs (reproducibly)")
    sub.add_parser("list", help="list chapters and their presets")
    board = sub.add_parser("scoreboard", help="print every chapter's claims and verdicts of record (or write the README's section)")
    board.add_argument("--preset", default="cpu", help="whose verdicts.json to read (default cpu)")
    board.add_argument("--write-readme", action="store_true", help="rewrite the README's generated scoreboard section")
    board.add_argument("--check-readme", action="store_true", help="exit 1 when the README's section is out of date")
    return parser.parse_args(argv)


def _scoreboard(args: argparse.Namespace) -> int:
    from .book import findings, readme_with_scoreboard, scoreboard, scoreboard_markdown
    from .results import _repo_root

    from .errors import ConfigError

    rows = scoreboard(args.preset)
    if not (args.write_readme or args.check_readme):
        print(scoreboard_markdown(rows))
        return 0
    readme = (_repo_root() or Path.cwd()) / "README.md"
    text = readme.read_text(encoding="utf-8")
    try:
        updated = readme_with_scoreboard(text, rows)
    except ValueError as err:
        raise ConfigError(f"{readme}: {err}") from None
    if args.check_readme:
        if updated != text:
            print(f"{readme}: the scoreboard section is out of date; run: python -m vmoe_lib scoreboard --write-readme",
                  file=sys.stderr)
            return 1
        print(f"{readme}: scoreboard up to date ({len(findings(rows))} claims of the papers, from {len(rows)} records)")
        return 0
    readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: scoreboard section written ({len(findings(rows))} claims of the papers, from {len(rows)} records)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .chapters import get_chapter
    from .errors import ConfigError
    from .sweep import SweepError

    chapter = get_chapter(args.chapter)
    started = time.time()
    try:
        overrides = json.loads(args.overrides) if args.overrides else None
    except ValueError as err:
        raise ConfigError(f"--overrides {args.overrides!r} is not valid JSON ({err}); e.g. --overrides '{{\"epochs\": 2}}'") from None
    if args.distributed is not None:
        if args.executor not in ("local", "torchrun"):
            raise ConfigError(f"--distributed {args.distributed} is invalid with --executor {args.executor}: it runs "
                              "each run on several processes through torchrun; drop one of the two")
        text = str(args.distributed).strip()
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise ConfigError(f"--distributed {args.distributed} is invalid; it must be an int >= 1 (data-parallel "
                              "processes per run) or 'auto' (every GPU here)")
        args.executor, args.workers = "torchrun", text
    given = [flag for flag, (dest, default) in _SLURM_FLAGS.items() if getattr(args, dest) != default]
    if given and args.executor != "slurm":
        raise ConfigError(f"{', '.join(given)}: options of the slurm executor, which do nothing with --executor "
                          f"{args.executor}; add --executor slurm, or leave them out")
    slurm = _slurm_options(args) if args.executor == "slurm" else None
    try:
        results = chapter.run(args.preset, seeds=args.seeds, device=args.device, overrides=overrides,
                              progress=not args.no_progress, workers=args.workers, executor=args.executor, slurm=slurm,
                              compile=args.compile)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for v in chapter.verdicts(results):
        effect = (f"effect {v.effect:+.2f} points, 90% [{v.interval[0]:+.2f}, {v.interval[1]:+.2f}], "
                  f"Holm p {v.p_holm if v.p_holm is not None else float('nan'):.3g}, MDE {v.mde:.2f}"
                  if v.effect is not None else "no data")
        print(f"[{v.verdict}] {v.claim_id}: {effect} ({v.why})")
    print(f"verdicts written to {results.verdicts_path()}")
    print(f"{len(results.results)} runs of {args.chapter}/{results.preset} ready in {(time.time() - started) / 60:.1f} min")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_chapter

    checks = verify_chapter(args.chapter, args.preset, sample=args.sample, seed=args.seed)
    for check in checks:
        where = f"{check.path.name} ({check.settings['threads']} thread(s), numerics {'pinned' if check.settings['pinned'] else 'not pinned'})"
        if check.added:
            shown = ", ".join(check.added[:4]) + (f" and {len(check.added) - 4} more" if len(check.added) > 4 else "")
            print(f"{where}: {len(check.added)} field(s) the record predates, not compared: {shown}")
        if check.identical:
            print(f"{where}: identical ({check.compared} recorded numbers)")
        else:
            print(f"{where}: {len(check.differences)} of {check.compared} recorded numbers differ")
            for diff in check.differences[:12]:
                print(f"    {diff.describe()}")
            if len(check.differences) > 12:
                print(f"    ... and {len(check.differences) - 12} more")
    same = sum(c.identical for c in checks)
    print(f"{same} of {len(checks)} rerun(s) identical")
    return 0 if same == len(checks) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every error of the library ends as one ``error:`` line: exit 2 for a setting or an
    input that cannot work (nothing ran), 1 for runs that failed."""
    from .errors import ConfigError, DataUnavailableError
    from .results import MissingResultError
    from .sweep import SweepError

    args = _parse(argv)
    try:
        if args.command == "list":
            from .chapters import CHAPTERS

            for name, chapter in CHAPTERS.items():
                for preset in chapter.presets.values():
                    print(f"{name:24s} {preset.name:6s} {preset.expected_minutes:6.1f} min  {preset.hardware}: {preset.description}")
            return 0
        if args.command == "verify":
            return _verify(args)
        if args.command == "scoreboard":
            return _scoreboard(args)
        return _run(args)
    except (ConfigError, MissingResultError, DataUnavailableError) as err:  # nothing could run: one line, no traceback
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (SweepError, RuntimeError) as err:  # runs that failed (each named, with its log)
        print(f"error: {err}", file=sys.stderr)
        return 1


def _one_line(err: Exception) -> str:
    """An error's message on one line (a multi-line message, e.g. the missing results listed, joined)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
