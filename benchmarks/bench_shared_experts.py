"""What a shared expert costs: training steps of chapter 7's models, side by side.

Chapter 7 trains chapter 2's depth-6 ViT-pico at its 5 placements with an ungated shared expert in every MoE layer,
routed experts and shared expert narrowed to half the MLP width (k = 1: the dense model's activated FLOPs), and a
model with only some layers MoE. What the narrower experts and the extra shared MLP cost per step is measured here
before the chapter is sized:

* the chapter's ``cpu`` configs (:func:`vmoe_lib.chapters.shared_experts.shared_config` of chapter 2's configs) beside
  chapter 2's All and Last-2 models without a shared expert and its dense model: parameters in total and activated per
  token, forward FLOPs per image, the time of one training step of 128 images and the evaluation throughput;
* measured interleaved, the minimum over ``--repeats`` kept, on random images of the chapter's shape, in a worker's
  environment (1 thread, pinned numerics). ``vs dense`` is relative to the dense model.

The pruned model's MoE blocks are a stand-in here (the last three): the chapter's own come from its All models'
routing analysis; which blocks are MoE changes what a step costs little (they are the same blocks).

Writes ``results/benchmarks/<device>/shared_experts.{json,md}`` (``--out`` to choose), which chapter 7 shows.

Usage::

    python benchmarks/bench_shared_experts.py                 # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def configs() -> dict[str, Any]:
    """Model name -> the chapter's ``cpu`` config of it; ``"dense"`` is chapter 2's dense ViT."""
    import vmoe_lib as vl
    from vmoe_lib.chapters.shared_experts import PRUNED, pruned_config, shared_config

    chapter = vl.chapters.get_chapter("shared_experts")
    plain = chapter.plain_configs(chapter.preset("cpu"))
    out: dict[str, Any] = {"dense": plain["vit_dense"]}
    for tag in ("all", "last2"):
        out[f"vit_{tag}"] = plain[f"vit_{tag}"]
        out[f"vit_{tag}_shared"] = shared_config(plain[f"vit_{tag}"])
    out[PRUNED] = pruned_config(plain["vit_all"], [3, 4, 5])
    return out


if __name__ == "__main__":
    from _train_step import main

    main(__doc__.split("\n\n")[0], configs, "benchmarks/bench_shared_experts.py", "shared_experts")
