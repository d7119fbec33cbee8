"""What routing whole images costs: training steps of chapter 6's models, side by side.

Chapter 6 trains chapter 5's ViTs (depth 4, patch 7, 28x28 images) at widths 16 and 64 with their last 2 blocks MoE
(4 experts, k = 1), routed per image (guided by super-classes, or end to end) or per token, against the dense model of
each width. Every MoE model activates the FLOPs of its dense model; what its routing, dispatch and auxiliary losses
cost per step is measured here before the chapter is sized:

* the chapter's ``cpu`` configs (:func:`vmoe_lib.chapters.image_routing.moe_config` of chapter 5's dense models):
  parameters in total and activated per token, forward FLOPs per image, the time of one training step of 128 images
  (the guided router given the batch's labels, as in training) and the evaluation throughput;
* measured interleaved, the minimum over ``--repeats`` kept, on random images of the chapter's shape, in a worker's
  environment (1 thread, pinned numerics). ``vs dense`` is relative to the dense model at width 64.

The super-classes of the guided models are a stand-in here (classes in turn over the 4 experts): which classes share
an expert changes what the router learns, not what a step costs; the chapter's own come from a trained dense model.

Writes ``results/benchmarks/<device>/image_routing.{json,md}`` (``--out`` to choose), which chapter 6 shows.

Usage::

    python benchmarks/bench_image_routing.py                  # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def configs() -> dict[str, Any]:
    """Model name -> the chapter's ``cpu`` config of it; ``"dense"`` is the dense model at the base width."""
    import vmoe_lib as vl
    from vmoe_lib.chapters.image_routing import dense_name, moe_config, run_name

    chapter = vl.chapters.get_chapter("image_routing")
    preset = chapter.preset("cpu")
    experts, base = int(preset.settings["experts"]), chapter.base_width(preset)
    dense = chapter.dense_configs(preset)
    stand_in = [c % experts for c in range(10)]
    out: dict[str, Any] = {}
    for w in chapter.widths(preset):
        out["dense" if w == base else dense_name(w)] = dense[w]
        out[run_name("image_sc", w)] = moe_config(dense[w], "image_sc", experts, stand_in)
    out[run_name("image_e2e", base)] = moe_config(dense[base], "image_e2e", experts)
    out[run_name("token", base)] = moe_config(dense[base], "token", experts)
    return out


if __name__ == "__main__":
    from _train_step import main

    main(__doc__.split("\n\n")[0], configs, "benchmarks/bench_image_routing.py", "image_routing")
