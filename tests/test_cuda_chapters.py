"""GPU readiness: every chapter's ``smoke`` preset trains on CUDA with AMP (skipped without a GPU).

Run on a machine with a GPU: ``pytest -m cuda``. The router x backend forward/backward checks under
bf16 autocast on CUDA live beside their CPU twins in ``test_bad_input.py``.
"""

from __future__ import annotations

import pytest
import torch

from vmoe_lib.chapters import CHAPTERS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with pytest -m cuda where one is)"),
]


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_chapter_smoke_preset_trains_on_cuda_with_amp(name, tmp_path, monkeypatch):
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMOE_REQUIRE_RESULTS", raising=False)
    chapter = CHAPTERS[name]
    results = chapter.run("smoke", device="cuda", progress=False, workers=1)
    assert results.results
    for r in results.results:
        assert r.record["device"].startswith("cuda") and r.config.amp
        assert all(0.0 <= v <= 1.0 for k, v in r.final.items() if k.endswith("accuracy"))
        assert r.manifest["hardware"].get("gpu")
    chapter.verdicts(results, write=False)
