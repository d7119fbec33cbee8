"""Chapter 6 — routing whole images (Mobile V-MoE): per-image routing and super-class guidance.

Mobile V-MoE (Daxberger et al., arXiv:2309.04354): sparse MoE scales ViTs *down* when whole images, not tokens, are
routed: a router reads the image's class token after the first dense blocks and sends the image to k experts in
each of the last L MoE blocks (attention stays shared), so an image activates the parameters of k experts per layer.
The router is guided by super-classes, groups of classes a dense model confuses, with an extra loss
0.3 * CE(router logits, super-class) in place of the balancing losses. The paper reports ViT-Tiny +3.39 points and a
54M-FLOP ViT +4.66 over dense on ImageNet-1k (the smallest gains most), and, in its routing ablation (numbers from
secondary notes on the paper, not its tables), gains over dense of +1.87 (end-to-end per-image router), +2.72
(super-class guided) and +3.15 (per-token routing, which activates more parameters per image).

**Design.** Chapter 5's family (the test bed's ViT, depth 4, patch 7, heads of 16 channels) at widths 16 and 64. Its
last L = 2 blocks are MoE with E experts (one per super-class), k = 1, so an image activates the FLOPs of the dense
model of its width (borrowed from chapter 5, 10 seeds each). The router reads the class token entering block 2 and
its decision is reused by block 3. Super-classes: the classes the dense model at width 64 (seed 0; a prerequisite
run of this chapter, trained first) confuses on the 5,000 validation images, clustered by average linkage into E
groups (:func:`vmoe_lib.analysis.superclasses_from_confusion`). E = 4 for Fashion-MNIST's 10 classes: its labels
name about four kinds of item (tops, footwear, trousers, bags), and the paper's rule is one expert per super-class
(fixed before the clusters were seen). At width 64 the same model is also trained with an end-to-end per-image router
(no super-classes; V-MoE's noise and importance + load losses, as the per-token router) and with per-token routing
(the test bed's softmax token choice, k = 1, E experts, groups of 8 images, capacity factor 1).

Claims (declared in :meth:`ImageRouting.claims` before any result is read): (a) at each width the super-class-guided
per-image MoE beats the dense model of equal activated FLOPs; (a') the smaller width gains more; (b) super-class
guidance beats end-to-end per-image routing; (c) per-token routing beats per-image routing in accuracy (reported with
the distinct parameters each activates per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis import mean_sd_text, routing_of, superclasses_from_confusion
from ..errors import ConfigError
from ..papers import PaperNumber
from ..results import RunResult
from ..plots import _color, plain_log_axis, style
from ..stats import Claim, TestResult, paired_t
from ..train import TrainConfig
from .base import Chapter, ChapterResults, Measure, Preset, Run, SeedPaired, SeedPairedInteraction, control_claim
from .model_scale import WidthFamily, dense_name
from .probes import ConfusionProbe, RoutingStatsProbe

__all__ = ["NAME", "PRESETS", "ImageRouting", "SuperclassAgreement", "moe_config", "activated_per_image",
           "superclass_agreement", "chapter"]

NAME = "image_routing"
SOURCE = "dense_source"  # the prerequisite: the dense model whose validation confusion gives the super-classes

CONTROL_MIN_EFFECT = 1.0
AGREEMENT_MIN_EFFECT = 25.0  # points of test images routed to their super-class's expert above chance (1/E)
GAIN_MIN_EFFECT = 0.5
SIZE_MIN_EFFECT = 0.5
ROUTING_MIN_EFFECT = 0.3
FAMILY_A, FAMILY_A2 = f"{NAME}:a_beats_dense", f"{NAME}:a2_smaller_gains_more"
FAMILY_B, FAMILY_C = f"{NAME}:b_guidance", f"{NAME}:c_per_token"
CONTROL_FAMILY = f"{NAME}:controls"
_MOBILE = "Mobile V-MoE (Daxberger et al., arXiv:2309.04354)"
_NOTES = "from secondary notes on the paper (its tables were not available to us)"

#: The routings the chapter trains: run-name prefix -> what it is.
KINDS = {"image_sc": "per-image, super-class guided", "image_e2e": "per-image, end-to-end",
         "image_coarse": "per-image, guided by coarse labels", "token": "per-token"}


def run_name(kind: str, width: int) -> str:
    return f"{kind}_w{width}"


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: the dense source run, per-image (super-class guided) MoE at widths 16 and 64, "
                    "end-to-end per-image and per-token at width 64, on 2,048 Fashion-MNIST images, 1 epoch, 2 seeds "
                    "(CI)",
        hardware="CPU, 2 cores", expected_minutes=1.0, seeds=(0, 1),
        settings={"widths": (16, 64), "base_width": 64, "experts": 4, "superclass_sources": ("confusion",),
                  "probe_images": 1000},
    ),
    "cpu": Preset(
        name="cpu",
        description="chapter 5's ViTs (depth 4, patch 7) at widths 16 and 64 with their last 2 blocks MoE (4 experts, "
                    "one per super-class, k = 1): per-image routing guided by super-classes from the width-64 dense "
                    "model's validation confusion, against the dense model of each width; end-to-end per-image and "
                    "per-token routing at width 64; Fashion-MNIST 28x28, 55k train images, 3 epochs, 16 seeds",
        hardware="CPU, 2 cores, 2 workers x 1 thread, pinned numerics (estimated 73 min before the sweep)",
        expected_minutes=73.0, seeds=tuple(range(16)),
        # Sized from benchmarks/bench_image_routing.py (train step relative to the dense width-64 model: guided and
        # end-to-end per-image 1.08x, per-token 1.12x, per-image at width 16 0.29x) and chapter 5's measured run times
        # (dense width 64: 2.2 min a run): a seed of the 4 MoE runs costs about 7.8 worker-minutes, the dense models'
        # seeds 10-15 (chapter 5 has 0-9) 2.7 more each; 16 seeds and the source run take about 73 min on 2 workers.
        # 16 seeds bring the MDE of (b) and (c) to their 0.3-point bar and (a) to about 0.5 (planned_power); 10 would
        # leave every claim's MDE above its bar.
        settings={"widths": (16, 64), "base_width": 64, "experts": 4, "superclass_sources": ("confusion",),
                  "probe_images": None},
    ),
    "gpu": Preset(
        name="gpu",
        description="chapter 5's gpu family (ViT/4 on CIFAR-100, depth 8) at widths 128 and 192 with the last 2 blocks "
                    "MoE, 20 experts (one per super-class), k = 1: per-image routing guided by super-classes clustered "
                    "from the width-192 dense model's validation confusion and, beside it, by CIFAR-100's 20 coarse "
                    "labels; end-to-end per-image and per-token at width 192; 60 epochs, 3 seeds (needs CIFAR-100: see "
                    "the data section)",
        hardware="1 GPU (estimated, not yet measured), bf16 autocast", expected_minutes=240.0, seeds=(0, 1, 2),
        settings={"widths": (128, 192), "base_width": 192, "experts": 20,
                  "superclass_sources": ("confusion", "coarse"), "probe_images": None},
    ),
}


def moe_config(dense: TrainConfig, kind: str, experts: int, superclasses: list[int] | None = None) -> TrainConfig:
    """The MoE version of ``dense`` (a config of the test bed's ViT family) that this chapter trains: its last 2
    blocks MoE with ``experts`` experts and k = 1, routed ``kind``-wise:

    * ``image_sc`` / ``image_coarse``: per image, from the class token entering the first MoE block, the decision
      reused by the second; guided by ``superclasses`` (each class's super-class) with Mobile V-MoE's loss weight 0.3
      and no balancing loss;
    * ``image_e2e``: per image, end to end (no super-classes), with V-MoE's noise and importance + load losses;
    * ``token``: per token, the test bed's softmax token choice (groups of 8 images, capacity factor 1).
    """
    from ..models.dense import DENSE_VIT_SIZES

    depth = int(dense.model_kwargs.get("depth", DENSE_VIT_SIZES[dense.model]["depth"]))
    base = {**dense.model_kwargs, "moe_layers": [depth - 2, depth - 1], "num_experts": int(experts), "k": 1}
    if kind in ("image_sc", "image_coarse"):
        if superclasses is None:
            raise ConfigError(f"kind={kind!r} needs superclasses (each class's super-class)")
        options = {"route_from": "class_token", "superclasses": list(superclasses), "superclass_loss_weight": 0.3}
        kwargs = {**base, "router": "per_image", "router_options": options}
    elif kind == "image_e2e":
        options = {"route_from": "class_token", "noise_std": 1.0, "importance_loss_weight": 0.005,
                   "load_loss_weight": 0.005}
        kwargs = {**base, "router": "per_image", "router_options": options}
    elif kind == "token":
        kwargs = {**base, "router": "softmax_token_choice", "group_size": 8, "capacity_factor": 1.0,
                  "eval_capacity_factor": 1.0, "router_options": {"capacity_multiple": 1}}
    else:
        raise ConfigError(f"kind={kind!r} is not recognised; allowed values: {', '.join(map(repr, KINDS))}")
    return dense.replace(model=f"vmoe_{dense.model}", model_kwargs=kwargs)


def activated_per_image(result: RunResult) -> float | None:
    """Distinct parameters one image activates, from the run's stored costs and probe: the parameters a token
    activates, plus, in each MoE layer, one expert's parameters for every further expert the image's tokens reach
    (the probe's ``mean_experts_per_image``; 1 for per-image routing with k = 1). A dense run: its parameters."""
    costs = result.record.get("costs") or {}
    if "params_activated" not in costs:
        return None
    routing = routing_of(result)
    if not routing:
        return float(costs["params_activated"])
    layers = list(routing.values())
    if any("mean_experts_per_image" not in layer for layer in layers):
        return None
    experts = len(layers[0]["expert_load"])
    per_expert = (costs["params_total"] - costs["params_activated"]) / (len(layers) * (experts - 1))
    return float(costs["params_activated"] + sum((layer["mean_experts_per_image"] - 1) * per_expert
                                                 for layer in layers))


@dataclass(frozen=True)
class SuperclassAgreement(Measure):
    """Positive control of super-class guidance: per seed, the share of run ``run``'s test tokens (so of its test
    images: it routes whole images) that its leading MoE layer sends to their super-class's expert, against chance
    (1 / E); tested by ``paired_t`` of the per-seed shares against chance (the effect in points)."""

    run: str

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        shares = {}
        for r in results.runs_of(self.run):
            share = superclass_agreement(r)
            if share is None:
                return None
            shares[r.seed] = share
        if len(shares) < 2:
            return None
        experts = results.runs_of(self.run)[0].config.model_kwargs["num_experts"]
        values = [shares[s] for s in sorted(shares)]
        return paired_t(values, [1.0 / experts] * len(values), direction=claim.direction)


def superclass_agreement(result: RunResult) -> float | None:
    """The share (0-1) of the run's test images that its leading MoE layer routes to their super-class's expert (the
    class x expert table of its probe, classes weighted equally as in the class-balanced test sets); ``None`` for a
    run without super-classes or probe."""
    superclasses = (result.config.model_kwargs.get("router_options") or {}).get("superclasses")
    routing = routing_of(result)
    if superclasses is None or not routing:
        return None
    table = next(iter(routing.values())).get("class_expert")
    if table is None:
        return None
    return float(np.mean([table[c][s] for c, s in enumerate(superclasses)]))


class ImageRouting(WidthFamily, Chapter):
    """Chapter 6: routing whole images (Mobile V-MoE). Its base width is where the routings are compared, and whose
    dense model gives the super-classes."""

    name = NAME
    title = "Routing whole images: per-image routing and super-class guidance"
    presets = PRESETS
    primary = ("per_image_beats_dense_w16", "per_image_beats_dense_w64", "guidance_beats_end_to_end",
               "per_token_beats_per_image")
    power_target = 0.5
    benchmark = "image_routing"

    def dense_configs(self, preset: Preset) -> dict[int, TrainConfig]:
        """Width -> chapter 5's dense config of that width (the same experiment: borrowed)."""
        from . import get_chapter

        plan = get_chapter("model_scale").experiment(preset.name)
        return {w: plan[dense_name(w)] for w in self.widths(preset)}

    def prerequisites(self, preset: Preset) -> list[Run]:
        """The dense model at the base width, seed 0, with its confusion on the validation images stored: the
        super-classes are clustered from it before the MoE runs are planned."""
        dense = self.dense_configs(preset)[self.base_width(preset)]
        return [Run(SOURCE, dense, seeds=(0,), probe=ConfusionProbe("val"))]

    def superclasses(self, preset: str | Preset, source: str = "confusion") -> list[int]:
        """Each class's super-class for ``preset``: ``"confusion"``, the source run's validation confusion clustered
        into E groups; ``"coarse"``, the dataset's coarse labels (CIFAR-100's 20). Reads the stored source run (a
        missing one raises :class:`~vmoe_lib.results.MissingResultError` naming the command that trains it)."""
        p = preset if isinstance(preset, Preset) else self.preset(preset)
        record = self.prerequisite_results(p.name).runs_of(SOURCE)[0].record["extra"]
        experts = int(p.settings["experts"])
        if source == "confusion":
            return superclasses_from_confusion(record["confusion"]["matrix"], experts)
        if source == "coarse":
            coarse = record.get("coarse_of_class")
            if coarse is None:
                raise ConfigError(f"superclass source 'coarse' needs a dataset with coarse labels (CIFAR-100); "
                                  f"preset {p.name!r} trains on {record['confusion']['class_names'][:3]}...")
            if len(set(coarse)) != experts:
                raise ConfigError(f"the dataset has {len(set(coarse))} coarse labels; preset {p.name!r} has "
                                  f"experts={experts}")
            return [int(c) for c in coarse]
        raise ConfigError(f"superclass source={source!r} is not recognised; allowed values: 'confusion', 'coarse'")

    def runs(self, preset: Preset) -> list[Run]:
        """The source run, then per width (descending: costlier first) the dense model (chapter 5's) and the
        super-class-guided per-image MoE; then, at the base width, the end-to-end per-image and the per-token MoE (and,
        where the preset asks for it, per-image guided by coarse labels)."""
        probe = RoutingStatsProbe(probe_images=preset.settings["probe_images"], experts_per_image=True)
        experts, base = int(preset.settings["experts"]), self.base_width(preset)
        dense = self.dense_configs(preset)
        sources = tuple(preset.settings["superclass_sources"])
        guided = self.superclasses(preset, "confusion")
        out = list(self.prerequisites(preset))
        for w in sorted(self.widths(preset), reverse=True):
            out.append(Run(dense_name(w), dense[w], borrow_from="model_scale"))
            out.append(Run(run_name("image_sc", w), moe_config(dense[w], "image_sc", experts, guided), probe=probe))
        out.append(Run(run_name("image_e2e", base), moe_config(dense[base], "image_e2e", experts), probe=probe))
        out.append(Run(run_name("token", base), moe_config(dense[base], "token", experts), probe=probe))
        if "coarse" in sources:
            coarse = self.superclasses(preset, "coarse")
            out.append(Run(run_name("image_coarse", base), moe_config(dense[base], "image_coarse", experts, coarse),
                           probe=probe))
        return out

    def display_order(self, names):
        """The source run last (it is a design input, not an arm of a claim)."""
        return [n for n in names if n != SOURCE] + [n for n in names if n == SOURCE]

    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims, declared before any result is read.

        (a) At each width the super-class-guided per-image MoE beats the dense model of equal activated FLOPs by at
        least :data:`GAIN_MIN_EFFECT` points (Holm over the widths; control: its experts carry weight). (a') The
        smaller width gains more, by :data:`SIZE_MIN_EFFECT` (an interaction of seed-paired gains). (b) Super-class
        guidance beats end-to-end per-image routing by :data:`ROUTING_MIN_EFFECT` (control: the guided router sends
        test images to their super-class's expert far above chance). (c) Per-token routing beats per-image routing by
        :data:`ROUTING_MIN_EFFECT` (control: the per-token model's experts carry weight).
        """
        widths, base = self.widths(preset), self.base_width(preset)
        small, sc_base = min(widths), run_name("image_sc", base)
        why = "MoE gains at this scale are 0.5-1.5 points (chapter 5); experts that carry less than 1 point cannot show them"
        out = [control_claim(run_name("image_sc", w), family=CONTROL_FAMILY, min_effect=CONTROL_MIN_EFFECT,
                             min_effect_why=why) for w in widths]
        out += [control_claim(run_name(kind, base), family=CONTROL_FAMILY, min_effect=CONTROL_MIN_EFFECT,
                              min_effect_why=why) for kind in ("image_e2e", "token")]
        out.append(Claim(
            id="router_follows_superclasses",
            claim=f"The guided router of {sc_base} sends test images to their super-class's expert at least "
                  f"{AGREEMENT_MIN_EFFECT:g} points above chance",
            source="positive control: the super-class loss shapes the routing",
            contrast=f"{sc_base}: share of test images routed to their super-class's expert vs chance (1/E)",
            test="paired_t", min_effect=AGREEMENT_MIN_EFFECT,
            min_effect_why="a router that follows its targets for only a quarter of the images above chance is not "
                           "guided in any useful sense",
            family=CONTROL_FAMILY, paired=True, kind="control", measure=SuperclassAgreement(sc_base),
            metric="test images routed to their super-class's expert, points above chance",
        ))
        for w in widths:
            out.append(Claim(
                id=f"per_image_beats_dense_w{w}",
                claim=f"At width {w}, per-image routing (super-class guided) beats the dense model of equal activated "
                      f"FLOPs (by at least {GAIN_MIN_EFFECT:g} point)",
                source=f"{_MOBILE}, Sec. 4: sparse MoE scales ViTs down; ViT-Tiny +3.39, a 54M-FLOP ViT +4.66",
                contrast=f"{run_name('image_sc', w)} vs {dense_name(w)}", test="paired_t", min_effect=GAIN_MIN_EFFECT,
                min_effect_why="the low end of the gains MoE shows over dense at this scale (chapter 5: +0.65 to "
                               "+1.43); the paper's +3.4 is on ImageNet-1k's 1000 classes",
                family=FAMILY_A, paired=True, control=f"experts_carry_weight_{run_name('image_sc', w)}",
                measure=SeedPaired(run_name("image_sc", w), dense_name(w)),
                paper=PaperNumber("mobile_vmoe", 3.39, "ViT-Tiny, ImageNet-1k: per-image MoE minus dense (a 54M-FLOP "
                                                       "ViT: +4.66)"),
            ))
        big = max(widths)
        out.append(Claim(
            id="smaller_gains_more",
            claim=f"Per-image routing gains more over dense at width {small} than at width {big} (by at least "
                  f"{SIZE_MIN_EFFECT:g} point)",
            source=f"{_MOBILE}, Sec. 4: the gains are largest for the smallest models",
            contrast=f"({run_name('image_sc', small)} - {dense_name(small)}) - ({run_name('image_sc', big)} - "
                     f"{dense_name(big)})",
            test="interaction", min_effect=SIZE_MIN_EFFECT,
            min_effect_why="the paper's two sizes differ by 1.3 points (+4.66 vs +3.39); 0.5, the bar of claim "
                           "(a)'s gains",
            family=FAMILY_A2, paired=True, control=f"experts_carry_weight_{run_name('image_sc', small)}",
            measure=SeedPairedInteraction(run_name("image_sc", small), dense_name(small), run_name("image_sc", big),
                                          dense_name(big)),
            paper=PaperNumber("mobile_vmoe", 1.27, "Sec. 4, ImageNet-1k: a 54M-FLOP ViT +4.66 vs ViT-Tiny +3.39"),
        ))
        out.append(Claim(
            id="guidance_beats_end_to_end",
            claim=f"At width {base}, super-class guidance beats an end-to-end per-image router (same E, k and layers; "
                  f"by at least {ROUTING_MIN_EFFECT:g} point)",
            source=f"{_MOBILE}, routing ablation: gain over dense +2.72 (super-class) vs +1.87 (end-to-end), {_NOTES}",
            contrast=f"{sc_base} vs {run_name('image_e2e', base)}", test="paired_t", min_effect=ROUTING_MIN_EFFECT,
            min_effect_why="a third of the paper's 0.85, about the spread of one seed's accuracy at this scale",
            family=FAMILY_B, paired=True, control="router_follows_superclasses",
            measure=SeedPaired(sc_base, run_name("image_e2e", base)),
            paper=PaperNumber("mobile_vmoe", 0.85, f"routing ablation: +2.72 vs +1.87 over dense ({_NOTES})"),
        ))
        out.append(Claim(
            id="per_token_beats_per_image",
            claim=f"At width {base}, per-token routing beats per-image routing (super-class guided) in accuracy, while "
                  f"activating more distinct parameters per image (by at least {ROUTING_MIN_EFFECT:g} point)",
            source=f"{_MOBILE}, routing ablation: per-token +3.15 vs per-image +2.72 over dense, {_NOTES}",
            contrast=f"{run_name('token', base)} vs {sc_base}", test="paired_t", min_effect=ROUTING_MIN_EFFECT,
            min_effect_why="the paper's 0.43, rounded down to the spread of one seed's accuracy at this scale",
            family=FAMILY_C, paired=True, control=f"experts_carry_weight_{run_name('token', base)}",
            measure=SeedPaired(run_name("token", base), sc_base),
            paper=PaperNumber("mobile_vmoe", 0.43, f"routing ablation: +3.15 vs +2.72 over dense ({_NOTES})"),
        ))
        return out

    # -- power, before the sweep --------------------------------------------------------------------------------
    def planned_power(self, preset: str = "cpu") -> pd.DataFrame:
        """The power this preset's seeds buy, from the closest records there are before its sweep: chapter 5's
        ``cpu`` runs of the same family. (a) the sd of the per-seed gain of its MoE model over the dense model at each
        of this chapter's widths; (a') the sd of the per-seed difference of those two gains (the same interaction,
        measured there); (b) and (c), differences between two MoE models at the base width, the sd of chapter 5's
        per-seed difference k = 2 minus k = 1 (two routings of one model). MDE one-sided alpha 0.05, 80 % power, at this
        preset's seeds (paired)."""
        from ..stats import mde
        from . import get_chapter

        ms = get_chapter("model_scale").results_of_record("cpu")
        widths, base = self.widths(preset), self.base_width(preset)
        gains = {w: {s: v - ms.by_seed(dense_name(w))[s] for s, v in ms.by_seed(f"moe_w{w}").items()
                     if s in ms.by_seed(dense_name(w))} for w in widths}
        small, big = min(widths), max(widths)
        both = sorted(set(gains[small]) & set(gains[big]))
        k2, k1 = ms.by_seed("moe_k2"), ms.by_seed(f"moe_w{base}")
        designs = {f"(a) per-image MoE - dense, width {w}": (np.std(list(gains[w].values()), ddof=1), GAIN_MIN_EFFECT)
                   for w in widths}
        designs[f"(a') gain at width {small} - gain at width {big}"] = (
            np.std([gains[small][s] - gains[big][s] for s in both], ddof=1), SIZE_MIN_EFFECT)
        step = np.std([k2[s] - k1[s] for s in sorted(set(k2) & set(k1))], ddof=1)
        designs["(b) guided - end-to-end per-image"] = (step, ROUTING_MIN_EFFECT)
        designs["(c) per-token - per-image"] = (step, ROUTING_MIN_EFFECT)
        n = len(self.preset(preset).seeds)
        out = {label: {"sd of paired differences": f"{100 * sd:.2f}", f"MDE, n={n}": f"{mde(100 * sd, n, paired=True):.2f}",
                       "smallest effect of interest": m} for label, (sd, m) in designs.items()}
        return pd.DataFrame.from_dict(out, orient="index")


    # -- the super-classes -------------------------------------------------------------------------------------------
    def _source(self, results: ChapterResults) -> dict | None:
        runs = results.runs_of(SOURCE)
        return runs[0].record.get("extra") if runs else None

    def _superclasses_of(self, results: ChapterResults) -> list[int] | None:
        """The super-classes the guided runs of ``results`` were trained with (read from their configs)."""
        for r in results.runs_of(run_name("image_sc", self.base_width(self.preset_of(results)))):
            return list(r.config.model_kwargs["router_options"]["superclasses"])
        return None

    def superclass_table(self, results: ChapterResults) -> pd.DataFrame:
        """The super-classes found: per super-class (= expert of the guided runs), its classes, and how often the
        source model confused them with each other and with other classes (validation images, % of the classes'
        images)."""
        source, groups = self._source(results), self._superclasses_of(results)
        if source is None or groups is None:
            return pd.DataFrame()
        conf = np.asarray(source["confusion"]["matrix"], dtype=float)
        names = source["confusion"]["class_names"]
        rows = {}
        for g in sorted(set(groups)):
            members = [c for c, x in enumerate(groups) if x == g]
            others = [c for c in range(len(groups)) if c not in members]
            total = conf[members].sum()
            within = conf[np.ix_(members, members)].sum() - conf[members, members].sum()
            rows[g] = {"classes": ", ".join(names[c] for c in members), "images": int(total),
                       "mistaken within (%)": round(100 * within / total, 1),
                       "mistaken for another super-class (%)": round(100 * conf[np.ix_(members, others)].sum() / total, 1)}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "super-class"
        return frame

    def plot_confusion(self, results: ChapterResults):
        """The source model's confusion on the validation images (row-normalised, % of each true class; the diagonal
        left blank so the mistakes show), classes reordered by super-class, the super-classes outlined."""
        style()
        source, groups = self._source(results), self._superclasses_of(results)
        fig, ax = plt.subplots(figsize=(7.2, 5.6))
        if source is None or groups is None:
            return fig
        conf = np.asarray(source["confusion"]["matrix"], dtype=float)
        rate = 100 * conf / conf.sum(axis=1, keepdims=True)
        order = sorted(range(len(groups)), key=lambda c: (groups[c], c))
        shown = rate[np.ix_(order, order)]
        mask = np.eye(len(order), dtype=bool)
        names = [source["confusion"]["class_names"][c] for c in order]
        sns.heatmap(shown, mask=mask, ax=ax, cmap="Reds", vmin=0, annot=True, fmt=".0f", annot_kws={"fontsize": 10},
                    xticklabels=names, yticklabels=names, cbar_kws={"label": "% of the true class's images"})
        start = 0
        for g in sorted(set(groups)):
            size = sum(1 for c in groups if c == g)
            ax.add_patch(plt.Rectangle((start, start), size, size, fill=False, ec=_color(0), lw=2.4))
            start += size
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"Dense model's mistakes on {source['confusion']['images']:,} validation images "
                     f"(boxes: the {len(set(groups))} super-classes)")
        fig.tight_layout()
        return fig

    # -- tables ----------------------------------------------------------------------------------------------------
    def _kind_width(self, name: str) -> tuple[str, int] | None:
        head, _, width = name.rpartition("_w")
        if not width.isdigit():
            return None
        return ("dense" if head == "dense" else head), int(width)

    def model_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per width and routing: parameters in total, activated per token and (distinct) per image, FLOPs per image
        (stored costs; per image: the probe's distinct experts per image), test accuracy (mean ± sd over seeds), the gain
        over the dense model of the width (points, paired by seed), the share of test images routed to their
        super-class's expert (guided runs), minutes per run and seeds."""
        rows = {}
        for name, runs in results.by_name().items():
            kw = self._kind_width(name)
            if kw is None:
                continue
            kind, width = kw
            costs = runs[0].record.get("costs", {})
            per_image = [v for v in (activated_per_image(r) for r in runs) if v is not None]
            a, b = results.paired(name, dense_name(width))
            agreement = [v for v in (superclass_agreement(r) for r in runs) if v is not None]
            rows[(width, KINDS.get(kind, kind))] = {
                "params (k)": f"{costs.get('params_total', 0) / 1e3:.0f}",
                "activated per token (k)": f"{costs.get('params_activated', 0) / 1e3:.0f}",
                "activated per image (k)": f"{np.mean(per_image) / 1e3:.0f}" if per_image else "",
                "MFLOPs / image": f"{costs.get('flops_per_image', 0) / 1e6:.2f}",
                "test acc. (%)": mean_sd_text([r.final["test_accuracy"] for r in runs]),
                "gain over dense (points)": mean_sd_text([x - y for x, y in zip(a, b)], signed=True)
                if kind != "dense" and a else "",
                "to its super-class's expert (%)": f"{100 * np.mean(agreement):.1f}" if agreement else "",
                "min / run": f"{np.mean([r.record.get('wall_time_s', np.nan) for r in runs]) / 60:.1f}",
                "seeds": len(runs)}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        if not frame.empty:
            frame.index = pd.MultiIndex.from_tuples(frame.index, names=["width", "routing"])
            frame = frame.sort_index(level=0, sort_remaining=False)
        return frame

    # -- figures ---------------------------------------------------------------------------------------------------
    def plot_accuracy_vs_activated(self, results: ChapterResults):
        """Test accuracy against the distinct parameters one image activates, one panel per width (each with its own
        accuracy scale): the dense model (grey circle), per-image routing guided by super-classes (blue diamond), end
        to end (red square), per token (green triangle); small points are seeds, large markers the means. Markers at
        the same activated parameters are drawn side by side (a small horizontal offset, on the log axis)."""
        style()
        rows = []
        for name, runs in results.by_name().items():
            kw = self._kind_width(name)
            if kw is None:
                continue
            for r in runs:
                value = activated_per_image(r)
                if value is not None:
                    rows.append({"run": name, "kind": kw[0], "width": kw[1], "activated": value,
                                 "accuracy": 100 * r.final["test_accuracy"]})
        frame = pd.DataFrame(rows)
        widths = sorted(frame["width"].unique()) if not frame.empty else []
        fig, axes = plt.subplots(1, max(len(widths), 1), figsize=(7.2, 4.3), squeeze=False)
        looks = {"dense": (_color(7), "o"), "image_sc": (_color(0), "D"), "image_e2e": (_color(1), "s"),
                 "image_coarse": (_color(4), "P"), "token": (_color(2), "^")}
        labels = {"dense": "dense", **KINDS}
        shown = set()
        for ax, width in zip(axes[0], widths):
            part = frame[frame["width"] == width]
            kinds = [k for k in looks if k in set(part["kind"])]
            for i, kind in enumerate(kinds):
                color, marker = looks[kind]
                rows_k = part[part["kind"] == kind]
                shift = 2 ** (0.1 * (i - (len(kinds) - 1) / 2))  # side by side where the x values coincide
                ax.scatter(rows_k["activated"] * shift, rows_k["accuracy"], color=color, alpha=0.35, s=14, lw=0)
                ax.scatter([rows_k["activated"].mean() * shift], [rows_k["accuracy"].mean()], color=color,
                           marker=marker, s=70, zorder=3, edgecolor="white", lw=0.8,
                           label=labels[kind] if kind not in shown else None)
                shown.add(kind)
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
            low, high = part["activated"].min(), part["activated"].max()
            ax.set_xlim(low / 2, high * 2)
            ax.set_title(f"width {width}")
            ax.set_xlabel("distinct parameters per image")
        axes[0][0].set_ylabel("test accuracy (%)")
        handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]]
        names = [n for ax in axes[0] for n in ax.get_legend_handles_labels()[1]]
        fig.legend(handles, names, loc="lower center", ncol=2, frameon=False)
        fig.suptitle("Accuracy against the parameters an image activates (points: seeds)")
        fig.tight_layout(rect=(0, 0.14, 1, 1))
        return fig

    def plot_class_expert(self, results: ChapterResults, seed: int | None = None):
        """Where each class's test images go in the first MoE layer, for the three routings at the base width (one
        seed: ``seed``, default the lowest; expert numbers mean nothing across seeds of an unguided router): % of the
        class's tokens per expert, classes ordered by super-class."""
        style()
        base = self.base_width(self.preset_of(results))
        names = [run_name(kind, base) for kind in ("image_sc", "image_e2e", "token")]
        names = [n for n in names if results.runs_of(n)]
        source, groups = self._source(results), self._superclasses_of(results)
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(7.2, 4.2), sharey=True, squeeze=False)
        if not names or source is None or groups is None:
            return fig
        order = sorted(range(len(groups)), key=lambda c: (groups[c], c))
        labels = [source["confusion"]["class_names"][c] for c in order]
        for ax, name in zip(axes[0], names):
            runs = results.runs_of(name)
            run = next((r for r in runs if r.seed == seed), runs[0]) if seed is not None else min(runs, key=lambda r: r.seed)
            layer = next(iter(routing_of(run).values()))
            table = 100 * np.asarray(layer["class_expert"])[order]
            sns.heatmap(table, ax=ax, cmap="Blues", vmin=0, vmax=100, cbar=False, annot=True, fmt=".0f",
                        annot_kws={"fontsize": 10}, yticklabels=labels,
                        xticklabels=[str(e) for e in range(table.shape[1])])
            ax.set_title(f"{KINDS[self._kind_width(name)[0]]}\n(seed {run.seed})", fontsize=10)
            ax.set_xlabel("expert")
        fig.suptitle(f"Where each class goes in the first MoE layer (width {base}, % of its tokens)")
        fig.tight_layout()
        return fig

    # -- findings ---------------------------------------------------------------------------------------------------
    def findings(self, results: ChapterResults) -> str:
        """What the stored runs show, as Markdown bullets computed from them (no typed numbers)."""
        lines = []
        preset = self.preset_of(results)
        base = self.base_width(preset)
        source, groups = self._source(results), self._superclasses_of(results)
        if source is not None and groups is not None:
            names = source["confusion"]["class_names"]
            parts = ["{" + ", ".join(names[c] for c, x in enumerate(groups) if x == g) + "}" for g in sorted(set(groups))]
            lines.append(f"**Super-classes** clustered from the dense model's validation confusion "
                         f"({100 * source['confusion']['accuracy']:.1f} % right): " + ", ".join(parts) + ".")
            twin = results.by_seed(dense_name(base)).get(0)
            mine = results.runs_of(SOURCE)[0].final["test_accuracy"]
            if twin is not None:
                same = "the same test accuracy" if twin == mine else "a different test accuracy"
                lines.append(f"**The source run** is the same experiment as the dense model's seed 0, trained again with "
                             f"the confusion probe: {same} ({100 * mine:.2f} % vs {100 * twin:.2f} %).")
        gains = []
        for w in self.widths(preset):
            a, b = results.paired(run_name("image_sc", w), dense_name(w))
            if a:
                gains.append(f"width {w} {100 * np.mean(np.subtract(a, b)):+.2f}")
        if gains:
            lines.append("**Per-image (super-class guided) minus dense** (points, mean over seeds): " + ", ".join(gains)
                         + ".")
        arms = [(KINDS[k], run_name(k, base)) for k in ("image_sc", "image_e2e", "token", "image_coarse")]
        accs = [f"{label} {100 * np.mean(results.values(n)):.2f} %" for label, n in arms if results.values(n)]
        if accs:
            lines.append(f"**Routings at width {base}**, test accuracy: " + ", ".join(accs) + ".")
        per_image = []
        for label, n in arms:
            values = [v for v in (activated_per_image(r) for r in results.runs_of(n)) if v is not None]
            if values:
                per_image.append(f"{label} {np.mean(values) / 1e3:.0f}k")
        if per_image:
            lines.append("**Distinct parameters an image activates** (mean over seeds): " + ", ".join(per_image) + ".")
        agreement = [v for v in (superclass_agreement(r) for r in results.runs_of(run_name("image_sc", base)))
                     if v is not None]
        if agreement:
            lines.append(f"**The guided router** sends {100 * np.mean(agreement):.1f} % of the test images to their "
                         f"super-class's expert (chance: {100 / len(set(groups or [0])):.0f} %).")
        return "\n".join(f"* {line}" for line in lines)


chapter = ImageRouting()
