"""Source notebooks: clean, parameterised for papermill, launchable in Colab, thin over the library."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _cells(nb_path: Path) -> list[dict]:
    return json.loads(nb_path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_chapters():
    assert NOTEBOOKS, "notebooks/ holds no chapter"
    for nb in NOTEBOOKS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", nb.name), f"{nb.name}: chapters are named NN_topic.ipynb"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(nb):
    for i, cell in enumerate(_cells(nb)):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{nb.name} cell {i} has outputs; commit notebooks clean"
            assert cell.get("execution_count") is None, f"{nb.name} cell {i} has an execution count"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_plain_literals(nb):
    tagged = [c for c in _cells(nb) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name}: want exactly one cell tagged 'parameters', found {len(tagged)}"
    tree = ast.parse(_source(tagged[0]))
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, f"{nb.name}: parameters cell holds only `name = literal`"
        ast.literal_eval(node.value)  # raises on anything derived (papermill would not recompute it)
        names.add(node.targets[0].id)
    assert {"preset", "seeds", "device", "overrides"} <= names
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body}
    assert values["preset"] == "smoke", "the default preset is smoke (CI executes notebooks with their defaults)"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_points_at_this_notebook(nb):
    first = _source(_cells(nb)[0])
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]
    url = f"https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{nb.name}"
    assert url in first, f"{nb.name}: the first cell needs an 'Open in Colab' badge linking {url}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_metadata_and_library_use(nb):
    meta = json.loads(nb.read_text())["metadata"]
    assert meta.get("accelerator") == "GPU"
    assert meta["kernelspec"]["name"] == "python3"
    code = "\n".join(_source(c) for c in _cells(nb) if c["cell_type"] == "code")
    assert "import vmoe_lib as vl" in code
    assert "google.colab" in code, "a Colab setup cell installs the library when run in Colab"
    # Chapters stay thin: no training loops, optimisers or model code in a notebook.
    for forbidden in ("optimizer.step", ".backward(", "nn.Module", "def forward"):
        assert forbidden not in code, f"{nb.name} contains {forbidden!r}; that belongs in vmoe_lib"


def test_every_chapter_is_in_the_toc():
    listed = {entry["file"] for part in TOC["parts"] for entry in part["chapters"]}
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}" in listed, f"{nb.name} is not in _toc.yml"


def test_book_config_is_jupyter_book_v1_with_colab():
    assert CONFIG["execute"]["execute_notebooks"] == "off"
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert CONFIG["repository"]["url"].startswith("https://github.com/")
