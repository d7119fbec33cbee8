"""What model size and experts per token cost: training steps of chapter 5's models, side by side.

Chapter 5 trains the book's test bed family (ViTs of depth 4 and patch 7 on 28x28 images) at several widths, each as
a dense model and as its MoE version (every block MoE, 8 experts, softmax token choice with k = 1), and the test bed's
width with k = 2 and k = 4 experts per token. Wider models cost more per step, and so does every extra expert per
token; this script measures how much before the chapter is sized:

* the chapter's own ``cpu`` configs (``model_scale``'s runs): parameters in total and activated per image, forward
  FLOPs per image, the time of one training step of 128 images and the evaluation throughput;
* measured interleaved, the minimum over ``--repeats`` kept, on random images of the chapter's shape, in a worker's
  environment (1 thread, pinned numerics: the script re-executes itself in it). ``vs dense`` is relative to the test
  bed's dense model (width 64).

Writes ``results/benchmarks/<device>/model_scale.{json,md}`` (``--out`` to choose), which chapter 5 shows.

Usage::

    python benchmarks/bench_model_scale.py                  # ~3 min on 2 CPU cores
    python benchmarks/bench_model_scale.py --repeats 30 --out /tmp/model_scale
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def configs() -> dict[str, Any]:
    """Model name -> the chapter's ``cpu`` config of it; ``"dense"`` is the test bed's dense model."""
    import vmoe_lib as vl

    chapter = vl.chapters.get_chapter("model_scale")
    plan = chapter.experiment("cpu")
    base = chapter.base_width("cpu")
    return {("dense" if name == f"dense_w{base}" else name): config for name, config in plan.items()}


if __name__ == "__main__":
    from _train_step import main

    main(__doc__.split("\n\n")[0], configs, "benchmarks/bench_model_scale.py", "model_scale")
