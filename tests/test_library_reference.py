"""The library reference (book/library.md and one page per public module under book/library/) documents every public
module of vmoe_lib and everything each one exports.

Public: every module whose dotted name has no ``_``-prefixed part. The submodules of ``layers``, ``routers``,
``models`` and ``distributed`` are implementation files: what they offer is what their package re-exports in ``__all__``.
A module's exports are the classes and functions of its ``__all__``; the model sizes registered with timm
(``vit_pico_patch7_28``, ...) are reached through ``create_model(name)`` and named by ``list_models()``, so
they are not listed one by one. An object counts as documented when some ``automodule`` directive of the
page names it (under whichever module), and it must have a docstring of its own, or autodoc leaves it out.
The built page itself is checked in tests/test_book_browser.py (no torch docstrings leak into it).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import timm

import vmoe_lib

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_PAGES = [ROOT / "book" / "library.md", *sorted((ROOT / "book" / "library").glob("*.md"))]
DOCUMENTED_BY_PACKAGE = ("vmoe_lib.layers.", "vmoe_lib.routers.", "vmoe_lib.models.", "vmoe_lib.distributed.")


def _directives() -> dict[str, list[str]]:
    """``automodule`` name -> the members it lists (its ``__all__`` for a bare ``:members:``)."""
    found: dict[str, list[str]] = {}
    text = "\n".join(page.read_text() for page in LIBRARY_PAGES)
    for match in re.finditer(r"\.\. automodule:: (\S+)((?:\n[ \t]+:[^\n]*)*)", text):
        module = importlib.import_module(match.group(1))
        members = re.search(r":members:(.*)", match.group(2))
        names = [n.strip() for n in members.group(1).split(",") if n.strip()] if members else []
        if members and not names:
            names = list(getattr(module, "__all__", []))
        found[match.group(1)] = names
    return found


def _public_modules() -> list[str]:
    names = ["vmoe_lib"] + [m.name for m in pkgutil.walk_packages(vmoe_lib.__path__, "vmoe_lib.")]
    return [n for n in names if not any(part.startswith("_") for part in n.split("."))
            and not n.startswith(DOCUMENTED_BY_PACKAGE)]


def _exports(module_name: str) -> dict[str, object]:
    module = importlib.import_module(module_name)
    exported = {}
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not timm.models.is_model(name):
            exported[name] = obj
    return exported


def test_every_public_module_has_a_section():
    missing = sorted(set(_public_modules()) - set(_directives()))
    assert not missing, f"modules without an `.. automodule::` directive in book/library.md: {missing}"


def test_every_export_is_documented_once():
    documented: dict[int, list[str]] = {}
    for module_name, names in _directives().items():
        module = importlib.import_module(module_name)
        for name in names:
            assert hasattr(module, name), f"book/library.md lists {module_name}.{name}, which does not exist"
            documented.setdefault(id(getattr(module, name)), []).append(f"{module_name}.{name}")
    twice = sorted(paths for paths in documented.values() if len(paths) > 1)
    assert not twice, f"objects documented twice in book/library.md: {twice}"
    missing = [f"{m}.{name}" for m in _public_modules() for name, obj in _exports(m).items() if id(obj) not in documented]
    assert not missing, "exported (in __all__) but not listed in book/library.md:\n  " + "\n  ".join(missing)


def test_every_documented_object_has_its_own_docstring():
    bare = []
    for module_name, names in _directives().items():
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                bare.append(f"{module_name}.{name}")
    assert not bare, f"listed in book/library.md without a docstring (autodoc would leave them out): {bare}"


def test_one_page_per_public_module_in_the_table_of_contents():
    """Each public module has a page of its own (its submodules' directives on the package's page), and the index
    links every page."""
    pages = {p.stem: p for p in (ROOT / "book" / "library").glob("*.md")}
    packaged = [m for m in _public_modules() if m not in pages]
    assert not packaged, f"public modules without a page book/library/<module>.md: {packaged}"
    for name, page in pages.items():
        modules = re.findall(r"\.\. automodule:: (\S+)", page.read_text())
        assert modules and modules[0] == name, f"{page} should document {name} first, documents {modules}"
        assert page.read_text().startswith(f"# `{name}`"), f"{page}: title is not the module's name"
    index = (ROOT / "book" / "library.md").read_text()
    assert not re.search(r"\.\. automodule::", index), "book/library.md is the index; the directives live on the pages"
    missing = [n for n in pages if f"<library/{n}>" not in index]
    assert not missing, f"book/library.md does not link {missing}"
    assert "glob: book/library/*" in (ROOT / "_toc.yml").read_text()
