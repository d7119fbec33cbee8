"""Data-parallel training (issue #14): N gloo processes train the 1-process run, and resume after a kill.

Tolerance, measured on this machine (float32, 2 ranks vs 1, 2 epochs of 4 steps): losses agree to about
1e-7 relative and accuracies exactly; parameters to about 4e-5 absolute after AdamW's steps (the
gradient all-reduce sums in another order, and Adam's normalised step magnifies the last bits). The
tests allow 1e-5 relative on losses, 1e-6 absolute on accuracies and 2e-4 on parameters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from distributed_helpers import spawn_gloo
from helpers_foundation import REPO_ROOT, TIMING_KEYS
from vmoe_lib.distributed import DistributedContext, global_randn, init_from_env, wrap_model
from vmoe_lib.distributed.data_parallel import data_parallel_noise
from vmoe_lib.errors import ConfigError
from vmoe_lib.train import TrainConfig, train_model

# An MoE ViT with router noise on (it is drawn for the global batch on every rank), groups of 4 images:
# 256 images, global batch 32 (16 per rank, 4 groups each), 8 steps per epoch.
CONFIG = dict(
    model="vmoe_vit_test_patch7_28", model_kwargs={"group_size": 4, "router_options": {"noise_std": 1.0}},
    val_size=100, train_subset=256, eval_subset=100, epochs=2, batch_size=32, eval_batch_size=50,
)
LOSS_RTOL, ACCURACY_ATOL, PARAM_ATOL = 1e-5, 1e-6, 2e-4


# Shared fixtures (tests/conftest.py): one torch thread, and data/results/cache in test folders.
SYNTHETIC_IMAGES = (800, 200)  # synthetic Fashion-MNIST: training, test images
pytestmark = pytest.mark.usefixtures("one_torch_thread", "hermetic_data")


def _train_rank(rank: int, world_size: int, config: dict, strategy: str, weights: str) -> dict | None:
    context = DistributedContext.from_process_group(strategy)
    return train_model(TrainConfig(**config), 0, device="cpu", progress=False, distributed=context, weights_path=weights)


def _outcome(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def _assert_close_histories(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if key in TIMING_KEYS:
                continue
            if key.endswith("accuracy"):
                assert a[key] == pytest.approx(b[key], abs=ACCURACY_ATOL), key
            else:
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL, abs=1e-12), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "ep"])
def test_two_ranks_train_the_one_process_run(tmp_path, strategy):
    from safetensors.torch import load_file

    one = train_model(TrainConfig(**CONFIG), 0, device="cpu", progress=False, weights_path=tmp_path / "one.safetensors")
    records = spawn_gloo(_train_rank, 2, CONFIG, strategy, str(tmp_path / "two.safetensors"))
    assert records[1] is None  # rank 0 writes the record
    two = records[0]
    assert two["distributed"] == {"rank": 0, "world_size": 2, "backend": "gloo", "strategy": strategy}
    _assert_close_histories(two["history"], one["history"])
    assert two["moe_bypass"]["accuracy"] == pytest.approx(one["moe_bypass"]["accuracy"], abs=ACCURACY_ATOL)
    assert two["costs"] == one["costs"]
    w1, w2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < PARAM_ATOL
    assert worst > 0 or strategy != "ddp"  # sanity: the two runs were really different computations


def _noise_rank(rank: int, world_size: int) -> torch.Tensor:
    torch.manual_seed(3)
    with data_parallel_noise(DistributedContext.from_process_group()):
        return global_randn((2, 5))


def test_router_noise_is_the_global_batchs_share():
    torch.manual_seed(3)
    whole = torch.randn(4, 5)
    shares = spawn_gloo(_noise_rank, 2)
    assert torch.equal(torch.cat(shares), whole)


def _torchrun(config: dict, out, *extra: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vmoe_lib.train", json.dumps(config), "--seed", "0", "--device", "cpu", "--out", str(out),
           "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "vmoe_lib.train" in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "ep"])
def test_sigkill_of_one_rank_then_relaunch_resumes(tmp_path, strategy):
    # 2 epochs x 20 steps, a checkpoint every 3 steps and at each epoch end; rank 1 is killed after one.
    config = {**CONFIG, "train_subset": 640}
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    ckpt, out = tmp_path / "ck.pt", tmp_path / "a.json"
    resumable = ("--checkpoint", str(ckpt), "--checkpoint-every-steps", "3", "--strategy", strategy)
    victim = _torchrun(config, out, *resumable, env=env)
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert victim.poll() is None, f"the run ended before its first checkpoint: {victim.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    ranks = _ranks_of(victim)
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    victim_rank = next(p for p in ranks if p.environ().get("RANK") == "1")
    victim_rank.send_signal(signal.SIGKILL)
    victim.communicate(timeout=120)
    assert victim.returncode != 0 and not out.exists()  # torchrun stopped the job: one rank died
    state = torch.load(ckpt, weights_only=False)["state"]
    assert state["epoch"] * 20 + state["step"] < 40  # killed part-way

    uninterrupted = spawn_gloo(_train_rank, 2, config, strategy, str(tmp_path / "u.safetensors"))[0]

    again = _torchrun(config, out, *resumable, env=env)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    resumed = json.loads(out.read_text())
    assert resumed["distributed"] == {"rank": 0, "world_size": 2, "backend": "gloo", "strategy": strategy}
    assert _outcome(resumed["history"]) == _outcome(uninterrupted["history"])  # bit for bit
    assert resumed["final"] == uninterrupted["final"]


# ----------------------------------------------------------------------------- bad input
def test_global_batch_must_divide_by_the_ranks():
    context = DistributedContext(rank=0, world_size=3)
    with pytest.raises(ConfigError, match=r"batch_size=32 is invalid on 3 processes"):
        context.check_batch("batch_size", 32)
    with pytest.raises(ConfigError, match=r"batch_size=24 gives 12 images per process, not a multiple of the MoE "
                                          r"routing group size 8"):
        DistributedContext(rank=1, world_size=2).check_batch("batch_size", 24, group_size=8)
    assert context.check_batch("batch_size", 48, group_size=8) == 16


def test_bad_context_settings_are_named():
    with pytest.raises(ConfigError, match=r"strategy='zero3' is not recognised; allowed values: 'ddp', 'fsdp2'"):
        DistributedContext(rank=0, world_size=2, strategy="zero3")
    with pytest.raises(ConfigError, match=r"rank=2 is invalid for world_size=2"):
        DistributedContext(rank=2, world_size=2)


def test_init_from_env_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N -m vmoe_lib.train"):
        init_from_env(torch.device("cpu"))


def _uneven_rank(rank: int, world_size: int, data_dir: str) -> str:
    os.environ["VMOE_DATA_DIR"] = data_dir
    try:
        train_model(TrainConfig(**{**CONFIG, "batch_size": 20}), 0, device="cpu", progress=False,
                    distributed=DistributedContext.from_process_group())
    except ConfigError as err:
        return str(err)
    return "no error"


@pytest.mark.slow
def test_a_rank_share_of_partial_routing_groups_is_refused_before_training(data_dir):
    messages = spawn_gloo(_uneven_rank, 2, str(data_dir))
    assert all("batch_size=20 gives 10 images per process, not a multiple of the MoE routing group size 4" in m for m in messages), messages


# ----------------------------------------------------------------------------- the sweep engine's torchrun executor
@pytest.mark.slow
def test_torchrun_executor_trains_each_missing_run_on_two_processes_and_verify_reruns_it_so(tmp_path, monkeypatch):
    from vmoe_lib.results import load_or_run

    runs = {"a": TrainConfig(**{**CONFIG, "epochs": 1})}
    first = load_or_run("toy_sweep", "smoke", runs, [0], executor="torchrun", workers=2, progress=False)
    record = first[0].record
    assert record["distributed"] == {"rank": 0, "world_size": 2, "backend": "gloo", "strategy": "ddp"}
    one = train_model(TrainConfig(**{**CONFIG, "epochs": 1}), 0, device="cpu", progress=False)
    _assert_close_histories(record["history"], one["history"])
    again = load_or_run("toy_sweep", "smoke", runs, [0], executor="torchrun", workers=2, progress=False)
    assert again[0].path.stat().st_mtime == first[0].path.stat().st_mtime  # present: not trained again

    # verify reruns it on 2 processes too, and gets it bit for bit.
    from helpers_foundation import toy_chapter
    from vmoe_lib import chapters
    from vmoe_lib.chapters.base import Preset
    from vmoe_lib.verify import verify_chapter

    toy = toy_chapter("toy_sweep", runs, {"smoke": Preset("smoke", "toy", "CPU", 1.0, (0,))})
    monkeypatch.setitem(chapters.CHAPTERS, "toy_sweep", toy)
    [check] = verify_chapter("toy_sweep", "smoke", sample=1, progress=False)
    assert check.identical and check.compared > 10, [d.describe() for d in check.differences]


def test_cli_distributed_with_a_batch_the_processes_cannot_share_fails_before_training():
    # routers_bpr's smoke runs use a global batch of 128 with groups of 8 images: 3 processes cannot share it.
    out = subprocess.run([sys.executable, "-m", "vmoe_lib", "run", "routers_bpr", "--preset", "smoke", "--distributed", "3",
                          "--seeds", "0"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot train on 3 data-parallel processes: batch_size=" in out.stderr
    assert "is invalid on 3 processes" in out.stderr and "Traceback" not in out.stderr


def test_cli_distributed_with_another_executor_is_refused():
    out = subprocess.run([sys.executable, "-m", "vmoe_lib", "run", "dense_baselines", "--distributed", "2",
                          "--executor", "slurm"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: --distributed 2 is invalid with --executor slurm")
