"""The book's scoreboard, provenance and verdict tables (vmoe_lib.book), and the build script's notebook tidying."""

from __future__ import annotations

import html
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import vmoe_lib as vl
from vmoe_lib.analysis import format_mean_sd, mean_sd_text
from vmoe_lib.book import REPOSITORY_URL, findings, readme_with_scoreboard, scoreboard, scoreboard_html
from vmoe_lib.chapters.base import ChapterResults
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import RunResult
from vmoe_lib.stats import VerdictRecord

ROOT = Path(__file__).resolve().parents[1]


def _committed_verdict_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "results/cpu/*/verdicts.json"], cwd=ROOT, capture_output=True, text=True)
    return [ROOT / line for line in out.stdout.split()] if out.returncode == 0 else sorted(ROOT.glob("results/cpu/*/verdicts.json"))


def test_scoreboard_lists_exactly_the_committed_claims_in_book_order():
    files = _committed_verdict_files()
    assert files, "no committed verdicts.json"
    expected = {f"{f.parent.name}:{r['claim_id']}" for f in files for r in json.loads(f.read_text())}
    rows = scoreboard("cpu")
    assert [r.key for r in rows if r.key in expected] == [r.key for r in rows]
    assert {r.key for r in rows} == expected and len(rows) == len(expected)
    # Chapter order follows the notebooks' numbers; every chapter with verdicts has its notebook.
    notebooks = [r.notebook for r in rows]
    assert notebooks == sorted(notebooks) and all((ROOT / "notebooks" / f"{n}.ipynb").exists() for n in notebooks)
    assert all(r.data_url == f"{REPOSITORY_URL}/blob/main/results/cpu/{r.chapter}/verdicts.json" for r in rows)


def test_the_papers_claims_are_counted_once_and_controls_are_checks():
    rows = scoreboard("cpu")
    items = findings(rows)
    keys = [f.row.key for f in items]
    assert len(keys) == len(set(keys)) and not any(f.row.is_control for f in items)
    repeated = {r.key: r.same_as for r in rows if r.same_as and not r.is_control}
    assert repeated, "the committed verdicts declare no repeated contrast"
    for key, first in repeated.items():
        assert key not in keys and first in keys  # one row, the earlier chapter's, listing both
        assert key in {x.key for f in items if f.row.key == first for x in f.also}
    # Every claim that depends on a control shows it; every finding names its paper and the paper's number.
    assert all(f.control is not None and f.control.is_control for f in items if f.row.control)
    assert all(f.row.paper and f.row.paper["id"] in vl.papers.PAPERS and f.row.paper["where"] for f in items)
    papers = [f.paper for f in items]
    order = list(vl.papers.PAPERS)
    assert papers == sorted(papers, key=order.index), "grouped by paper, in the order of vmoe_lib.papers.PAPERS"


def test_scoreboard_html_has_one_row_per_paper_claim_with_its_badge_counts_and_control():
    rows = scoreboard("cpu")
    items = findings(rows)
    page = scoreboard_html(rows)
    assert re.findall(r'data-claim="([^"]+)"', page) == [f.row.key for f in items]
    for verdict in ("reproduced", "not reproduced", "inconclusive", "not testable"):
        n = sum(f.row.verdict == verdict for f in items)
        assert f">{n} {verdict}</span>" in page
    assert f"{len(items)} claims of the papers" in page
    assert page.count('class="vmoe-badge vmoe-') == len(items) + 4
    for f in items:
        if f.control is not None:
            assert html.escape(vl.book.control_text(f.control)) in page
        assert f'#claim-{f.row.claim_id}"' in page  # the claim's anchor in its chapter
    also = re.findall(r'data-also="([^"]+)"', page)
    assert also and all(key in {x.key for f in items for x in f.also} for key in " ".join(also).split())


def test_summary_says_what_was_found_per_paper_and_at_what_scale():
    rows = scoreboard("cpu")
    facts = vl.book.scale_facts("cpu")
    text = vl.book.summary_markdown(rows, facts)
    items = findings(rows)
    assert f"**{len(items)} claims of the papers:" in text and "Fashion-MNIST" in text and "2-core CPU" in text
    assert '<a href="#why-results-at-this-scale-may-differ">why results may differ</a>' in text
    for key in {f.paper for f in items}:
        assert f"**[{vl.papers.PAPERS[key].short}]" in text
    best = max((f for f in items if f.row.verdict == "reproduced"), key=lambda f: f.row.interval[0])
    assert best.row.anchor in text  # the clearest reproduced finding is linked


def test_a_corrupt_or_missing_verdicts_file_names_itself_and_the_fix(tmp_path):
    folder = tmp_path / "cpu" / "toy"
    folder.mkdir(parents=True)
    path = folder / "verdicts.json"
    for text, message in (("{not json", "cannot be read"), ('{"a": 1}', "is not a list of verdict records"),
                          ('[{"claim_id": "x"}]', "record 0 lacks"),
                          ('[{"claim_id": "x", "claim": "c", "verdict": "great", "min_effect": 1}]', "verdict='great'")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            scoreboard("cpu", root=tmp_path)
        assert str(path) in str(err.value) and "python -m vmoe_lib run toy --preset cpu" in str(err.value)
    (tmp_path / "gpu").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="missing or not a folder"):
        scoreboard("gpu", root=tmp_path)


