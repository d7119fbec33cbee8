"""Chapter 0 — dense baselines and the test bed every MoE chapter trains on.

No paper of the book publishes baselines at our scale, so the book trains its own dense models
and, with them, calibrates the **test bed**: the cheapest setting in which MoE layers carry
measurable weight and seeds agree. Each candidate is a dense model and its MoE version (V-MoE's
softmax token choice, k = 1, 8 experts: the same activated FLOPs), trained with the same recipe
and seeds. For each candidate the chapter measures, from the stored runs:

* the seed sd of test accuracy (dense and MoE);
* the MoE-vs-dense gain, paired by seed (same data order);
* the positive control: the accuracy lost when every MoE layer is bypassed at inference
  (:func:`~vmoe_lib.models.moe_utils.bypass_moe`) — the weight the experts carry;
* the CPU minutes per run with the parallel executor.

The test bed of record is chosen by :meth:`DenseBaselines.choose_test_bed`, a rule fixed before the runs were
read: among the ViT candidates whose positive control passed, the one with the highest
resolution per CPU hour, ``gain / sd / sqrt(hours per run)`` (the t-statistic a paired comparison
reaches per square root of CPU hour); ConvNeXt likewise among its candidates.

Claims (pre-registered in :meth:`DenseBaselines.claims`, decided by :mod:`vmoe_lib.stats`):

* ``experts_carry_weight_<candidate>`` — bypassing the MoE layers costs at least 1 point
  (positive control of the candidate; per-image McNemar pooled over seeds);
* ``moe_vs_dense_<candidate>`` — the MoE model beats its dense model at equal activated FLOPs
  (V-MoE; the sweet-spot study's +0.5-1 point for tiny models), paired by seed;
* ``convnet_prior`` — on small data a ConvNeXt beats a ViT trained as long (ViT, Sec. 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis import format_mean_sd, summary_table
from ..plots import _color, style
from ..stats import Claim, seeds_for_mde
from ..papers import PaperNumber
from .base import Chapter, ChapterResults, Preset, Run, SeedPaired, control_claim
from .recipes import SMOKE_DATA, SWEET_SPOT_GAIN, TEST_BED_MOE, Candidate, cifar_recipe, fashion_mnist_recipe

__all__ = ["NAME", "PRESETS", "DenseBaselines", "chapter"]

NAME = "dense_baselines"


def _candidates(vit: str, convnext: str, vit_epochs: Sequence[int], conv_epochs: Sequence[int]) -> tuple[Candidate, ...]:
    out = [Candidate(f"{vit.split('_patch')[0]}_{tag}_{e}ep", "vit", vit, placement, e)
           for e in vit_epochs for tag, placement in (("last2", "last-2"), ("all", "all"))]
    out += [Candidate(f"{convnext.replace('_32', '')}_s2every2_{e}ep", "convnext", convnext, "s2:every-2", e)
            for e in conv_epochs]
    return tuple(out)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: 2 test-bed candidates on 2,048 Fashion-MNIST images, 1 epoch, 2 seeds (CI)",
        hardware="CPU, 2 cores",
        expected_minutes=1.5,
        seeds=(0, 1),
        settings={"candidates": (Candidate("vit_pico_last2_1ep", "vit", "vit_pico_patch7_28", "last-2", 1),
                                 Candidate("convnext_zepto_s2every2_1ep", "convnext", "convnext_zepto_32", "s2:every-2", 1)),
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


FAMILY = NAME
CONTROL_MIN_EFFECT = 1.0
GAIN_MIN_EFFECT = 0.5


class DenseBaselines(Chapter):
    """Chapter 0: dense baselines and the test bed (see the module's docstring)."""

    name = NAME
    title = "Dense baselines and the test bed"
    presets = PRESETS

    def candidates(self, preset: str) -> tuple[Candidate, ...]:
        """The test-bed candidates of a preset."""
        return tuple(self.preset(preset).settings["candidates"])

    def runs(self, preset: Preset) -> list[Run]:
        """Each candidate's dense model (once per model and epoch count) and its MoE model; ConvNeXt runs may have
        fewer seeds (the preset's ``seeds_by_family``)."""
        s = {k: v for k, v in preset.settings.items() if k not in ("candidates", "seeds_by_family")}
        by_family = preset.settings.get("seeds_by_family", {})
        out: dict[str, Run] = {}
        for c in preset.settings["candidates"]:
            moe_kwargs = {"moe_layers": c.placement, **TEST_BED_MOE}
            if preset.name == "gpu":
                dense = cifar_recipe(c.dense, epochs=c.epochs, **s)
                moe = cifar_recipe(f"vmoe_{c.dense}", epochs=c.epochs, model_kwargs=moe_kwargs, **s)
            else:
                dense = fashion_mnist_recipe(c.dense, epochs=c.epochs, **s)
                moe = fashion_mnist_recipe(f"vmoe_{c.dense}", epochs=c.epochs, model_kwargs=moe_kwargs, **s)
            seeds = tuple(by_family[c.family]) if c.family in by_family else None
            out.setdefault(c.dense_run, Run(c.dense_run, dense, seeds))
            out[c.moe_run] = Run(c.moe_run, moe, seeds)
        return list(out.values())

    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims for a preset, declared before any result is read."""
        out: list[Claim] = []
        cands = self.candidates(preset)
        for c in cands:
            control = f"experts_carry_weight_{c.name}"
            out.append(control_claim(
                c.moe_run, claim_id=control, family=f"{FAMILY}:controls", min_effect=CONTROL_MIN_EFFECT,
                min_effect_why="the papers' routing effects are 0.3-1 point; experts that carry less than 1 point cannot show them"))
            out.append(Claim(
                id=f"moe_vs_dense_{c.name}",
                claim=f"The MoE model ({c.moe_run}) beats its dense model ({c.dense_run}) at equal activated FLOPs",
                source="V-MoE (Riquelme et al., arXiv:2106.05974, Sec. 3); sweet-spot study (arXiv:2411.18322, Sec. 4)",
                contrast=f"{c.moe_run} vs {c.dense_run}", test="paired_t", min_effect=GAIN_MIN_EFFECT,
                min_effect_why="tiny MoE ViTs gain +0.5 to +1 point over dense ones (arXiv:2411.18322); the low end",
                family=FAMILY, paired=True, control=control, measure=SeedPaired(c.moe_run, c.dense_run),
                paper=SWEET_SPOT_GAIN[(c.family, c.placement)],
            ))
        vit = [c for c in cands if c.family == "vit"]
        conv = [c for c in cands if c.family == "convnext"]
        if vit and conv:
            v, k = vit[0], conv[0]
            out.append(Claim(
                id="convnet_prior",
                claim=f"On small data a ConvNeXt ({k.dense_run}) beats a ViT trained as long ({v.dense_run})",
                source="ViT (Dosovitskiy et al., arXiv:2010.11929, Sec. 4.2 and Fig. 3)",
                contrast=f"{k.dense_run} vs {v.dense_run}", test="paired_t", min_effect=1.0,
                min_effect_why="ViT's Fig. 3: ResNets lead ViTs by several points when pre-trained on the smallest sets; "
                               "1 point is a conservative floor",
                family=FAMILY, paired=True, measure=SeedPaired(k.dense_run, v.dense_run),
                paper=PaperNumber("vit", None, "Fig. 3 (pre-training on subsets of ImageNet-21k and JFT): on the smallest "
                                               "sets ResNets lead ViTs by several points; a figure, no table gives the gap"),
            ))
        return out

    def model_table(self, results: ChapterResults) -> pd.DataFrame:
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
                format_mean_sd(m * 100, s * 100)
                for m, s in zip(table[f"{split}_accuracy_mean"], table[f"{split}_accuracy_std"])
            ]
        return out

    def calibration_frame(self, results: ChapterResults) -> pd.DataFrame:
        """One row per candidate: seeds, accuracies, seed sds, gain, positive control, CPU cost and resolution.

        * ``sd`` columns: sample sd over seeds (points); ``sd of gain``: of the per-seed MoE - dense difference;
        * ``bypass loss``: MoE accuracy minus its accuracy with every MoE layer bypassed (mean over seeds);
        * ``min / run``: wall minutes of one run (mean of the MoE and dense runs) as the sweep ran them;
        * ``resolution / sqrt(CPU h)``: ``gain / sd(MoE) / sqrt(hours per MoE run)``.
        """
        groups = results.by_name()
        rows = {}
        for c in self.candidates(self.preset_of(results)):
            moe, dense = groups.get(c.moe_run, []), groups.get(c.dense_run, [])
            if not moe or not dense:
                continue
            a, b = results.paired(c.moe_run, c.dense_run)
            acc_m = np.array([r.final["test_accuracy"] for r in moe]) * 100
            acc_d = np.array([r.final["test_accuracy"] for r in dense]) * 100
            bypass = np.array([r.record["moe_bypass"]["accuracy"] for r in moe]) * 100
            gain = (np.array(a) - np.array(b)) * 100
            sd_m = float(acc_m.std(ddof=1)) if acc_m.size > 1 else float("nan")
            minutes = float(np.mean([_train_minutes(r) for r in moe]))
            rows[c.name] = {
                "family": c.family, "MoE blocks": str(c.placement), "epochs": c.epochs, "seeds": len(moe),
                "dense acc. (%)": acc_d.mean(), "sd dense": float(acc_d.std(ddof=1)) if acc_d.size > 1 else float("nan"),
                "MoE acc. (%)": acc_m.mean(), "sd MoE": sd_m,
                "gain (points)": float(gain.mean()), "sd of gain": float(gain.std(ddof=1)) if gain.size > 1 else float("nan"),
                "bypass loss (points)": float((acc_m - bypass).mean()),
                "min / run (MoE)": minutes, "min / run (dense)": float(np.mean([_train_minutes(r) for r in dense])),
                "resolution / sqrt(CPU h)": float(gain.mean() / sd_m / math.sqrt(minutes / 60)) if sd_m > 0 else float("nan"),
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def calibration_table(self, results: ChapterResults) -> pd.DataFrame:
        """:meth:`calibration_frame` rounded for reading, with each candidate's control verdict, one column per candidate."""
        df = self.calibration_frame(results)
        if df.empty:
            return df
        verdict = {v.claim_id: v.verdict for v in self.verdicts(results, write=False)}
        df["control"] = [verdict.get(f"experts_carry_weight_{n}", "—") for n in df.index]
        df = df.round({c: 2 for c in df.columns if df[c].dtype.kind == "f"})
        return df.T  # candidates as columns: the table fits the page

    def choose_test_bed(self, results: ChapterResults) -> dict[str, str | None]:
        """The rule fixed before the runs were read: per family (ViT, ConvNeXt), among the candidates
        whose positive control passed, the highest ``resolution / sqrt(CPU h)``; when no
        candidate passes its control, the one that loses most when bypassed (and the chapter says so)."""
        df = self.calibration_frame(results)
        verdict = {v.claim_id: v.verdict for v in self.verdicts(results, write=False)}
        out: dict[str, str | None] = {}
        for family in ("vit", "convnext"):
            sub = df[df["family"] == family]
            if sub.empty:
                out[family] = None
                continue
            passed = [n for n in sub.index if verdict.get(f"experts_carry_weight_{n}") == "passed"]
            if passed:
                out[family] = str(sub.loc[passed, "resolution / sqrt(CPU h)"].idxmax())
            else:
                out[family] = str(sub["bypass loss (points)"].idxmax())
        return out

    def power_designs(self, results: ChapterResults, tests=None) -> dict[str, tuple[float, bool]]:
        """The power table's designs: each arm's seed sd (unpaired) and each candidate's sd of the paired gain."""
        df = self.calibration_frame(results)
        sds: dict[str, tuple[float, bool]] = {}
        for c in self.candidates(self.preset_of(results)):
            if c.name not in df.index:
                continue
            row = df.loc[c.name]
            for label, col, paired in ((f"{c.dense_run} (unpaired)", "sd dense", False),
                                       (f"{c.moe_run} (unpaired)", "sd MoE", False),
                                       (f"{c.moe_run} - {c.dense_run} (paired)", "sd of gain", True)):
                if np.isfinite(row[col]) and label not in sds:
                    sds[label] = (float(row[col]), paired)
        return sds

    def plot_calibration(self, results: ChapterResults):
        """Per candidate (one row each): the MoE gain over its dense model (top) and the accuracy lost when the MoE
        layers are bypassed (bottom), in points; dots are seeds, bars their mean (seaborn)."""
        style()
        df = self.calibration_frame(results)
        groups = results.by_name()
        cands = [c for c in self.candidates(self.preset_of(results)) if c.name in df.index]
        rows = []
        for c in cands:
            a, b = results.paired(c.moe_run, c.dense_run)
            rows += [{"candidate": c.name, "panel": "gain", "points": (x - y) * 100} for x, y in zip(a, b)]
            rows += [{"candidate": c.name, "panel": "bypass", "points": (r.final["test_accuracy"] -
                                                                        r.record["moe_bypass"]["accuracy"]) * 100}
                     for r in groups[c.moe_run]]
        data = pd.DataFrame(rows)
        order = [c.name for c in cands]
        palette = {name: _color(i) for i, name in enumerate(order)}
        height = 1.4 + 0.45 * max(1, len(cands))
        fig, axes = plt.subplots(2, 1, figsize=(7.2, 2 * height), sharey=True)
        panels = (("gain", GAIN_MIN_EFFECT, "MoE minus dense (points, paired by seed)",
                   "MoE gain at equal activated FLOPs (dashed: smallest gain of interest)"),
                  ("bypass", CONTROL_MIN_EFFECT, "accuracy lost with every MoE layer bypassed (points)",
                   "Positive control: the weight the experts carry (dashed: the bar)"))
        for ax, (panel, bar, xlabel, title) in zip(axes, panels):
            sub = data[data["panel"] == panel]
            if sub.empty:
                continue
            sns.barplot(data=sub, y="candidate", x="points", hue="candidate", order=order, hue_order=order,
                        palette=palette, alpha=0.35, errorbar=None, legend=False, ax=ax)
            sns.stripplot(data=sub, y="candidate", x="points", hue="candidate", order=order, hue_order=order,
                          palette=palette, size=5, jitter=0.15, legend=False, ax=ax)
            for i, name in enumerate(order):
                values = sub.loc[sub["candidate"] == name, "points"]
                if len(values):
                    ax.annotate(f"{values.mean():+.2f}", (max(values.max(), values.mean(), 0), i), xytext=(6, 0),
                                textcoords="offset points", va="center")
            ax.axvline(bar, color="0.35", ls="--", lw=1)
            ax.axvline(0, color="0.2", lw=0.8)
            ax.margins(x=0.15)
            ax.set_ylabel("")
            ax.set_xlabel(xlabel)
            ax.set_title(title)
        fig.tight_layout()
        return fig

    def findings(self, results: ChapterResults) -> str:
        """What the stored runs show, as Markdown bullets computed from them (no typed numbers)."""
        df = self.calibration_frame(results)
        if df.empty:
            return "* No candidate has both its dense and its MoE runs stored."
        chosen = self.choose_test_bed(results)
        verdict = {v.claim_id: v for v in self.verdicts(results, write=False)}
        lines = []
        for name, row in df.iterrows():
            control = verdict.get(f"experts_carry_weight_{name}")
            gain = verdict.get(f"moe_vs_dense_{name}")
            lines.append(
                f"**{name}** ({row['seeds']} seeds, {row['min / run (MoE)']:.1f} min per MoE run): MoE {row['MoE acc. (%)']:.2f}% "
                f"(sd {row['sd MoE']:.2f}) vs dense {row['dense acc. (%)']:.2f}% (sd {row['sd dense']:.2f}); gain "
                f"{row['gain (points)']:+.2f} points ({gain.verdict if gain else '—'}); bypassing the MoE layers costs "
                f"{row['bypass loss (points)']:.2f} points (control {control.verdict if control else '—'})."
            )
        for family, name in chosen.items():
            if name is None:
                continue
            row = df.loc[name]
            passed = verdict.get(f"experts_carry_weight_{name}")
            alone = int((df["family"] == family).sum()) == 1
            if alone:
                how = ("the only candidate of its family calibrated here (control "
                       f"{passed.verdict if passed else 'not measured'}; MoE gain {row['gain (points)']:+.2f} points)")
            elif passed and passed.verdict == "passed":
                how = "the highest resolution per CPU hour among the candidates whose control passed"
            else:
                how = "no candidate passed its control, so the one whose experts carry the most weight"
            n_unpaired = seeds_for_mde_or_none(float(row["sd MoE"]), paired=False)
            n_paired = seeds_for_mde_or_none(float(row["sd of gain"]), paired=True)
            lines.append(
                f"**Test bed ({family}): {name}** — {how}. At its seed sd, an MoE-vs-MoE contrast needs "
                f"{n_unpaired} seeds per arm unpaired and {n_paired} paired (sd of paired differences as measured for "
                f"MoE - dense) for a minimal detectable effect of {GAIN_MIN_EFFECT:g} point."
            )
        return "\n".join(f"* {line}" for line in lines)


def _train_minutes(result) -> float:
    return float(result.record["wall_time_s"]) / 60


def seeds_for_mde_or_none(sd: float, *, paired: bool, target: float = GAIN_MIN_EFFECT) -> str:
    """Seeds per arm for an MDE of ``target`` points at this sd, as text ("more than 200" when out of reach)."""
    if not np.isfinite(sd):
        return "an unknown number of (sd not measured)"
    n = seeds_for_mde(sd, target, paired=paired)
    return str(n) if n is not None else "more than 200"


chapter = DenseBaselines()
