"""Writing a benchmark's table of record: the report as JSON and its markdown beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_record(out: Path, report: dict[str, Any], markdown: str) -> None:
    """Write ``out.json`` (the full report) and ``out.md`` (the table a reader looks at); say where."""
    out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"written to {out}.json and {out}.md")
