"""The prepared GPU check (``scripts/gpu_check.sh``, ``scripts/gpu_slivers.py``) stays runnable without a GPU here:
the shell script parses and refuses to run without CUDA, and every chapter's gpu preset yields sliver configs that
validate (the dry run that trains them on the CPU is ``python scripts/gpu_slivers.py --device cpu --per-chapter 1
--dataset fashion_mnist``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_slivers import SLIVER, chapter_configs, native_size  # noqa: E402


def test_gpu_check_script_parses_and_needs_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script itself")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr


def test_every_chapter_gpu_preset_has_sliver_configs():
    from vmoe_lib.chapters import CHAPTERS

    for name, chapter in CHAPTERS.items():
        configs, _ = chapter_configs(chapter, 2)
        assert configs, name
        for run, config in configs:
            sliver = config.replace(**SLIVER, dataset="fashion_mnist",
                                    image_size=config.image_size or native_size(config.model))
            assert sliver.epochs == 1 and sliver.train_subset == SLIVER["train_subset"], (name, run)
    assert native_size("vit_tiny_patch4_32") == 32 and native_size("vmoe_vit_pico_patch7_28") == 28
