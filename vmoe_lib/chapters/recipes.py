"""Training recipes shared by chapters, so that a dense baseline trained in one
chapter is the same experiment (same results key) when another chapter needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..data import DATASET_FACTS
from ..errors import ConfigError
from ..papers import PaperNumber
from ..train import TrainConfig

__all__ = ["SMOKE_DATA", "TEST_BED_MOE", "Candidate", "TEST_BED", "TEST_BED_CONVNEXT", "fashion_mnist_recipe", "cifar_recipe",
           "preset_recipe", "input_size", "SWEET_SPOT_GAIN", "training_images", "same_steps_on_fewer_images"]

# A smoke run touches every code path on a sliver of the data.
SMOKE_DATA: dict[str, Any] = {"train_subset": 2048, "eval_subset": 1000}


def input_size(model: str, native: int) -> int | None:
    """ConvNeXt's four 2x reductions need 32x32 inputs; ViTs keep the native size (``None``)."""
    return 32 if "convnext" in model and native < 32 else None


def fashion_mnist_recipe(model: str, *, epochs: int, **changes: Any) -> TrainConfig:
    """The book's CPU recipe on Fashion-MNIST (28x28, 55k train / 5k val / 10k test).

    AdamW (lr 2e-3, weight decay 0.05, none on norms/biases/embeddings), batch 128,
    half an epoch of linear warmup then cosine decay to 0, label smoothing 0.1,
    gradient clipping at 1.0, random crop (padding 2) and horizontal flip.
    """
    base = dict(
        model=model, dataset="fashion_mnist", image_size=input_size(model, 28), epochs=epochs,
        batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.1, grad_clip=1.0,
        augment=True, crop_padding=2, flip=True,
    )
    return TrainConfig(**{**base, **changes})


def cifar_recipe(model: str, *, dataset: str = "cifar10", epochs: int, **changes: Any) -> TrainConfig:
    """The GPU recipe on CIFAR-10/100 (32x32): as above with batch 256, lr 1e-3, padding 4, 5 warmup epochs."""
    base = dict(
        model=model, dataset=dataset, image_size=None, epochs=epochs, batch_size=256, lr=1e-3,
        weight_decay=0.05, warmup_epochs=5.0, label_smoothing=0.1, grad_clip=1.0, augment=True,
        crop_padding=4, flip=True, val_size=5000,
    )
    return TrainConfig(**{**base, **changes})


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
        """Run name of the dense model (shared by candidates of equal model and epochs)."""
        return f"{self.dense_key}_{self.epochs}ep"

    @property
    def dense_key(self) -> str:
        """The dense model's short name: ``vit_pico``, ``convnext_zepto``."""
        return self.dense.split("_patch")[0].replace("_32", "")

    @property
    def moe_run(self) -> str:
        """Run name of the MoE model."""
        return f"moe_{self.name}"


# The test beds of record, chosen in chapter 0 by its pre-registered rule (``dense_baselines.choose_test_bed``)
# from the calibration runs of its cpu preset; the chapter's notebook fails if the rule and these disagree.
TEST_BED = Candidate("vit_pico_all_3ep", "vit", "vit_pico_patch7_28", "all", 3)
TEST_BED_CONVNEXT = Candidate("convnext_zepto_s2every2_3ep", "convnext", "convnext_zepto_32", "s2:every-2", 3)


def preset_recipe(settings: Mapping[str, Any], chapter_keys: Iterable[str] = ()) -> Callable[..., TrainConfig]:
    """The recipe a preset's runs share: ``recipe(model, model_kwargs)`` -> :class:`TrainConfig`.

    ``settings["dataset"]`` (default ``fashion_mnist``) picks :func:`fashion_mnist_recipe` or :func:`cifar_recipe`,
    ``settings["epochs"]`` the training length; every other setting is a ``TrainConfig`` field (``train_subset``...)
    except the chapter's own ``chapter_keys`` (models, probe settings...), which are left out.
    """
    s = {k: v for k, v in settings.items() if k not in set(chapter_keys)}
    epochs = s.pop("epochs")
    dataset = s.pop("dataset", "fashion_mnist")

    def recipe(model: str, model_kwargs: Mapping[str, Any] | None = None) -> TrainConfig:
        kwargs = {} if model_kwargs is None else {"model_kwargs": dict(model_kwargs)}
        if dataset == "fashion_mnist":
            return fashion_mnist_recipe(model, epochs=epochs, **kwargs, **s)
        return cifar_recipe(model, dataset=dataset, epochs=epochs, **kwargs, **s)

    return recipe


