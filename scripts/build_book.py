"""Build the book: execute every chapter with papermill, then Jupyter Book v1 with warnings as errors.

Usage (from the repository root; ``make book`` runs it in the project's venv)::

    python scripts/build_book.py [--preset cpu] [--allow-training] [--only 00_dense_baselines]

Chapters are executed into ``_build/staging/`` (a copy of the book's sources),
so the git tree stays clean. By default results must already exist
(``VMOE_REQUIRE_RESULTS=1``): a missing or stale result of record fails the
build with the command that regenerates it. ``--allow-training`` trains what is
missing instead (hours on a CPU for a full book).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGING = ROOT / "_build" / "staging"
OUTPUT = ROOT / "_build" / "book"


def execute_chapters(preset: str, only: list[str] | None, allow_training: bool) -> None:
    import papermill as pm

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [nb for nb in notebooks if nb.stem in only]
        if not notebooks:
            raise SystemExit(f"--only {only}: no such chapter in notebooks/")
    os.environ["VMOE_REQUIRE_RESULTS"] = "0" if allow_training else "1"
    os.environ.setdefault("VMOE_RESULTS_DIR", str(ROOT / "results"))
    (STAGING / "notebooks").mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        started = time.time()
        print(f"executing {nb.relative_to(ROOT)} with preset={preset!r} ...", flush=True)
        try:
            pm.execute_notebook(
                str(nb),
                str(STAGING / "notebooks" / nb.name),
                parameters={"preset": preset},
                kernel_name="python3",
                cwd=str(ROOT / "notebooks"),
                progress_bar=False,
            )
        except pm.PapermillExecutionError as err:
            raise SystemExit(
                f"\nchapter {nb.name} failed with preset={preset!r}:\n  {err.ename}: {err.evalue}\n"
                f"(the executed copy with the traceback is {STAGING / 'notebooks' / nb.name})"
            ) from None
        tidy_executed(STAGING / "notebooks" / nb.name, {"preset": preset}, allow_training)
        print(f"  done in {time.time() - started:.0f} s", flush=True)


SCOREBOARD_MARKER = "<!-- scoreboard -->"
SUMMARY_MARKER = "<!-- summary -->"
FOREST_MARKER = "<!-- forest -->"


def copy_sources() -> None:
    if STAGING.exists():
        shutil.rmtree(STAGING)
    STAGING.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, STAGING / name)
    shutil.copytree(ROOT / "book", STAGING / "book", ignore=shutil.ignore_patterns("_static"))
    # Jupyter Book includes every stylesheet found in _static/ at the book's root.
    shutil.copytree(ROOT / "book" / "_static", STAGING / "_static")
    # Benchmark tables of record, which pages include as they are committed ({include} ../results/benchmarks/...).
    shutil.copytree(ROOT / "results" / "benchmarks", STAGING / "results" / "benchmarks", ignore=shutil.ignore_patterns("*.json", "*.csv"))
    insert_findings(STAGING / "book" / "intro.md")


def insert_findings(page: Path) -> None:
    """Fill the landing page from the committed verdicts: what was found (per paper, and at what scale), the forest
    plot of the papers' claims, and their scoreboard."""
    import matplotlib

    matplotlib.use("Agg")
    from vmoe_lib.book import findings, scale_facts, scoreboard, scoreboard_html, summary_markdown
    from vmoe_lib.papers import PAPERS
    from vmoe_lib.plots import check_readable, forest

    text = page.read_text(encoding="utf-8")
    missing = [m for m in (SUMMARY_MARKER, FOREST_MARKER, SCOREBOARD_MARKER) if m not in text]
    if missing:
        raise SystemExit(f"{page.relative_to(STAGING)} lacks the line(s) {missing}: the findings have nowhere to go")
    rows = scoreboard("cpu")
    items = findings(rows)
    fig = forest(items, paper_names={key: paper.short for key, paper in PAPERS.items()})
    check_readable(fig)
    fig.savefig(page.parent / "forest.png", dpi=220, bbox_inches="tight")
    figure = (
        ":::{figure} forest.png\n:name: fig-forest\n:width: 100%\n"
        f":alt: Forest plot of the {len(items)} claims of the papers, grouped by paper: for each, our effect in accuracy "
        "points with its 90% interval, coloured by verdict, the smallest effect of interest as a bar and the paper's own "
        "number as an open diamond.\n\n"
        f"Every claim of the papers this book tests ({len(items)}), from the committed verdicts: our effect (dot) and its "
        "90% interval (line), coloured by verdict; the smallest effect of interest the rule reads (bar: at +m for a "
        "claim of superiority, at -m for non-inferiority, at ±m for equivalence); the paper's own number (open diamond) "
        "where it states one. Labels: chapter and claim id, as in the scoreboard below.\n:::"
    )
    text = (text.replace(SUMMARY_MARKER, summary_markdown(rows, scale_facts("cpu")))
                .replace(FOREST_MARKER, figure)
                .replace(SCOREBOARD_MARKER, scoreboard_html(rows)))
    page.write_text(text, encoding="utf-8")


def tidy_executed(notebook: Path, parameters: dict[str, object], trained: bool) -> None:
    """Replace papermill's injected-parameters cell by one line saying what the page was built with."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    shown = ", ".join(f"`{key} = {value!r}`" for key, value in parameters.items())
    note = nbformat.v4.new_markdown_cell(
        f"```{{note}}\nThis page was built by `scripts/build_book.py` with {shown} (every other parameter at its "
        "default above)"
        + ("; results missing from `results/` were trained for it.\n```" if trained else
           ": its tables and figures are read from the committed results of record; nothing was trained for it.\n```")
    )
    nb.cells = [note if "injected-parameters" in cell.get("metadata", {}).get("tags", []) else cell for cell in nb.cells]
    for i, cell in enumerate(nb.cells):  # papermill's copy keeps the committed notebooks' id-less cells
        cell.setdefault("id", f"cell-{i}")
    nbformat.write(nb, notebook)


def build_html() -> Path:
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(STAGING), "--path-output", str(OUTPUT),
           "--warningiserror", "--keep-going"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    index = OUTPUT / "_build" / "html" / "index.html"
    if not index.exists():
        raise SystemExit(f"the build finished but {index} is missing")
    return index


def use_this_checkouts_library() -> None:
    """Chapters' kernels and autodoc import vmoe_lib from this checkout.

    Without this they (and this script's scoreboard) import whichever checkout the venv's editable install points at (another git
    worktree, say), so the book would show that library's docstrings and run its code.
    """
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    sys.path.insert(0, str(ROOT))  # and this process (the scoreboard)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="preset the chapters are executed with (default: cpu, the results of record)")
    parser.add_argument("--only", nargs="*", help="execute only these chapters (notebook stems)")
    parser.add_argument("--allow-training", action="store_true", help="train missing results instead of failing")
    args = parser.parse_args()
    started = time.time()
    use_this_checkouts_library()
    copy_sources()
    execute_chapters(args.preset, args.only, args.allow_training)
    if args.only:
        print("--only given: chapters executed, HTML not built (the table of contents needs every chapter)")
        return 0
    index = build_html()
    print(f"book built in {time.time() - started:.0f} s: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
