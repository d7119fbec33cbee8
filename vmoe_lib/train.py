"""Training engine: one config object, one function that trains, evaluates and resumes.

A run is a pure function of ``(TrainConfig, seed)``: the model initialisation,
the batch order of every epoch and every batch's augmentation are seeded from
them, so two runs on the same CPU give bit-identical metrics. Checkpoints hold
the model, optimiser, schedule, RNG states and the running sums of the current
epoch, so a run killed at any point resumes from its last checkpoint and ends
with the same metrics as an uninterrupted run.

Auxiliary losses of MoE layers (any module exposing ``aux_loss``, see
:mod:`vmoe_lib.layers.aux`) are added to the task loss and logged separately.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm  # text bars: work in terminals, notebooks and papermill logs alike

from .costs import model_costs
from .data import DATASET_FACTS, DATASETS, BatchLoader, ImageDataset, check_available, load_dataset
from .distributed.data_parallel import (
    STRATEGIES,
    DistributedContext,
    after_backward,
    clip_grad_norm,
    data_parallel_noise,
    full_state,
    init_from_env,
    launched_by_torchrun,
    load_full_state,
    wrap_model,
)
from .errors import ConfigError, check_bool, check_choice, check_positive, check_range
from .layers.aux import collect_aux_loss, set_routing_labels
from .models.ensemble import ensemble_size, ensemble_targets
from .models import create_model, list_models

__all__ = ["TrainConfig", "TrainingDiverged", "train_model", "evaluate", "resolve_device", "load_data_for", "make_optimizer",
           "optimizer_impl", "check_data_parallel", "check_device"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run is stopped and never stored as a result."""

_OPTIMIZERS = ("adamw", "adam", "sgd")
_NATIVE_SIZE = {"fashion_mnist": 28, "cifar10": 32, "cifar100": 32}  # imagefolder: whatever image_size says


