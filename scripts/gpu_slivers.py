"""Every chapter's ``gpu`` preset on a sliver: each chapter's first few distinct run configs, one epoch on a few hundred
images, on one device. Part of ``scripts/gpu_check.sh``; it shows that the gpu presets build, train (bf16 autocast on
CUDA), evaluate and store a record, not what they find.

Usage::

    python scripts/gpu_slivers.py --device cuda --out results/benchmarks/cuda/gpu_slivers.json
    python scripts/gpu_slivers.py --device cpu --per-chapter 1 --dataset fashion_mnist   # a dry run without a GPU

``--dataset`` replaces the presets' dataset (CIFAR-10/100, which come from the Hugging Face hub or
``$VMOE_DATA_DIR``) where it cannot be had, e.g. on a machine without internet: the sliver then trains the gpu
presets' models on that dataset, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIVER = {"epochs": 1, "train_subset": 512, "eval_subset": 256, "val_size": 256, "eval_batch_size": 256,
          "warmup_epochs": 0.0}


def chapter_configs(chapter, per_chapter: int) -> tuple[list[tuple[str, object]], str]:
    """The first ``per_chapter`` distinct (model, model kwargs) configs of the chapter's gpu preset: its runs', or
    its first stage's when the runs need the first stage's results to be planned."""
    preset = chapter.preset("gpu")
    note = ""
    try:
        runs = list(chapter.prerequisites(preset)) + list(chapter.runs(preset))
    except Exception as err:  # a two-stage chapter plans its runs from the first stage's results
        runs = list(chapter.prerequisites(preset))
        note = f"first stage only ({type(err).__name__})"
    seen, picked = set(), []
    for run in runs:
        key = json.dumps([run.config.model, run.config.model_kwargs], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            picked.append((run.name, run.config))
    return picked[:per_chapter], note


def native_size(model: str) -> int | None:
    """The input size of a model with a fixed one: its timm pretrained config's, else the size its name ends with
    (``vit_tiny_patch4_32``: 32), else ``None``."""
    import re

    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is not None and cfg.input_size:
        return int(cfg.input_size[-1])
    found = re.search(r"_(\d+)$", model)
    return int(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--per-chapter", type=int, default=3, help="distinct configs per chapter (default 3)")
    parser.add_argument("--chapters", default=None, help="comma-separated chapter names (default: every chapter)")
    parser.add_argument("--dataset", default=None, help="replace the presets' dataset (e.g. fashion_mnist)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "cuda" / "gpu_slivers.json")
    args = parser.parse_args()
    if args.per_chapter < 1:
        parser.error(f"--per-chapter={args.per_chapter} is invalid; it must be an int >= 1")
    import torch

    from vmoe_lib.chapters import CHAPTERS
    from vmoe_lib.train import train_model

    names = sorted(CHAPTERS) if not args.chapters else [c.strip() for c in args.chapters.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHAPTERS]
    if unknown or not names:
        parser.error(f"--chapters={args.chapters!r} is invalid; chapters are {', '.join(sorted(CHAPTERS))}")
    rows, started_all = [], time.perf_counter()
    for name in names:
        chapter = CHAPTERS[name]
        try:
            configs, note = chapter_configs(chapter, args.per_chapter)
        except Exception as err:
            rows.append({"chapter": name, "run": None, "status": f"plan failed: {type(err).__name__}: {err}"})
            continue
        for run_name, config in configs:
            changes = dict(SLIVER)
            if args.dataset:  # the other dataset's images resized to the size the preset trains at
                changes.update(dataset=args.dataset, image_size=config.image_size or native_size(config.model))
            row = {"chapter": name, "run": run_name, "model": config.model}
            try:
                sliver = config.replace(**changes)
            except Exception as err:
                rows.append({**row, "status": f"config refused: {err}"})
                continue
            row = {"chapter": name, "run": run_name, "model": config.model, "dataset": sliver.dataset, "note": note}
            started = time.perf_counter()
            try:
                record = train_model(sliver, 0, device=args.device, progress=False)
                row.update(status="ok", device=record["device"], amp=bool(sliver.amp and "cuda" in record["device"]),
                           test_accuracy=record["final"].get("test_accuracy"),
                           train_images_per_second=record["history"][-1]["train_images_per_second"])
            except Exception as err:
                row.update(status=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                           traceback=traceback.format_exc()[-2000:])
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name} / {run_name}: {row['status']} in {row['seconds']} s", flush=True)
            rows.append(row)
    ok = sum(r["status"] == "ok" for r in rows)
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "sliver": SLIVER, "dataset_override": args.dataset,
              "seconds": round(time.perf_counter() - started_all, 1), "ok": ok, "runs": len(rows), "rows": rows}
    lines = ["| chapter | run | model | dataset | status | seconds | train images/s |", "|---|---|---|---|---|---:|---:|"]
    for r in rows:
        speed = r.get("train_images_per_second")
        lines.append(f"| {r['chapter']} | {r['run']} | {r.get('model')} | {r.get('dataset')} | {r['status']} | "
                     f"{r.get('seconds', '')} | {'' if speed is None else f'{speed:.0f}'} |")
    lines.append("")
    lines.append(f"{ok}/{len(rows)} slivers ok on {report['gpu'] or args.device}, torch {torch.__version__}, "
                 f"{report['seconds']:.0f} s; each: {json.dumps(SLIVER)}"
                 + (f", dataset replaced by {args.dataset}" if args.dataset else "") + ".")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _record import write_record

    write_record(args.out, report, "\n".join(lines) + "\n")
    sys.exit(0 if ok == len(rows) else 1)


if __name__ == "__main__":
    main()
