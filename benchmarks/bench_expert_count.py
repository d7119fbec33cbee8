"""What the number of experts costs: training steps of chapter 4's models, side by side.

Chapter 4 trains the book's test bed (ViT-pico, every block MoE, softmax token choice with k = 1, capacity factor 1)
with 2 to 16 experts. Every expert count activates the same FLOPs per token (one expert of the dense MLP's size per
token), so a growing step time is the cost of the expert bank itself: more, smaller per-expert matrix products, the
router's larger output, the optimiser's larger state. This script measures it before the chapter is sized:

* for the dense model and E in {2, 4, 8, 16, 32} (32 is not in the chapter: it shows where the trend goes), the
  chapter's own ``cpu`` configs (``experts_data``'s ``e8_full`` with ``num_experts`` changed): parameters in total and
  activated per image, forward FLOPs per image, the time of one training step of 128 images (forward, loss with the
  auxiliary loss, backward, the engine's AdamW step) and the evaluation throughput (no gradients, batches of 1000);
* measured interleaved (dense, E=2, ..., E=32, dense, ...), the minimum over ``--repeats`` kept, on random images
  of the chapter's shape, in a worker's environment (1 thread, pinned numerics: the script re-executes itself in it).

Writes ``results/benchmarks/<device>/expert_count.{json,md}`` (``--out`` to choose), which chapter 4 shows.

Usage::

    python benchmarks/bench_expert_count.py                  # ~2 min on 2 CPU cores
    python benchmarks/bench_expert_count.py --repeats 30 --out /tmp/expert_count
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXPERTS = (2, 4, 8, 16, 32)


def configs() -> dict[str, Any]:
    """Model name -> the chapter's ``cpu`` config of it (the dense model and each expert count)."""
    import vmoe_lib as vl

    chapter = vl.chapters.get_chapter("experts_data")
    plan = chapter.experiment("cpu")
    moe = plan["e8_full"]
    out = {"dense": plan["dense_full"]}
    for e in EXPERTS:
        out[f"{e} experts"] = moe.replace(model_kwargs={**moe.model_kwargs, "num_experts": e})
    return out


if __name__ == "__main__":
    from _train_step import main

    main(__doc__.split("\n\n")[0], configs, "benchmarks/bench_expert_count.py", "expert_count")