def _check_model_kwargs(model: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Reject ``model_kwargs`` the model does not accept, when the config is made, not when the run starts; return
    what the built model says about itself (:func:`_build_on_meta`).

    The model is built once per (model, kwargs) on the meta device (no memory, no initialisation
    cost); a ``TypeError`` (an unexpected keyword) or a :class:`ConfigError` of the model's own
    checks names the bad argument.
    """
    taken = sorted(set(model_kwargs) & {"num_classes", "in_chans"})
    if taken:
        raise ConfigError(f"model_kwargs={model_kwargs!r} set {taken}; the training engine sets the classes and input "
                          f"channels from the dataset; leave them out")
    try:
        key = json.dumps([model, model_kwargs], sort_keys=True)
    except TypeError as err:
        raise ConfigError(f"model_kwargs={model_kwargs!r} is invalid; it must hold only JSON values ({err})") from None
    return _build_on_meta(key)


@functools.lru_cache(maxsize=512)
def _build_on_meta(key: str) -> dict[str, Any]:
    """Build ``[model, model_kwargs]`` (JSON) on the meta device; return what the config checks read from it: its MoE
    routing group size (images), the image side a ViT is fixed to (``None``: any) and the smallest side the model
    can downsample (its total stride)."""
    model, model_kwargs = json.loads(key)
    try:
        with torch.device("meta"):
            built = create_model(model, **model_kwargs)
    except ConfigError as err:
        raise ConfigError(f"model_kwargs={model_kwargs!r} are invalid for model={model!r}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"model_kwargs={model_kwargs!r} are not accepted by model={model!r}: {err}") from None
    embed = getattr(built, "patch_embed", None)
    fixed = None
    if embed is not None and getattr(embed, "strict_img_size", False) and not getattr(built, "dynamic_img_size", False):
        fixed = int(embed.img_size[0])
    info = getattr(built, "feature_info", None) or [{}]
    return {"group_size": _routing_group_size(built), "fixed_size": fixed,
            "min_size": int(info[-1].get("reduction", 1)) if fixed is None else None}


@dataclass
class TrainConfig:
    """Everything that defines an experiment's outcome (and so its results key).

    Runtime choices that should not change the numbers — device, progress bars,
    where checkpoints go — are arguments of :func:`train_model` instead.
    """

    # Model
    model: str = "vit_pico_patch7_28"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Data
    dataset: str = "fashion_mnist"
    image_size: int | None = None  # None: the dataset's native size
    val_size: int = 5000
    train_subset: int | None = None  # use only the first n training images (smoke presets)
    eval_subset: int | None = None  # evaluate on the first n val/test images (smoke presets)
    augment: bool = True
    crop_padding: int = 2
    flip: bool = True
    # Optimisation
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    amp: bool = True  # mixed precision, used on CUDA only
    eval_batch_size: int = 1000
    # Evaluate val/test after every n-th epoch and after the last (None: after every epoch). Training is the same
    # either way; a long run on a small subset (many short epochs) spends less time evaluating.
    eval_every: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        check_choice("model", self.model, list_models())
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} is invalid; it must be an int > 0")
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.99)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)
        for name, low in (("crop_padding", 0), ("val_size", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} is invalid; it must be an int >= {low}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise ConfigError(f"image_size={self.image_size!r} is invalid; it must be an int >= 8 or None")
        for name in ("train_subset", "eval_subset", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name}={value!r} is invalid; it must be an int > 0 or None")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs={self.model_kwargs!r} is invalid; it must be a dict")
        for name in ("augment", "flip", "amp"):
            check_bool(name, getattr(self, name))
        size = self.image_size or _NATIVE_SIZE.get(self.dataset)
        if size is not None and self.crop_padding >= size:
            raise ConfigError(f"crop_padding={self.crop_padding} is invalid for {size}x{size} images; it must be an int "
                              f"from 0 to {size - 1} (a few pixels, e.g. 2 or 4)")
        built = _check_model_kwargs(self.model, self.model_kwargs)
        self._check_against_data(built)

    def _check_against_data(self, built: dict[str, Any]) -> None:
        """What no run of this config could train: more images per batch than the training split holds, a subset
        larger than its split, an image size the model cannot take, an image folder that is not set."""
        facts = DATASET_FACTS.get(self.dataset)
        if self.dataset == "imagefolder":
            check_available("imagefolder")
        if facts is not None:
            if self.val_size >= facts.train:
                raise ConfigError(f"val_size={self.val_size} is invalid for dataset={self.dataset!r}: it holds out that "
                                  f"many of the {facts.train} training images; use fewer (the default is 5000)")
            available = facts.train - self.val_size
            if self.train_subset is not None and self.train_subset > available:
                raise ConfigError(f"train_subset={self.train_subset} is larger than the {available} training images of "
                                  f"{self.dataset!r} ({facts.train} minus val_size={self.val_size}); use at most {available}")
            images = self.train_subset or available
            if self.batch_size > images:
                where = f"train_subset={self.train_subset}" if self.train_subset else f"{self.dataset!r}"
                raise ConfigError(f"batch_size={self.batch_size} is larger than the {images} training images of this "
                                  f"config ({where}): no step could train; use a batch_size of at most {images}")
            if self.eval_subset is not None and self.eval_subset > facts.test:
                raise ConfigError(f"eval_subset={self.eval_subset} is larger than the {facts.test} test images of "
                                  f"{self.dataset!r}; use at most {facts.test} (or None for all)")
        size = self.image_size or (facts.size if facts is not None else None)
        if size is not None and built["fixed_size"] is not None and size != built["fixed_size"]:
            shown = f"image_size={self.image_size}" if self.image_size else f"the {size}x{size} images of {self.dataset!r}"
            raise ConfigError(f"{shown} does not fit model={self.model!r}, which takes {built['fixed_size']}x"
                              f"{built['fixed_size']} images; use image_size=None for the dataset's size, a model made "
                              f"for {size} (e.g. model_kwargs={{'img_size': {size}}}), or image_size={built['fixed_size']}")
        if size is not None and built["min_size"] and size < built["min_size"]:
            shown = f"image_size={self.image_size}" if self.image_size else f"the {size}x{size} images of {self.dataset!r}"
            verb = "is" if self.image_size else "are"
            raise ConfigError(f"{shown} {verb} too small for model={self.model!r}, which downsamples by "
                              f"{built['min_size']}; use image_size={built['min_size']} or more")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated); unknown names raise :class:`ConfigError`."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks cuda, then mps, then cpu; anything else must be available."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} requested but this machine has {torch.cuda.device_count()} GPU(s); "
                          f"use 'cuda' or 'cuda:0' to 'cuda:{torch.cuda.device_count() - 1}'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device!r} requested but MPS is not available here; use 'auto' or 'cpu'")
    return dev


def check_device(device: str, *, here: bool = True) -> str:
    """Check a ``device`` setting before any run starts: a torch device name, and (``here``) one this machine has.

    With ``here=False`` (runs that train on other machines, e.g. SLURM jobs) only the name is checked.
    """
    if device == "auto":
        return device
    if not isinstance(device, str):
        raise ConfigError(f"device={device!r} is invalid; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if here:
        resolve_device(device)
        return device
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    return device


_DATA_CACHE: dict[tuple, ImageDataset] = {}


def load_data_for(config: TrainConfig) -> ImageDataset:
    """The dataset a config trains on (cached in memory across runs of one process)."""
    key = (config.dataset, config.image_size, config.val_size, os.environ.get("VMOE_DATA_DIR"))
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) >= 2:  # a sweep alternates between at most two input sizes
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = load_dataset(config.dataset, val_size=config.val_size, image_size=config.image_size)
    return _DATA_CACHE[key]


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, *, device: torch.device | None = None, amp: bool = True,
    distributed: DistributedContext | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``loader`` (eval mode).

    In a data-parallel run under DDP, rank ``r`` evaluates the batches ``r, r + N, ...`` (the 1-process
    run's batches, so its routing groups) and the sums are added over ranks; under FSDP2 and ``"ep"``
    every rank runs every batch (each forward all-gathers the shards or exchanges tokens between the
    ranks' experts, so all ranks must run the same forwards).
    """
    device = device or loader.device
    was_training = model.training
    model.eval()
    split_batches = distributed is not None and distributed.world_size > 1 and distributed.strategy == "ddp"
    loss_sum, correct, count = 0.0, 0, 0
    for index, (images, labels) in enumerate(loader):
        if split_batches and index % distributed.world_size != distributed.rank:
            continue
        with _autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        count += labels.numel()
    if split_batches:
        loss_sum, correct, count = distributed.all_sum([loss_sum, correct, count], device)
    model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def moe_bypass_eval(model: nn.Module, loader: BatchLoader, *, autocast: Callable | None = None) -> dict[str, Any] | None:
    """Test accuracy of ``model`` with every MoE layer bypassed (:func:`~vmoe_lib.models.moe_utils.bypass_moe`),
    and which images it got right (packed bits); ``None`` for a model without MoE layers."""
    from .layers.stats import moe_layers
    from .models.moe_utils import bypass_moe
    from .predictions import correct_bits

    if not moe_layers(model):
        return None
    with bypass_moe(model):
        accuracy, bits = correct_bits(model, loader, autocast=autocast)
    return {"accuracy": accuracy, "correct": bits}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer and param groups (no weight decay on biases, norms, position embeddings, class
    tokens), with PyTorch's fused kernel where this torch has one for the device.

    The fused AdamW step is 5x faster on the CPU than the default per-parameter loop (measured:
    0.54 vs 3.0 ms for MoE ViT-pico's 0.67M parameters, one thread), which matters most for MoE
    models, whose experts multiply the parameter count. It rounds differently from the loop, so the
    record names the implementation (``optimizer_impl``).
    """
    from timm.optim import create_optimizer_v2

    args = dict(opt=config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    try:
        return create_optimizer_v2(model, fused=True, **args)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this optimizer/device in this torch
        return create_optimizer_v2(model, **args)


def optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    """``"fused"``, ``"foreach"`` or ``"for-loop"``: which implementation steps ``optimizer``."""
    defaults = getattr(optimizer, "defaults", {})
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"


def _lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return factor


def _atomic_save(obj: Any, path: Path) -> None:
    # A temporary name of this process's own: a kill during the write leaves the previous
    # checkpoint intact, and two processes never write into each other's temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng_cpu", "state", "config", "seed")


def _load_checkpoint(path: Path, dev: torch.device) -> dict[str, Any] | None:
    """A checkpoint's contents, or ``None`` after moving a corrupt or truncated one aside (with a warning)."""
    try:
        saved = torch.load(path, map_location=dev, weights_only=False)
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise ValueError(f"missing {missing}")
        return saved
    except Exception as err:  # truncated zip, unpickling error, wrong contents: never resume from it
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        warnings.warn(f"checkpoint {path} is corrupt ({type(err).__name__}: {err}); moved aside to {aside.name}, "
                      "the run restarts from scratch", stacklevel=3)
        return None


def train_model(
    config: TrainConfig,
    seed: int = 0,
    *,
    device: str | torch.device | None = "auto",
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every_steps: int | None = None,
    progress: bool = True,
    extra_eval: Callable[[nn.Module, ImageDataset, torch.device], dict[str, Any]] | None = None,
    weights_path: str | os.PathLike | None = None,
    run_label: str | None = None,
    distributed: DistributedContext | None = None,
    compile: bool = False,
) -> dict[str, Any] | None:
    """Train ``config`` with ``seed``; return its record (history, final metrics, costs).

    Args:
        config: the experiment.
        seed: seeds model init, batch order, augmentation and dropout/router noise.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... (see :func:`resolve_device`).
        checkpoint_path: if given, the run checkpoints there at every epoch end (and
            every ``checkpoint_every_steps`` steps) and resumes from it if it exists.
        progress: show tqdm progress bars.
        extra_eval: called with ``(model, data, device)`` after training; its dict is
            stored under ``"extra"`` (e.g. inference-time routing sweeps).
        weights_path: if given, the final weights are saved there (safetensors).
        run_label: how errors name the run (default: model and seed).
        distributed: this process's place in a data-parallel run (:mod:`vmoe_lib.distributed`; ``torchrun``
            starts the processes). Every rank trains on its share of each global batch
            (``config.batch_size`` stays the global batch); rank 0 writes the checkpoint and weights and
            returns the record, the other ranks return ``None``. ``None``: this process alone.
        compile: run the training step's forward and backward through ``torch.compile`` (default settings; the MoE
            layers take their static-shape path, :mod:`vmoe_lib.layers.dispatch`). Off by default: the results of
            record are eager. Evaluation stays eager. Compiled kernels round differently, so a compiled run's
            numbers are not bit-identical to an eager run's; the record (and its manifest) says ``compile``.

    Raises:
        TrainingDiverged: the loss became non-finite; the message names the run, the step and the
            last finite loss. No parameter update is made from the non-finite loss.

    Returns:
        A dict with ``history`` (per-epoch metrics), ``final`` (last epoch's losses and
        accuracies), ``costs`` (parameters, FLOPs per image), ``extra`` (``extra_eval``'s
        output), ``wall_time_s``, ``device`` and ``predictions`` (the final model's per-image test
        predictions, :mod:`vmoe_lib.predictions`; ``None`` without a test split) and, for an MoE
        model, ``moe_bypass`` (:func:`moe_bypass_eval`: test accuracy with every MoE layer bypassed), and for a
        data-parallel run ``distributed`` (world size, backend, strategy).
    """
    config.validate()
    if not isinstance(compile, bool):
        raise ConfigError(f"compile={compile!r} is invalid; it must be True or False")
    dev = resolve_device(device)
    ctx = distributed if distributed is not None and distributed.world_size > 1 else None
    if ctx is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ctx.local_rank)
    data = load_data_for(config)
    torch.manual_seed(seed)
    model = create_model(config.model, num_classes=data.num_classes, in_chans=data.image_shape[0], **config.model_kwargs)
    model.to(dev)
    costs = model_costs(model, (1, *data.image_shape))

    train_images, train_labels = data.train_images, data.train_labels
    if config.train_subset is not None:
        train_images, train_labels = train_images[: config.train_subset], train_labels[: config.train_subset]
    loader_args = dict(mean=data.mean, std=data.std, device=dev)
    train_loader = BatchLoader(
        train_images, train_labels, batch_size=config.batch_size, shuffle=True, drop_last=True,
        augment=config.augment, crop_padding=config.crop_padding, flip=config.flip, seed=seed, **loader_args,
    )
    if len(train_loader) == 0:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the {train_images.shape[0]} training images")
    if ctx is not None:
        ctx.check_batch("batch_size", config.batch_size, _routing_group_size(model))
    eval_loaders = {}
    for split in ("val", "test"):
        images, labels = data.split(split)
        if config.eval_subset is not None:
            images, labels = images[: config.eval_subset], labels[: config.eval_subset]
        if images.shape[0] > 0:
            eval_loaders[split] = BatchLoader(images, labels, batch_size=config.eval_batch_size, **loader_args)

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    saved = _load_checkpoint(ckpt, dev) if ckpt is not None and ckpt.exists() else None
    if saved is not None and (saved.get("seed") != seed or saved.get("config") != config.to_dict()):
        raise ConfigError(
            f"checkpoint_path={str(ckpt)!r} belongs to another run (seed {saved.get('seed')}, a different "
            f"config); pass a path of this run's own or delete that file"
        )
    net = model  # what the training step calls: the model, or its DDP/FSDP2 wrapping
    if ctx is not None:
        if saved is not None:
            model.load_state_dict(saved["model"])  # before wrapping: DDP broadcasts rank 0's, FSDP2 shards it
        net = wrap_model(model, ctx, dev)
    if compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))
    use_amp = config.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())

    state = {"epoch": 0, "step": 0, "history": [], "accum": [0.0, 0.0, 0, 0, 0.0], "wall_time_s": 0.0}
    if saved is not None:
        if ctx is None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        else:
            load_full_state(net, optimizer, saved["model"], saved["optimizer"], ctx)
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng_cpu"])
        if dev.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], dev)
        state = saved["state"]

    def save_checkpoint() -> None:
        if ckpt is None:
            return
        if ctx is None:
            model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
        else:
            model_state, optimizer_state = full_state(net, optimizer, ctx)  # a collective under FSDP2
            if not ctx.is_main:
                ctx.barrier()  # rank 0 is writing; nobody goes on before the checkpoint is whole
                return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "state": state,
                "config": config.to_dict(),
                "seed": seed,
            },
            ckpt,
        )
        if ctx is not None:
            ctx.barrier()

    model.train()
    last_finite: float | None = None
    label_routed = set_routing_labels(model, None)  # a super-class-guided router learns from each batch's labels
    members = ensemble_size(model)
    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        started = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch, initial=state["step"], disable=not progress or (ctx is not None and not ctx.is_main),
            leave=False,
            desc=f"{config.model} s{seed} epoch {epoch + 1}/{config.epochs}",
        )
        for images, labels in train_loader.epoch(epoch, start_step=state["step"]):
            if ctx is not None:
                images, labels = ctx.shard(images), ctx.shard(labels)
            if label_routed:
                set_routing_labels(model, labels)
            with _autocast(dev, use_amp), data_parallel_noise(ctx):
                logits = net(images)
                targets = ensemble_targets(labels, members)  # an E³ model returns each member's logits (M B rows)
                task_loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
                aux = collect_aux_loss(model)
                loss = task_loss if aux is None else task_loss + aux
            if label_routed:
                set_routing_labels(model, None)
            task_value = task_loss.item()
            aux_value = aux.item() if aux is not None else 0.0
            correct = (logits.argmax(dim=-1) == targets).sum().item()
            if ctx is not None:  # the global batch's means, the same on every rank (all stop together)
                task_value, aux_value, correct = ctx.all_sum([task_value, aux_value, correct], dev)
                task_value, aux_value, correct = task_value / ctx.world_size, aux_value / ctx.world_size, int(correct)
            if members > 1:
                correct = correct / members  # train accuracy of an E³ model: its members' mean
            if not math.isfinite(task_value + aux_value):
                raise TrainingDiverged(
                    f"training diverged: run {run_label or f'{config.model} seed {seed}'} got a non-finite loss "
                    f"(task {task_value}, aux {aux_value}) at step {epoch * steps_per_epoch + state['step'] + 1} "
                    f"(epoch {epoch + 1}, step {state['step'] + 1} of {steps_per_epoch}); last finite loss: "
                    f"{last_finite if last_finite is not None else 'none (the first step)'}"
                )
            last_finite = task_value + aux_value
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            after_backward(model, ctx)
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                clip_grad_norm(net, config.grad_clip, ctx)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            acc = state["accum"]
            global_batch = labels.numel() * (ctx.world_size if ctx is not None else 1)
            acc[0] += task_value * global_batch
            acc[1] += aux_value * global_batch
            acc[2] += correct
            acc[3] += global_batch
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{acc[0] / acc[3]:.3f}")
            if checkpoint_every_steps and state["step"] % checkpoint_every_steps == 0 and state["step"] < steps_per_epoch:
                now = time.perf_counter()
                acc[4] += now - started  # train seconds of this epoch so far, kept across a resume
                started = now
                save_checkpoint()
        bar.close()
        acc = state["accum"]
        acc[4] += time.perf_counter() - started
        eval_started = time.perf_counter()
        record = {
            "epoch": epoch + 1,
            "train_loss": acc[0] / acc[3],
            "aux_loss": acc[1] / acc[3],
            "train_accuracy": acc[2] / acc[3],
            "lr": scheduler.get_last_lr()[0],
        }
        if config.eval_every is None or (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            for split, loader in eval_loaders.items():
                metrics = evaluate(model, loader, device=dev, amp=use_amp, distributed=ctx)
                record[f"{split}_loss"], record[f"{split}_accuracy"] = metrics["loss"], metrics["accuracy"]
        record["epoch_seconds"] = acc[4] + time.perf_counter() - eval_started
        record["train_images_per_second"] = acc[3] / acc[4] if acc[4] > 0 else float("nan")
        state["wall_time_s"] += record["epoch_seconds"]
        state["history"].append(record)
        state["epoch"], state["step"], state["accum"] = epoch + 1, 0, [0.0, 0.0, 0, 0, 0.0]
        save_checkpoint()
        if progress and (ctx is None or ctx.is_main):
            shown = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("accuracy"))
            tqdm.write(f"{config.model} seed {seed} epoch {epoch + 1}/{config.epochs}: {shown}")

    if ctx is not None and ctx.strategy == "ddp" and not ctx.is_main:
        return None  # rank 0 evaluates the final model alone (DDP keeps a full copy on every rank)
    # Under FSDP2 and "ep" every rank runs these forwards (collectives inside); rank 0 keeps the record.
    predictions = bypass = None
    if "test" in eval_loaders:
        from .predictions import collect_predictions, pack_predictions

        predictions = pack_predictions(*collect_predictions(model, eval_loaders["test"],
                                                            autocast=lambda: _autocast(dev, use_amp)))
        bypass = moe_bypass_eval(model, eval_loaders["test"], autocast=lambda: _autocast(dev, use_amp))
    extra = extra_eval(model, data, dev) if extra_eval is not None else {}
    if weights_path is not None:
        from safetensors.torch import save_file

        weights = model.state_dict() if ctx is None else full_state(net, optimizer, ctx)[0]
        if ctx is None or ctx.is_main:
            Path(weights_path).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(weights_path))
    if ctx is not None and not ctx.is_main:
        return None
    final = {k: v for k, v in state["history"][-1].items() if k.endswith(("accuracy", "loss"))}
    record = {
        "history": state["history"],
        "final": final,
        "costs": costs,
        "extra": extra,
        "wall_time_s": state["wall_time_s"],
        "device": str(dev),
        "optimizer_impl": optimizer_impl(optimizer),
        "predictions": predictions,
        "moe_bypass": bypass,
    }
    if ctx is not None:
        record["distributed"] = ctx.describe()
    if compile:
        record["compiled"] = True  # only then: an eager record stays as it was before the option existed
    return record


