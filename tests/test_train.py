"""Training engine: config validation, determinism, auxiliary losses, checkpoint/resume, costs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import timm
import torch
import torch.nn as nn

import vmoe_lib
from helpers_foundation import REPO_ROOT, TIMING_KEYS, use_hermetic_folders
from vmoe_lib import train as vtrain
from vmoe_lib.costs import count_parameters, flops_per_image, model_costs
from vmoe_lib.data import BatchLoader
from vmoe_lib.errors import ConfigError
from vmoe_lib.train import TrainConfig, evaluate, resolve_device, train_model

# 700 training images after a 100-image validation split; train_subset=256 and batch 64: 4 steps per epoch.
# Dropout draws from the global RNG, so a resume must restore it to match an uninterrupted run.
TINY = dict(
    model="vit_test_patch7_28", model_kwargs={"proj_drop_rate": 0.1}, val_size=100, train_subset=256,
    eval_subset=100, epochs=2, batch_size=64, eval_batch_size=100, warmup_epochs=0.5, min_lr_ratio=0.1,
)


# Shared fixtures (tests/conftest.py): one torch thread, and data/results/cache in test folders.
SYNTHETIC_IMAGES = (800, 200)  # synthetic Fashion-MNIST: training, test images
pytestmark = pytest.mark.usefixtures("one_torch_thread", "hermetic_data")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run of TINY with seed 0 (and an ``extra_eval``), shared by several tests."""
    seen = {}

    def extra_eval(model, data, device):
        seen["device"] = device
        return {"n_val": int(data.val_images.shape[0])}

    with pytest.MonkeyPatch.context() as mp:
        use_hermetic_folders(mp, data_dir, tmp_path_factory.mktemp("reference"))
        record = train_model(TrainConfig(**TINY), 0, device="cpu", progress=False, extra_eval=extra_eval)
    return record, seen


def _outcome(history):
    """History without its timing keys: what must be bit-identical between equivalent runs."""
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


