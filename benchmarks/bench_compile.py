"""Eager vs ``torch.compile``: graph breaks, the MoE layer's forward+backward and test-bed training, in one run.

Sections (one run, on ``--device``):

``breaks``
    ``torch._dynamo.explain`` of ``vmoe_vit_pico_patch7_28`` in training mode, batch 16 (the table of issue #31), per
    router and dispatch backend: ``auto`` (the default: the static path while compiling), ``einsum`` (the reference)
    and ``segment`` (the data-dependent CPU path the default took before, forced): graph breaks and graphs.
``models``
    Every ``vmoe_*`` model with every router at its default settings: ``torch.compile(fullgraph=True)`` of a training
    step (forward, backward, optimizer step; AOTAutograd's eager backend, the graphs Inductor compiles) and of
    evaluation, and ``torch.export.export`` for inference (capacity routers); ok, or the error.
``layer``
    One ``MoEMlp`` per router (D=192, E=8, k=2 or capacity factor 2, 64 images x 65 tokens, training mode):
    forward+backward of the eager default (``auto``: ``segment`` on the CPU), the static path in eager mode, and the
    model compiled with the default settings (Inductor, static path), interleaved, minimum of ``--repeats``.
``e2e``
    Training step (forward, backward, AdamW) of the test bed's MoE model (chapter 0: ``vmoe_vit_pico_patch7_28``,
    MoE in every block, 8 experts, k=2; batch 128 of 28x28 images), eager vs compiled; images/s.

Compile time is reported apart (the first call), never inside a timing. On the CPU the script re-executes itself in
a sweep worker's environment (1 thread, pinned numerics), as the chapters' runs train.

Usage::

    python benchmarks/bench_compile.py                       # ~12 min on 2 CPU cores
    python benchmarks/bench_compile.py --sections breaks,layer --repeats 5
    python benchmarks/bench_compile.py --device cuda --out results/benchmarks/cuda/compile.json

Writes ``results/benchmarks/<device>/compile.{json,md}`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import collections
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("breaks", "models", "layer", "e2e")


def _explain(model: Any, x: Any) -> dict[str, Any]:
    import torch

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    reasons = collections.Counter(str(b.reason).split("\n")[0][:90] for b in explained.break_reasons)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "reasons": dict(reasons.most_common(3))}


def bench_breaks(log: Any) -> list[dict[str, Any]]:
    import timm
    import torch

    from vmoe_lib.routers import list_routers

    rows = []
    for router in list_routers():
        row: dict[str, Any] = {"router": router}
        for backend in ("auto", "einsum", "segment"):
            torch.manual_seed(0)
            model = timm.create_model("vmoe_vit_pico_patch7_28", router=router, backend=backend).train()
            result = _explain(model, torch.randn(16, 1, 28, 28))
            row[backend] = result["graph_breaks"]
            row[f"{backend}_reasons"] = result["reasons"]
        log(f"breaks {router}: auto {row['auto']}, einsum {row['einsum']}, segment {row['segment']}")
        rows.append(row)
    return rows


def _input(model: Any, batch: int) -> Any:
    import torch

    return torch.randn(batch, *model.pretrained_cfg["input_size"])


def bench_models(log: Any) -> list[dict[str, Any]]:
    import timm
    import torch
    import torch.nn.functional as F

    from vmoe_lib.layers import collect_aux_loss
    from vmoe_lib.models import ensemble_size, ensemble_targets
    from vmoe_lib.routers import list_routers

    rows = []
    for name in timm.list_models("vmoe_*"):
        for router in list_routers():
            row: dict[str, Any] = {"model": name, "router": router}
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, router=router)
            except Exception as err:  # a combination the model refuses (e.g. a class-token router on a ConvNeXt)
                row["built"] = f"refused: {str(err).splitlines()[0][:120]}"
                rows.append(row)
                continue
            batch = 4 if model.pretrained_cfg["input_size"][-1] > 64 else 16
            x = _input(model, batch)
            y = torch.randint(0, model.num_classes, (batch,))
            for mode in ("train", "eval", "export"):
                if mode == "export" and router == "soft":
                    row[mode] = "n/a (no capacity)"
                    continue
                started = time.perf_counter()
                try:
                    torch._dynamo.reset()
                    if mode == "train":
                        compiled = torch.compile(model.train(), fullgraph=True, backend="aot_eager")
                        loss = F.cross_entropy(compiled(x), ensemble_targets(y, ensemble_size(model)))
                        aux = collect_aux_loss(model)
                        (loss if aux is None else loss + aux).backward()
                        torch.optim.SGD(model.parameters(), lr=1e-3).step()
                        model.zero_grad(set_to_none=True)
                        row[mode] = "ok"
                    elif mode == "eval":
                        compiled = torch.compile(model.eval(), fullgraph=True, backend="aot_eager")
                        with torch.no_grad():
                            diff = (compiled(x) - model(x)).abs().max().item()
                        row[mode] = "ok"
                        row["eval_max_abs_diff"] = diff
                    else:
                        program = torch.export.export(model.eval(), (x,))
                        with torch.no_grad():
                            diff = (program.module()(x) - model(x)).abs().max().item()
                        row[mode] = "ok"
                        row["export_max_abs_diff"] = diff
                except Exception as err:
                    row[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row[f"{mode}_seconds"] = round(time.perf_counter() - started, 2)
            log(f"models {name} {router}: train {row.get('train')}, eval {row.get('eval')}, export {row.get('export')}")
            rows.append(row)
    return rows


def bench_layer(dev: Any, repeats: int, log: Any) -> list[dict[str, Any]]:
    import copy

    import torch

    from bench_moe import _fb, build_moe, interleaved_times
    from vmoe_lib.routers import list_routers

    D, E, k, B, T = 192, 8, 2, 64, 65
    rows = []
    for router in list_routers():
        torch.manual_seed(0)
        eager = build_moe(router, D, E, k, T, device=dev.device)
        static = copy.deepcopy(eager)
        static.backend = "static"
        compiled_layer = copy.deepcopy(eager)
        compiled = torch.compile(compiled_layer, fullgraph=True)
        x = torch.randn(B, T, D, device=dev.device, requires_grad=True)
        grad = torch.randn(B, T, D, device=dev.device)
        started = time.perf_counter()
        _fb(compiled, x, grad)()
        dev.sync()
        compile_s = time.perf_counter() - started
        times = interleaved_times({"eager": _fb(eager, x, grad), "static_eager": _fb(static, x, grad),
                                   "compiled": _fb(compiled, x, grad)}, dev, repeats, warmup=2)
        row = {"router": router, "eager_backend": eager.last_dispatch.backend, "eager_ms": 1e3 * times["eager"],
               "static_eager_ms": 1e3 * times["static_eager"], "compiled_ms": 1e3 * times["compiled"],
               "compiled_vs_eager": times["compiled"] / times["eager"],
               "static_eager_vs_eager": times["static_eager"] / times["eager"],
               "compile_seconds": compile_s, "pairs": eager.last_dispatch.pairs,
               "rows_computed_eager": eager.last_dispatch.rows_computed,
               "rows_computed_static": static.last_dispatch.rows_computed}
        log(f"layer {router}: eager {row['eager_ms']:.1f} ms, static eager {row['static_eager_ms']:.1f} ms, compiled "
            f"{row['compiled_ms']:.1f} ms ({row['compiled_vs_eager']:.2f}x; compile {compile_s:.0f} s)")
        rows.append(row)
    return rows


def bench_e2e(dev: Any, repeats: int, log: Any) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from bench_moe import interleaved_times
    from vmoe_lib.layers import collect_aux_loss
    from vmoe_lib.models import create_model

    batch = 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen).to(dev.device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev.device)
    rows = []
    kinds = {"moe_test_bed": dict(moe_layers="all", num_experts=8, k=2), "dense": None}
    for label, moe in kinds.items():
        steps, compile_s = {}, None
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            name = "vmoe_vit_pico_patch7_28" if moe is not None else "vit_pico_patch7_28"
            model = create_model(name, num_classes=10, in_chans=1, **(moe or {})).to(dev.device).train()
            net = torch.compile(model, fullgraph=True) if mode == "compiled" else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(model: Any = model, net: Any = net, opt: Any = opt) -> None:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y)
                aux = collect_aux_loss(model)
                (loss if aux is None else loss + aux).backward()
                opt.step()

            if mode == "compiled":
                started = time.perf_counter()
                step()
                dev.sync()
                compile_s = time.perf_counter() - started
            steps[mode] = step
        times = interleaved_times(steps, dev, repeats, warmup=2)
        row = {"model": label, "eager_ms": 1e3 * times["eager"], "compiled_ms": 1e3 * times["compiled"],
               "compiled_vs_eager": times["compiled"] / times["eager"], "eager_images_per_s": batch / times["eager"],
               "compiled_images_per_s": batch / times["compiled"], "compile_seconds": compile_s}
        log(f"e2e {label}: eager {row['eager_ms']:.0f} ms, compiled {row['compiled_ms']:.0f} ms "
            f"({row['compiled_vs_eager']:.2f}x)")
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    m = report["manifest"]
    if report.get("breaks"):
        lines += ["### Graph breaks: `vmoe_vit_pico_patch7_28`, training mode, batch 16", "",
                  "| router | backend `auto` (default) | `einsum` | `segment` (data-dependent, forced) |",
                  "|---|---:|---:|---:|"]
        for r in report["breaks"]:
            lines.append(f"| {r['router']} | {r['auto']} | {r['einsum']} | {r['segment']} |")
        lines.append("")
    if report.get("models"):
        rows = report["models"]
        ok = {mode: sum(r.get(mode) == "ok" for r in rows) for mode in ("train", "eval", "export")}
        tried = {mode: sum(mode in r and not str(r[mode]).startswith("n/a") for r in rows)
                 for mode in ("train", "eval", "export")}
        lines += [f"### Every `vmoe_*` model x router ({len(rows)} combinations), default settings", "",
                  f"`torch.compile(fullgraph=True)` training step: {ok['train']}/{tried['train']} ok; evaluation: "
                  f"{ok['eval']}/{tried['eval']} ok; `torch.export` (capacity routers): {ok['export']}/{tried['export']} "
                  "ok.", ""]
        failed = [r for r in rows if any(mode in r and r[mode] != "ok" and not str(r[mode]).startswith("n/a")
                                         for mode in ("train", "eval", "export"))]
        refused = [r for r in rows if "built" in r]
        for r in failed:
            lines.append(f"- {r['model']} / {r['router']}: train {r.get('train')}, eval {r.get('eval')}, "
                         f"export {r.get('export')}")
        diffs = [r.get(key, 0.0) for r in rows for key in ("eval_max_abs_diff", "export_max_abs_diff")]
        lines.append(f"Largest |compiled or exported - eager| in evaluation: {max(diffs, default=0.0):.1e}. "
                     f"Combinations a model refuses at build: {len(refused)}.")
        lines.append("")
    if report.get("layer"):
        lines += ["### MoE layer forward+backward (D=192, E=8, k=2, 64 x 65 tokens)", "",
                  "| router | eager default (ms) | static path, eager (ms) | compiled (ms) | compiled / eager | "
                  "compile (s) |", "|---|---:|---:|---:|---:|---:|"]
        for r in report["layer"]:
            lines.append(f"| {r['router']} | {r['eager_ms']:.1f} ({r['eager_backend']}) | {r['static_eager_ms']:.1f} | "
                         f"{r['compiled_ms']:.1f} | {r['compiled_vs_eager']:.2f}x | {r['compile_seconds']:.0f} |")
        lines.append("")
    if report.get("e2e"):
        lines += ["### Test-bed training step (batch 128, AdamW)", "",
                  "| model | eager (ms) | compiled (ms) | compiled / eager | eager images/s | compiled images/s | "
                  "compile (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["e2e"]:
            lines.append(f"| {r['model']} | {r['eager_ms']:.0f} | {r['compiled_ms']:.0f} | {r['compiled_vs_eager']:.2f}x "
                         f"| {r['eager_images_per_s']:.0f} | {r['compiled_images_per_s']:.0f} | "
                         f"{r['compile_seconds']:.0f} |")
        lines.append("")
    timed = f"minimum of {m['repeats']} interleaved repeats; " if report.get("layer") or report.get("e2e") else ""
    lines.append(f"`{m['command']}` at {str(m['git_sha'] or '')[:7]}, {m['device']}"
                 f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, torch {m['torch']}, {m['torch_threads']} thread(s), "
                 f"{timed}load average {m['load_average_start']} -> {m['load_average_end']}; {m['seconds']:.0f} s in all.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved repeats; the minimum is kept (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", type=Path, default=None, help="default results/benchmarks/<device>/compile.json")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        parser.error(f"--sections={args.sections!r} is invalid; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid; it must be an int >= 1")
    if args.device == "cpu":
        from _train_step import _reexec_as_worker

        _reexec_as_worker()
    import timm
    import torch

    from _record import write_record
    from bench_moe import Device, load_average
    from vmoe_lib.numerics import apply_threads_from_env

    apply_threads_from_env()
    dev = Device(args.device)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    load_start = load_average()
    report: dict[str, Any] = {}
    for section in sections:
        try:
            if section == "breaks":
                report["breaks"] = bench_breaks(log)
            elif section == "models":
                report["models"] = bench_models(log)
            elif section == "layer":
                report["layer"] = bench_layer(dev, args.repeats, log)
            else:
                report["e2e"] = bench_e2e(dev, args.repeats, log)
        except Exception:
            report[f"{section}_error"] = traceback.format_exc()
            log(f"section {section} failed:\n{report[f'{section}_error']}")
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None
    command = "python benchmarks/bench_compile.py"
    if sections != list(SECTIONS):
        command += f" --sections {','.join(sections)}"
    if args.repeats != 10:
        command += f" --repeats {args.repeats}"
    if args.device != "cpu":
        command += f" --device {args.device}"
    report["manifest"] = {
        "command": command, "device": str(dev.device), "repeats": args.repeats, "torch": torch.__version__,
        "timm": timm.__version__, "python": platform.python_version(), "git_sha": sha, "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(), "load_average_start": load_start, "load_average_end": load_average(),
        "seconds": time.perf_counter() - started, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch.cuda.get_device_name(dev.device) if dev.cuda else None,
    }
    out = args.out or ROOT / "results" / "benchmarks" / args.device / "compile.json"
    text = markdown(report)
    write_record(out, report, text)
    print(text)
    if any(key.endswith("_error") for key in report):
        sys.exit(1)


if __name__ == "__main__":
    main()