def check_data_parallel(config: TrainConfig, world_size: int) -> None:
    """Raise :class:`ConfigError` when ``world_size`` data-parallel processes cannot share ``config``'s global batch.

    ``batch_size`` must divide by ``world_size``, and each share must hold whole MoE routing groups (see
    :mod:`vmoe_lib.distributed`). The sweep engine calls this for every run before starting any.
    """
    if world_size > 1:
        group = _build_on_meta(json.dumps([config.model, config.model_kwargs], sort_keys=True))["group_size"]
        DistributedContext(rank=0, world_size=world_size).check_batch("batch_size", config.batch_size, group)


def _routing_group_size(model: nn.Module) -> int:
    """Images per routing group of the model's MoE layers (1 without MoE): a rank's share must hold whole groups."""
    from .layers.moe import MoEMlp

    return max((m.group_size for m in model.modules() if isinstance(m, MoEMlp)), default=1)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train one config (JSON) with one seed; print the record as JSON. Under torchrun "
        "(`torchrun --nproc_per_node N -m vmoe_lib.train ...`) the N processes train the run data-parallel.")
    parser.add_argument("config", help="TrainConfig as a JSON string or a path to a JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--checkpoint-every-steps", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the record here instead of stdout")
    parser.add_argument("--weights", default=None, help="save the final weights here (safetensors)")
    parser.add_argument("--strategy", default="ddp", choices=STRATEGIES,
                        help="under torchrun: ddp (default), fsdp2 (parameters sharded, for large models) or ep (the "
                        "experts of every MoE layer split over the processes, the rest replicated)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    text = Path(args.config).read_text() if os.path.isfile(args.config) else args.config
    config = TrainConfig.from_dict(json.loads(text))
    context = init_from_env(resolve_device(args.device), args.strategy) if launched_by_torchrun() else None
    try:
        record = train_model(
            config, args.seed, device=args.device, checkpoint_path=args.checkpoint,
            checkpoint_every_steps=args.checkpoint_every_steps, progress=not args.no_progress,
            weights_path=args.weights, distributed=context,
        )
    finally:
        if context is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if record is None:  # a data-parallel rank other than 0
        return
    payload = json.dumps(record, indent=1)
    if args.out:
        Path(args.out).write_text(payload)
    else:
        print(payload)


if __name__ == "__main__":
    _main()