# The sweet-spot study's MoE-minus-dense gains (ImageNet-1k from scratch, arXiv:2411.18322) closest to each
# (family, placement) of the test bed's models: the paper's number beside a chapter's "MoE beats dense" claim.
SWEET_SPOT_GAIN: dict[tuple[str, str], PaperNumber] = {
    ("vit", "last-2"): PaperNumber("sweet_spot", 0.7, "Tab. 1, ViT-S, ImageNet-1k: dense 79.8, MoE Last-2 80.5"),
    ("vit", "every-2"): PaperNumber("sweet_spot", 0.9, "Tab. 1, ViT-S, ImageNet-1k: dense 79.8, MoE Every-2 80.7"),
    ("vit", "all"): PaperNumber("sweet_spot", 0.9, "Tab. 1, ViT-S, ImageNet-1k: dense 79.8, MoE Every-2 80.7 (no "
                                                   "all-blocks MoE in the paper; Every-2 is the closest)"),
    ("convnext", "s2:every-2"): PaperNumber("sweet_spot", 0.0, "Tabs. 1 and 3, ConvNeXt-T, ImageNet-1k: dense 82.1, "
                                                               "MoE 82.1 (Last-2, one-stage placements), 81.8 (Every-2)"),
}


def training_images(config: TrainConfig) -> int:
    """The images one epoch of ``config`` trains on: ``train_subset``, or the dataset's training split less the
    validation images it holds out. Known for the datasets of :data:`vmoe_lib.data.DATASET_FACTS` only."""
    if config.train_subset is not None:
        return config.train_subset
    facts = DATASET_FACTS.get(config.dataset)
    if facts is None:
        raise ConfigError(f"dataset={config.dataset!r} has no known size; the sizes known are those of "
                          f"{sorted(DATASET_FACTS)} (or set train_subset)")
    return facts.train - config.val_size


def same_steps_on_fewer_images(config: TrainConfig, fraction: float) -> TrainConfig:
    """``config`` trained on about ``fraction`` of its training images for exactly the same optimiser steps.

    The smaller set is the first images of the training split (``train_subset``: nested, the same images in the same
    order for every model). Its epochs are longer in number and shorter in steps: with ``n`` full-size steps per epoch
    and ``epochs`` epochs, the run takes ``s`` steps per epoch for ``epochs * n / s`` epochs, ``s`` the divisor of
    ``epochs * n`` closest to ``fraction * n`` (so the step count is exact, and ``train_subset = s * batch_size``). The
    warmup covers the same steps, the learning-rate schedule is the same function of the step, and ``eval_every``
    evaluates after the same steps as the full run does (or as close as whole epochs allow), so the two runs differ in
    the images they see, nothing else.

    Raises :class:`~vmoe_lib.errors.ConfigError` for a ``fraction`` outside (0, 1) or a config whose training set size
    is unknown (an image folder without ``train_subset``).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction!r} is invalid; it must be a number between 0 and 1 (e.g. 1/11)")
    per_epoch = training_images(config) // config.batch_size
    total = config.epochs * per_epoch
    target = fraction * per_epoch
    divisors = [d for d in range(1, per_epoch + 1) if total % d == 0 and d < per_epoch]
    steps = min(divisors, key=lambda d: (abs(d - target), d))
    epochs = total // steps
    warmup_steps = int(round(config.warmup_epochs * per_epoch))
    full_eval = config.eval_every or 1
    return config.replace(train_subset=steps * config.batch_size, epochs=epochs,
                          warmup_epochs=warmup_steps / steps, eval_every=max(1, round(full_eval * per_epoch / steps)))
