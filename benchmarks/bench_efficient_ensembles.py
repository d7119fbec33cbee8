"""What an efficient ensemble of experts costs: training steps of chapter 8's models, side by side.

Chapter 8 trains chapter 2's depth-6 ViT-pico with MoE layers Last-2 (8 experts, k = 1) as a single MoE and as an E³
model of 2 members (4 experts each, k = 1 per member; blocks 3 to 5 run on both copies of each image), and the dense
ViT; a deep ensemble is two single MoEs. What E³'s tiling costs per training step is measured here before the chapter
is sized:

* the chapter's ``cpu`` configs (:func:`vmoe_lib.chapters.efficient_ensembles.single_config` and ``e3_config`` of
  chapter 2's configs, no label smoothing): parameters in total and activated per image, forward FLOPs per image, the
  time of one training step of 128 images and the evaluation throughput;
* measured interleaved, the minimum over ``--repeats`` kept, on random images of the chapter's shape, in a worker's
  environment (1 thread, pinned numerics). ``vs dense`` is relative to the dense model.

Writes ``results/benchmarks/<device>/efficient_ensembles.{json,md}`` (``--out`` to choose), which chapter 8 shows.

Usage::

    python benchmarks/bench_efficient_ensembles.py                 # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def configs() -> dict[str, Any]:
    """Model name -> the chapter's ``cpu`` config of it; ``"dense"`` is the dense ViT."""
    import vmoe_lib as vl
    from vmoe_lib.chapters.efficient_ensembles import E3, SINGLE, e3_config, single_config

    chapter = vl.chapters.get_chapter("efficient_ensembles")
    plain = chapter.plain_configs(chapter.preset("cpu"))
    return {"dense": single_config(plain["dense"]), SINGLE: single_config(plain["moe"]), E3: e3_config(plain["moe"])}


if __name__ == "__main__":
    from _train_step import main

    main(__doc__.split("\n\n")[0], configs, "benchmarks/bench_efficient_ensembles.py", "efficient_ensembles")