def test_tables_show_words_not_python_reprs():
    from dataclasses import dataclass

    @dataclass
    class Thing:
        name: str

    frame = pd.DataFrame({"flag": [True, False], "options": [{"k": 1, "cf": 1.0}, {}], "thing": [Thing("t"), None],
                          "share": [0.125, float("nan")]}, index=["a", "b"])
    text = vl.book.table(frame)._repr_html_()
    for shown in ("yes", "no", "k: 1, cf: 1", "<td>t</td>", "0.125", "—"):
        assert shown in text, shown
    for repr_ in ("True", "False", "{", "Thing(", "nan"):
        assert repr_ not in text, repr_
    assert 'class="vmoe-table"' in text
    assert "<td>capacity_multiple: 1</td>" in vl.book.table(vl.chapters.recipes.TEST_BED_MOE)._repr_html_()


def test_repository_url_matches_the_book_config():
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s*url:\s*(\S+)", config, re.M).group(1) == REPOSITORY_URL


def test_mean_sd_text_hand_worked_and_never_wraps():
    # [80, 82] points: mean 81.00, sample sd sqrt(((80-81)^2 + (82-81)^2) / 1) = sqrt(2) = 1.41
    assert mean_sd_text([0.80, 0.82]) == "81.00\u00a0±\u00a01.41"
    assert mean_sd_text([0.8]) == "80.00"
    assert format_mean_sd(1.0, float("nan")) == "1.00"


def _run(name: str, seed: int, wall: float, threads: int, sha: str, finished: str) -> RunResult:
    manifest = {"wall_time_s": wall, "finished_at": finished, "git_sha": sha,
                "hardware": {"cpu_model": "Test CPU", "torch_threads": threads},
                "numerics": {"pinned": True}, "versions": {"torch": "2.0", "timm": "1.0"}}
    return RunResult(name=name, seed=seed, config=None, record={}, manifest=manifest, path=Path("x.json"))  # type: ignore[arg-type]


def test_provenance_reads_the_manifests():
    results = ChapterResults("routers_bpr", "cpu", [
        _run("a", 0, 1800.0, 2, "a" * 40, "2026-12-01T10:00:00+00:00"),
        _run("b", 1, 3600.0, 1, "b" * 40, "2026-12-02T11:30:00+00:00"),
    ])
    facts = vl.book.provenance(results)["value"]
    assert facts["runs"] == "2 runs, seeds [0, 1]"
    assert facts["finished"] == "2026-12-01 10:00 UTC to 2026-12-02 11:30 UTC"
    assert facts["git commit(s)"] == "aaaaaaa (1 runs), bbbbbbb (1 runs)"
    assert facts["torch threads per run"] == "2 (1 runs), 1 (1 runs)"
    assert facts["numerics pinned"] == "true"
    # 1800 s x 2 threads + 3600 s x 1 thread = 7200 core-seconds = 2.00 core-hours
    assert facts["CPU time"].startswith("2.00 core-hours")
    assert facts["records"] == f"{REPOSITORY_URL}/tree/main/results/cpu/routers_bpr/"


def test_verdict_table_shows_every_claim_with_badge_and_numbers():
    record = VerdictRecord(
        claim_id="x_beats_y", claim="X beats Y", source="Paper (Sec. 1)", contrast="x vs y", metric="test_accuracy",
        direction="greater", min_effect=0.5, paired=True, test="paired_t", family="f", n=6, effect=0.7, bound=1.2,
        p_value=0.01, p_holm=0.03, mde=0.6, control=None, verdict="reproduced", why="Holm p 0.03 < 0.05",
        interval=(0.2, 1.2),
    )
    table = vl.book.verdict_table([record])
    page = table._repr_html_()
    assert 'id="claim-x_beats_y"' in page and 'class="vmoe-badge vmoe-reproduced"' in page
    for text in ("+0.70", "[+0.20, +1.20]", "0.5", "0.01", "(0.03)", "0.60", "paired_t", "Holm p 0.03 &lt; 0.05"):
        assert text in page, text
    assert table.frame().loc["x_beats_y", "verdict"] == "reproduced"
    linked = vl.book.verdict_table([record], ROOT / "results" / "cpu" / "routers_bpr" / "verdicts.json")._repr_html_()
    assert f'<a href="{REPOSITORY_URL}/blob/main/results/cpu/routers_bpr/verdicts.json"' in linked


def _build_script():
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_replaces_papermills_parameter_cell_by_one_line(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('preset = "smoke"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('# Parameters\npreset = "cpu"\n', metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("print(preset)")]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    _build_script().tidy_executed(path, {"preset": "cpu"}, trained=False)
    cells = nbformat.read(path, as_version=4).cells
    assert [c.cell_type for c in cells] == ["code", "markdown", "code"]
    assert "`preset = 'cpu'`" in cells[1].source and "nothing was trained" in cells[1].source
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in cells)


def test_cli_scoreboard_check_readme_passes():
    out = subprocess.run([sys.executable, "-m", "vmoe_lib", "scoreboard", "--check-readme"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