# ---------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "vit_nope_patch7_28"),
        ("dataset", "imagenet"),
        ("optimizer", "adamx"),
        ("epochs", 0),
        ("epochs", 1.5),
        ("epochs", True),
        ("batch_size", -8),
        ("eval_batch_size", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("weight_decay", -0.1),
        ("warmup_epochs", -1),
        ("label_smoothing", 1.0),
        ("label_smoothing", -0.1),
        ("min_lr_ratio", 1.5),
        ("grad_clip", 0.0),
        ("train_subset", 0),
        ("eval_subset", -5),
        ("model_kwargs", [("drop_rate", 0.1)]),
    ],
)
def test_invalid_setting_is_named_with_its_value(field, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    assert f"{field}={value!r}" in str(err.value)
    with pytest.raises(ConfigError):  # replace() validates too
        TrainConfig().replace(**{field: value})


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        TrainConfig(model="vit_tiny_patch16_224")
    assert "'vit_test_patch7_28'" in str(err.value) and "'convnext_test_32'" in str(err.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": "vit_test_patch7_28", "learning_rate": 0.1})
    assert "learning_rate" in str(err.value) and "'lr'" in str(err.value)
    with pytest.raises(ConfigError, match="lrr"):
        TrainConfig().replace(lrr=0.1)


def test_to_dict_round_trip_and_replace():
    config = TrainConfig(**{**TINY, "model_kwargs": {"drop_rate": 0.1}})
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    changed = config.replace(lr=0.01)
    assert changed.lr == 0.01 and config.lr == 2e-3 and changed.replace(lr=2e-3) == config


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as err:
            resolve_device(device)
        assert f"device={device!r}" in str(err.value) and "CUDA is not available" in str(err.value)
    with pytest.raises(ConfigError, match="device='gpu'"):
        resolve_device("gpu")


# ---------------------------------------------------------------------------
# evaluate: golden values


class _ConstantLogits(nn.Module):
    """Always the same logits, whatever the image: 0 for every class except ``bias`` on class 3."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 3] = self.bias
        return logits


def test_evaluate_golden_values():
    labels = torch.tensor([3, 3, 0, 1, 3, 9, 3, 2])  # 4 of 8 are class 3
    loader = BatchLoader(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), labels, batch_size=3, mean=(0.0,), std=(1.0,))
    # Uniform logits: the loss of every image is log 10, argmax picks class 0 (1 of 8 right).
    metrics = evaluate(_ConstantLogits(0.0), loader)
    assert metrics["loss"] == pytest.approx(math.log(10)) and metrics["accuracy"] == 1 / 8
    # Logit 1 on class 3: log-sum-exp = log(9 + e); loss is lse - 1 on class 3 and lse elsewhere.
    lse = math.log(9 + math.e)
    metrics = evaluate(_ConstantLogits(1.0), loader)
    assert metrics["loss"] == pytest.approx((4 * (lse - 1) + 4 * lse) / 8) and metrics["accuracy"] == 0.5


# ---------------------------------------------------------------------------
# train_model: record, schedule, determinism


def test_record_and_schedule(reference):
    record, seen = reference
    history = record["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {
        "epoch", "train_loss", "aux_loss", "train_accuracy", "lr", "val_loss", "val_accuracy",
        "test_loss", "test_accuracy", "epoch_seconds", "train_images_per_second",
    }
    assert all(h["aux_loss"] == 0.0 for h in history)  # a dense model has no auxiliary loss
    assert all(0.0 <= h[k] <= 1.0 for h in history for k in ("train_accuracy", "val_accuracy", "test_accuracy"))
    # eval_subset=100 of 100 val / 200 test images: accuracies are multiples of 1/100.
    assert all(abs(h["test_accuracy"] * 100 - round(h["test_accuracy"] * 100)) < 1e-9 for h in history)
    # 4 steps/epoch, 8 in all, warmup round(0.5 * 4) = 2 steps. After epoch 1 (step 4):
    # progress (4 - 2) / (8 - 2) = 1/3, cosine 0.5 (1 + cos(pi/3)) = 0.75, factor 0.1 + 0.9 * 0.75 = 0.775.
    assert history[0]["lr"] == pytest.approx(2e-3 * 0.775)
    assert history[1]["lr"] == pytest.approx(2e-3 * 0.1)  # the end of the cosine: min_lr_ratio
    assert record["final"] == {k: v for k, v in history[-1].items() if k.endswith(("loss", "accuracy"))}
    assert record["extra"] == {"n_val": 100} and seen["device"] == torch.device("cpu")
    assert record["device"] == "cpu"
    assert record["wall_time_s"] == pytest.approx(sum(h["epoch_seconds"] for h in history))
    assert record["costs"]["params_total"] == 27978  # worked out in test_vit_parameter_count_by_hand
    json.dumps(record)  # a record is plain JSON


def test_same_seed_is_bit_identical_and_another_seed_differs(reference):
    config = TrainConfig(**TINY)
    a = reference[0]
    b = train_model(config, 0, device="cpu", progress=False)
    c = train_model(config, 1, device="cpu", progress=False)
    assert _outcome(a["history"]) == _outcome(b["history"])
    assert a["costs"] == b["costs"]
    for key in ("train_loss", "val_loss", "test_loss"):
        assert a["history"][-1][key] != c["history"][-1][key]


def test_batch_larger_than_the_training_set_is_an_error():
    with pytest.raises(ConfigError, match="batch_size=64"):
        train_model(TrainConfig(**{**TINY, "train_subset": 32}), 0, device="cpu", progress=False)


def test_convnext_learns_the_synthetic_task_on_padded_images():
    # The label is a bright 7x7 square at one of 10 places: one epoch of 10 steps is far above chance (10%).
    config = TrainConfig(**{
        **TINY, "model": "convnext_test_32", "model_kwargs": {}, "image_size": 32,
        "epochs": 1, "train_subset": 640, "augment": False,
    })
    record = train_model(config, 0, device="cpu", progress=False)
    assert record["final"]["val_accuracy"] > 0.5 and record["final"]["test_accuracy"] > 0.5
    assert record["costs"]["flops_per_image"] > 0


# ---------------------------------------------------------------------------
# Auxiliary losses: any submodule that sets `aux_loss` is trained with it


AUX_VALUE = 0.25


class _ConstantAux(nn.Module):
    """Sets ``aux_loss`` to exactly 0.25 with gradient 1 on a scalar parameter ``w`` (0.25 + w - w.detach())."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.aux_loss = None

    def forward(self) -> None:
        self.aux_loss = AUX_VALUE + (self.w - self.w.detach())


class _WithAux(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.backbone = timm.create_model("vit_test_patch7_28", **kwargs)
        self.regulariser = _ConstantAux()

    def forward(self, x):
        self.regulariser()
        return self.backbone(x)

    def no_weight_decay(self):
        # As the plain ViT: no weight decay on its position embedding and class token (timm's param groups).
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}


@pytest.fixture
def aux_model_name():
    """A model registered with timm under ``vmoe_*`` (so ``list_models()`` accepts it), removed afterwards."""
    name = f"vmoe_test_constant_aux_{uuid.uuid4().hex[:8]}"

    def factory(pretrained=False, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        return _WithAux(**kwargs)

    factory.__name__ = name
    timm.models.register_model(factory)
    assert name in vmoe_lib.list_models()
    yield name
    from timm.models import _registry

    _registry._model_entrypoints.pop(name, None)
    clear = getattr(_registry, "_clear_model_entries", None)
    if clear is not None:
        clear(name)
    exported = globals().get("__all__")  # register_model lists the name in this module's __all__
    if exported is not None and name in exported:
        exported.remove(name)


def test_aux_loss_is_logged_and_trained(aux_model_name, tmp_path):
    from safetensors.torch import load_file

    # Without gradient clipping the aux gradient (on `w` only) cannot touch the backbone's updates.
    plain = TrainConfig(**{**TINY, "grad_clip": None})
    config = plain.replace(model=aux_model_name)
    record = train_model(config, 0, device="cpu", progress=False, weights_path=tmp_path / "w.safetensors")
    # Every step adds exactly 0.25, so the per-image mean over an epoch is exactly 0.25.
    assert [h["aux_loss"] for h in record["history"]] == [AUX_VALUE, AUX_VALUE]
    assert record["final"]["aux_loss"] == AUX_VALUE
    # The backbone (same init, same batches) trains exactly as the plain model, and the task loss is
    # logged without the aux loss: every other metric equals the plain run's.
    baseline = train_model(plain, 0, device="cpu", progress=False)
    strip = lambda h: {k: v for k, v in h.items() if k != "aux_loss"}  # noqa: E731
    assert [strip(h) for h in _outcome(record["history"])] == [strip(h) for h in _outcome(baseline["history"])]
    assert [h["aux_loss"] for h in baseline["history"]] == [0.0, 0.0]
    # `w` gets its only gradient from the aux loss: it moved only if the aux loss was in the loss.
    w = load_file(str(tmp_path / "w.safetensors"))["regulariser.w"]
    assert w.item() < 1.0 - 1e-4


# ---------------------------------------------------------------------------
# Checkpoint and resume


class _Interrupt(Exception):
    pass


def _count_steps(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Count training steps (collect_aux_loss runs once per step); raise on step ``stop_at`` to simulate a crash."""
    calls = [0]
    real = vtrain.collect_aux_loss

    def counting(model):
        calls[0] += 1
        if stop_at is not None and calls[0] == stop_at:
            raise _Interrupt
        return real(model)

    monkeypatch.setattr(vtrain, "collect_aux_loss", counting)
    return calls


@pytest.mark.parametrize(
    "every, stop_at, saved_at, steps_left",
    [
        # 2 epochs x 4 steps. Only epoch-end checkpoints: a crash on step 6 resumes after step 4.
        (None, 6, (1, 0), 4),
        # Every 3 steps too: a crash on step 4 resumes after step 3, mid-epoch.
        (3, 4, (0, 3), 5),
    ],
    ids=["end_of_epoch", "mid_epoch"],
)
def test_resume_in_process_matches_uninterrupted(monkeypatch, tmp_path, reference, every, stop_at, saved_at, steps_left):
    config = TrainConfig(**TINY)
    ckpt = tmp_path / "ck.pt"
    _count_steps(monkeypatch, stop_at=stop_at)
    with pytest.raises(_Interrupt):
        train_model(config, 0, device="cpu", progress=False, checkpoint_path=ckpt, checkpoint_every_steps=every)
    state = torch.load(ckpt, weights_only=False)["state"]
    assert (state["epoch"], state["step"]) == saved_at
    calls = _count_steps(monkeypatch)
    resumed = train_model(config, 0, device="cpu", progress=False, checkpoint_path=ckpt, checkpoint_every_steps=every)
    assert calls[0] == steps_left  # it resumed rather than starting over
    assert _outcome(resumed["history"]) == _outcome(reference[0]["history"])
    assert resumed["final"] == reference[0]["final"]


def test_finished_checkpoint_is_not_trained_again(monkeypatch, tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1})
    first = train_model(config, 0, device="cpu", progress=False, checkpoint_path=tmp_path / "ck.pt")
    calls = _count_steps(monkeypatch)
    again = train_model(config, 0, device="cpu", progress=False, checkpoint_path=tmp_path / "ck.pt")
    assert calls[0] == 0 and again["history"] == first["history"]


def test_checkpoint_of_another_seed_is_refused(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1})
    train_model(config, 0, device="cpu", progress=False, checkpoint_path=tmp_path / "ck.pt")
    with pytest.raises((ConfigError, ValueError)):
        train_model(config, 1, device="cpu", progress=False, checkpoint_path=tmp_path / "ck.pt")


def _train_cli(config: dict, out, *extra: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vmoe_lib.train", json.dumps(config), "--seed", "0", "--device", "cpu",
           "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_and_restart_gives_the_uninterrupted_history(tmp_path, data_dir):
    # 2 epochs x 10 steps (640 images, batch 64); a checkpoint every 3 steps and at each epoch end.
    config = {**TINY, "train_subset": 640}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # as this process (see single_torch_thread)
        "VMOE_DATA_DIR": str(data_dir),
        "VMOE_RESULTS_DIR": str(tmp_path / "results"),
        "VMOE_CACHE_DIR": str(tmp_path / "cache"),
    }
    ckpt, out = tmp_path / "ck.pt", tmp_path / "a.json"
    resumable = ("--checkpoint", str(ckpt), "--checkpoint-every-steps", "3")
    victim = _train_cli(config, out, *resumable, env=env)
    # The uninterrupted run, in this process while the victim starts up.
    uninterrupted = train_model(TrainConfig(**config), 0, device="cpu", progress=False)
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert victim.poll() is None, f"the run ended before its first checkpoint: {victim.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL and not out.exists()
    state = torch.load(ckpt, weights_only=False)["state"]
    assert state["epoch"] * 10 + state["step"] < 20  # killed part-way

    restarted = _train_cli(config, out, *resumable, env=env)
    _, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err[-2000:]
    resumed = json.loads(out.read_text())
    assert len(resumed["history"]) == 2
    assert _outcome(resumed["history"]) == _outcome(uninterrupted["history"])
    assert torch.load(ckpt, weights_only=False)["state"]["epoch"] == 2


# ---------------------------------------------------------------------------
# Costs


def test_vit_parameter_count_by_hand():
    # vit_test_patch7_28: D=32, 2 blocks, MLP 4D=128, 1 input channel, 16 patches + class token, 10 classes.
    #   patch embed 7*7*1*32 + 32 = 1600; class token 32; position embedding 17*32 = 544
    #   block: norm1 2*32 + qkv 32*96+96 + proj 32*32+32 + norm2 2*32 + fc1 32*128+128 + fc2 128*32+32
    #        = 64 + 3168 + 1056 + 64 + 4224 + 4128 = 12704, two blocks 25408
    #   final norm 64; head 32*10 + 10 = 330        total 1600+32+544+25408+64+330 = 27978
    model = vmoe_lib.create_model("vit_test_patch7_28")
    assert count_parameters(model) == {"total": 27978, "activated": 27978}


# FLOPs (2 per multiply-accumulate) of vit_test_patch7_28 on one 1x28x28 image, N = 17 tokens, D = 32:
#   patch embed  16 patches * 49 * 32 MACs                    =  25,088 MACs
#   per block    qkv 17*32*96 = 52,224; q k^T 17*17*32 = 9,248; attn v 9,248; proj 17*32*32 = 17,408;
#                fc1 17*32*128 = 69,632; fc2 69,632           = 227,392 MACs, two blocks 454,784
#   head         32 * 10 (class token only)                   =     320 MACs
#   total 480,192 MACs = 960,384 FLOPs, of which attention (q k^T and attn v) 2 * 2 * 9,248 * 2 = 73,984.
VIT_TEST_FLOPS = 960_384


def test_flop_counter_matches_the_hand_count_with_explicit_attention():
    model = vmoe_lib.create_model("vit_test_patch7_28")
    for module in model.modules():  # timm's non-fused path: attention as two visible matmuls
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    assert flops_per_image(model, (1, 28, 28)) == VIT_TEST_FLOPS


def test_model_costs_match_the_hand_count():
    costs = model_costs(vmoe_lib.create_model("vit_test_patch7_28"), (1, 1, 28, 28))
    assert costs["flops_per_image"] == pytest.approx(VIT_TEST_FLOPS, rel=0.01)


@pytest.mark.parametrize("name, shape", [("vit_test_patch7_28", (1, 28, 28)), ("convnext_test_32", (1, 32, 32))])
def test_model_costs_are_positive_and_leave_the_model_as_it_was(name, shape):
    model = vmoe_lib.create_model(name)
    model.train()
    rng_before = torch.get_rng_state()
    costs = model_costs(model, (1, *shape))
    assert costs["params_total"] == costs["params_activated"] == sum(p.numel() for p in model.parameters()) > 0
    assert costs["flops_per_image"] > 0
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    # Per image: a batch of 8 counts the same as a batch of 2.
    assert flops_per_image(model, shape, batch_size=2) == costs["flops_per_image"]


def test_activated_parameters_come_from_the_layers():
    class Sparse(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.Linear(10, 10)  # 110 parameters, of which 30 are used per token

        def activated_parameters(self):
            return 30

    model = nn.Sequential(nn.Linear(4, 10), Sparse())  # 50 + 110
    assert count_parameters(model) == {"total": 160, "activated": 80}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizers_use_the_fused_kernel_and_the_record_says_so(optimizer):
    import timm

    from vmoe_lib.train import make_optimizer, optimizer_impl

    model = timm.create_model("vit_test_patch7_28")
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer))
    assert optimizer_impl(opt) == "fused"  # this torch has fused AdamW/Adam/SGD on the CPU
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_the_record_names_the_optimizer_implementation(reference):
    assert reference[0]["optimizer_impl"] == "fused"


def test_record_stores_the_final_models_per_image_predictions(reference):
    from vmoe_lib.predictions import unpack_predictions

    record, _ = reference
    stored = record["predictions"]
    preds = unpack_predictions(stored)
    assert len(preds) == 100  # eval_subset of the test split
    # the stored correctness reproduces the final test accuracy exactly, and p_true is a probability
    assert preds.accuracy == pytest.approx(record["final"]["test_accuracy"])
    assert ((preds.p_true >= 0) & (preds.p_true <= 1)).all()
    assert record["moe_bypass"] is None  # a dense model has nothing to bypass


def test_moe_record_stores_the_bypass_control():
    from vmoe_lib.predictions import unpack_bits

    config = TrainConfig(**{**TINY, "model": "vmoe_vit_test_patch7_28", "epochs": 1,
                            "model_kwargs": {"num_experts": 4, "k": 1, "moe_layers": "all"}})
    record = train_model(config, 0, device="cpu", progress=False)
    bypass = record["moe_bypass"]
    assert 0.0 <= bypass["accuracy"] <= 1.0
    assert unpack_bits(bypass["correct"]).mean() == pytest.approx(bypass["accuracy"])
