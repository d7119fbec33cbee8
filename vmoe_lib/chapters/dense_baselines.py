"""Chapter 0 — dense baselines: the ViTs and ConvNeXts every MoE chapter compares against.

No paper of the book publishes dense baselines at our scale (V-MoE trains no
dense ImageNet-1k model either), so the book trains its own: tiny ViTs (where
MoE layers are reported to help most, arXiv:2411.18322) and a tiny ConvNeXt,
on Fashion-MNIST on a 2-core CPU (``cpu``) or CIFAR-10 on a GPU (``gpu``).

Checks the chapter ends with (computed from the stored runs):

* ``scale`` — the larger dense ViT is more accurate than the smaller one;
* ``convnet_prior`` — on a small dataset a ConvNeXt beats a ViT of no more
  compute (ViT, Dosovitskiy et al., arXiv:2010.11929, Sec. 4: ViTs lack the
  convolutional inductive biases and underperform CNNs when data is small);
* ``resolution`` — how small a difference the seeds can resolve, against the
  +0.5-1 point gains reported for tiny MoE models (arXiv:2411.18322).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..analysis import Verdict, compare, decide, describe_comparison, summary_table, write_verdicts
from ..train import TrainConfig
from .base import ChapterResults, Preset, preset_frame, run_sweep, select_preset
from .recipes import SMOKE_DATA, cifar_recipe, fashion_mnist_recipe

NAME = "dense_baselines"

# The MoE layer of every test-bed candidate: V-MoE's softmax token choice with k = 1 (so the
# activated FLOPs equal the dense model's), 8 experts, routing groups of 8 images, training
# capacity factor 1.0 and an inference capacity factor of 8 = E, at which no token is ever dropped
# (a k = 1 token activates at most one expert at any capacity, so compute stays equal).
TEST_BED_MOE: dict[str, Any] = {
    "router": "softmax_token_choice", "k": 1, "num_experts": 8, "group_size": 8, "capacity_factor": 1.0,
    "eval_capacity_factor": 8.0, "router_options": {"capacity_multiple": 1},
}


@dataclass(frozen=True)
class Candidate:
    """One test-bed candidate: a dense model and its MoE version trained with the same recipe.

    ``placement`` is the MoE model's ``moe_layers``; ``epochs`` the training length of both.
    """

    name: str
    family: str  # "vit" | "convnext"
    dense: str
    placement: Any
    epochs: int

    @property
    def dense_run(self) -> str:
        return f"{self.dense_key}_e{self.epochs}"

    @property
    def dense_key(self) -> str:
        return self.dense.split("_patch")[0].replace("_32", "")

    @property
    def moe_run(self) -> str:
        return f"moe_{self.name}"


def _candidates(vit: str, convnext: str, vit_epochs: Sequence[int], conv_epochs: Sequence[int]) -> tuple[Candidate, ...]:
    out = [Candidate(f"{vit.split('_patch')[0]}_{tag}_e{e}", "vit", vit, placement, e)
           for e in vit_epochs for tag, placement in (("last2", "last-2"), ("all", "all"))]
    out += [Candidate(f"{convnext.replace('_32', '')}_s2every2_e{e}", "convnext", convnext, "s2:every-2", e)
            for e in conv_epochs]
    return tuple(out)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: 2 test-bed candidates on 2,048 Fashion-MNIST images, 1 epoch, 2 seeds (CI)",
        hardware="CPU, 2 cores",
        expected_minutes=1.5,
        seeds=(0, 1),
        settings={"candidates": (Candidate("vit_pico_last2_e1", "vit", "vit_pico_patch7_28", "last-2", 1),
                                 Candidate("convnext_zepto_s2every2_e1", "convnext", "convnext_zepto_32", "s2:every-2", 1)),
                  **SMOKE_DATA},
    ),
    "cpu": Preset(
        name="cpu",
        description="test-bed calibration on Fashion-MNIST (55k train images): ViT-pico dense vs MoE "
                    "(Last-2 or all 4 blocks MoE) at 3 and 6 epochs, 6 seeds; ConvNeXt-zepto dense vs MoE "
                    "(stage 3, every 2nd block) at 3 epochs, 4 seeds",
        hardware="CPU, 2 cores, 2 workers x 1 thread, pinned numerics",
        expected_minutes=80.0,
        seeds=(0, 1, 2, 3, 4, 5),
        settings={"candidates": _candidates("vit_pico_patch7_28", "convnext_zepto_32", (3, 6), (3,)),
                  "seeds_by_family": {"convnext": (0, 1, 2, 3)}},
    ),
    "gpu": Preset(
        name="gpu",
        description="test-bed calibration on CIFAR-10 (45k train images): ViT-nano/4 dense vs MoE (Last-2 or all) "
                    "and ConvNeXt-atto dense vs MoE at 50 epochs, 6 seeds (needs CIFAR-10: see the data section)",
        hardware="1 GPU (estimated, not yet measured), bf16 autocast",
        expected_minutes=150.0,
        seeds=(0, 1, 2, 3, 4, 5),
        settings={"candidates": _candidates("vit_nano_patch4_32", "convnext_atto_32", (50,), (50,))},
    ),
}


def candidates(preset: str) -> tuple[Candidate, ...]:
    """The test-bed candidates of a preset."""
    return tuple(select_preset(PRESETS, preset).settings["candidates"])


def experiment(preset: str) -> dict[str, TrainConfig]:
    """The sweep of a preset: run name -> config (each candidate's dense model, once per epoch count, and its MoE model)."""
    p = select_preset(PRESETS, preset)
    s = {k: v for k, v in p.settings.items() if k not in ("candidates", "seeds_by_family")}
    out: dict[str, TrainConfig] = {}
    for c in p.settings["candidates"]:
        moe_kwargs = {"moe_layers": c.placement, **TEST_BED_MOE}
        if preset == "gpu":
            dense = cifar_recipe(c.dense, epochs=c.epochs, **s)
            moe = cifar_recipe(f"vmoe_{c.dense}", epochs=c.epochs, model_kwargs=moe_kwargs, **s)
        else:
            dense = fashion_mnist_recipe(c.dense, epochs=c.epochs, **s)
            moe = fashion_mnist_recipe(f"vmoe_{c.dense}", epochs=c.epochs, model_kwargs=moe_kwargs, **s)
        out.setdefault(c.dense_run, dense)
        out[c.moe_run] = moe
    return out


def seeds_of(preset: str, run_name: str) -> tuple[int, ...]:
    """The seeds a run of the preset is trained with (ConvNeXt runs may use fewer, see the preset)."""
    p = select_preset(PRESETS, preset)
    by_family = p.settings.get("seeds_by_family", {})
    family = "convnext" if "convnext" in experiment(preset)[run_name].model else "vit"
    return tuple(by_family.get(family, p.seeds))


def run(
    preset: str = "smoke",
    seeds: Sequence[int] | None = None,
    device: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    **sweep: Any,
) -> ChapterResults:
    """Load the preset's results, training whatever is missing (unless results are required).

    With ``seeds=None`` each run gets its seeds of record (:func:`seeds_of`); a seed list applies to every run.
    ``sweep`` holds :func:`~vmoe_lib.chapters.base.run_sweep`'s ``workers``, ``executor`` and ``slurm``.
    """
    configs = experiment(preset)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in configs:
        groups.setdefault(seeds_of(preset, name), []).append(name)
    parts = []
    for own, names in groups.items():
        parts.append(run_sweep(NAME, PRESETS, lambda p, names=names: {n: experiment(p)[n] for n in names}, preset,
                               seeds=seeds, device=device, overrides=overrides, progress=progress, record_seeds=own,
                               **run_options(preset), **sweep))
    return ChapterResults(NAME, parts[0].preset, [r for part in parts for r in part.results],
                          of_record=all(part.of_record for part in parts))


def run_options(preset: str) -> dict[str, Any]:
    """What a run of this chapter needs beyond its config (none here; see ``routers_bpr.run_options``)."""
    return {}


def preset_table() -> pd.DataFrame:
    """The presets, their hardware and expected wall time (for the chapter header)."""
    return preset_frame(PRESETS)


def model_table(results: ChapterResults) -> pd.DataFrame:
    """Per model: size, FLOPs, measured throughput and accuracy (mean and std over seeds, in %).

    Throughput is per epoch, averaged over seeds: the median epoch and the best one. They differ
    when other jobs shared the machine during a run; the best epoch is the closest to an idle machine.
    """
    table = summary_table(results.results)
    out = pd.DataFrame(index=table.index)
    out["params (k)"] = (table["params_total"] / 1e3).round(1)
    out["MFLOPs / image"] = (table["flops_per_image"] / 1e6).round(2)
    out["train img/s (median epoch)"] = table["images_per_s"].round(0)
    out["train img/s (best epoch)"] = table["images_per_s_best"].round(0)
    out["minutes / run"] = (table["wall_time_s"] / 60).round(1)
    out["seeds"] = table["seeds"]
    for split in ("val", "test"):
        out[f"{split} acc. (%)"] = [
            f"{m * 100:.2f} ± {s * 100:.2f}" if np.isfinite(s) else f"{m * 100:.2f}"
            for m, s in zip(table[f"{split}_accuracy_mean"], table[f"{split}_accuracy_std"])
        ]
    return out




def verdicts(results: ChapterResults, *, write: bool = True) -> list[Verdict]:
    """The chapter's checks, computed from its runs (and written to ``verdicts.json``)."""
    groups = results.by_name()
    costs = {name: runs[0].record["costs"]["flops_per_image"] for name, runs in groups.items()}
    vits = sorted((n for n in groups if n.startswith("vit")), key=costs.get)
    convs = [n for n in groups if n.startswith("convnext")]
    out: list[Verdict] = []
    n_seeds = min(len(v) for v in groups.values())
    why_scale = f"{n_seeds} seed(s); {results.preset} budget ({results.results[0].config.epochs} epochs)"

    if len(vits) >= 2:
        small, large = vits[0], vits[-1]
        c = compare(results.values(large), results.values(small))
        v = decide(c)
        out.append(Verdict(
            claim_id="scale",
            claim=f"The larger dense ViT ({large}) is more accurate than the smaller ({small})",
            source="ViT scaling (Zhai et al., arXiv:2106.04560)",
            paper_evidence="accuracy rises with model size at fixed data",
            measurement="test acc. " + describe_comparison(c),
            verdict=v,
            why=why_scale,
            values={large: results.values(large), small: results.values(small)},
            statistics=c.__dict__,
        ))
    if convs and vits:
        conv = convs[0]
        cheaper = [n for n in vits if costs[n] <= costs[conv]] or vits[:1]
        vit = max(cheaper, key=lambda n: np.mean(results.values(n)))
        c = compare(results.values(conv), results.values(vit))
        out.append(Verdict(
            claim_id="convnet_prior",
            claim=f"On small data a ConvNeXt ({conv}) beats the best ViT of no more FLOPs ({vit})",
            source="ViT (Dosovitskiy et al., arXiv:2010.11929, Sec. 4)",
            paper_evidence="ViTs underperform CNNs when pre-trained on small datasets",
            measurement=f"test acc. {describe_comparison(c)}; FLOPs {costs[conv] / 1e6:.1f}M vs {costs[vit] / 1e6:.1f}M",
            verdict=decide(c),
            why=why_scale,
            values={conv: results.values(conv), vit: results.values(vit)},
            statistics=c.__dict__,
        ))
    stds = {n: float(np.std(results.values(n), ddof=1)) for n in groups if len(groups[n]) > 1}
    if stds:
        pooled = float(np.sqrt(np.mean(np.square(list(stds.values())))))
        n = n_seeds
        dof = max(1, 2 * n - 2)
        # Smallest mean difference a one-sided Welch test (alpha 0.05) flags with n seeds per arm, at this spread.
        detectable = float(stats.t.ppf(0.95, dof) * pooled * np.sqrt(2.0 / n))
        verdict = "holds" if detectable <= 0.005 else ("does not hold" if detectable > 0.01 else "partly")
        out.append(Verdict(
            claim_id="resolution",
            claim=f"With {n} seeds, the baselines resolve the +0.5-1 point gains reported for tiny MoE models",
            source="Sweet-spot study (Videau et al., arXiv:2411.18322)",
            paper_evidence="MoE gains of about +0.5 to +1 point for tiny/small models",
            measurement=f"seed std {pooled * 100:.2f} points (pooled); smallest resolvable gain {detectable * 100:.2f} points",
            verdict=verdict,
            why="holds: <= 0.5 point; partly: 0.5-1 point; does not hold: > 1 point",
            values={name: results.values(name) for name in stds},
            statistics={"pooled_std": pooled, "detectable_difference": detectable, "seeds": n},
        ))
    if write:
        write_verdicts(out, results.verdicts_path())
    return out

