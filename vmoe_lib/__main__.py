"""Command line: ``python -m vmoe_lib run <chapter> --preset cpu`` regenerates a chapter's results."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from .chapters import CHAPTERS, get_chapter

    parser = argparse.ArgumentParser(prog="python -m vmoe_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train what is missing of a chapter's preset and store the results")
    run.add_argument("chapter", choices=sorted(CHAPTERS))
    run.add_argument("--preset", default="cpu")
    run.add_argument("--seeds", type=int, nargs="*", default=None, help="default: the preset's seeds")
    run.add_argument("--device", default="auto")
    run.add_argument("--overrides", default=None, help='JSON dict of TrainConfig fields, e.g. \'{"epochs": 2}\'')
    run.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="list chapters and their presets")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, module in CHAPTERS.items():
            for preset in module.PRESETS.values():
                print(f"{name:24s} {preset.name:6s} {preset.expected_minutes:6.1f} min  {preset.hardware}: {preset.description}")
        return 0
    chapter = get_chapter(args.chapter)
    started = time.time()
    overrides = json.loads(args.overrides) if args.overrides else None
    results = chapter.run(args.preset, seeds=args.seeds, device=args.device, overrides=overrides, progress=not args.no_progress)
    if hasattr(chapter, "verdicts"):
        for v in chapter.verdicts(results):
            print(f"[{v.verdict}] {v.claim}: {v.measurement}")
    print(f"{len(results.results)} runs of {args.chapter}/{results.preset} ready in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
