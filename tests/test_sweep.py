"""The sweep engine: parallel workers, locks, storage checks, corrupt files, divergence, seeds, overrides, CLI.

Runs are the tiny ViT of the foundation tests (one step per epoch on synthetic Fashion-MNIST), so a run
takes about a second; a worker process adds a few seconds of imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from helpers_foundation import REPO_ROOT, TIMING_KEYS
from vmoe_lib import train as vtrain
from vmoe_lib.chapters import base as chapter_base
from vmoe_lib.chapters.base import Preset, apply_overrides, parse_overrides, parse_seeds
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import load_or_run, read_valid_result
from vmoe_lib.sweep import SweepError, check_storage, resolve_workers
from vmoe_lib.train import TrainConfig

TINY = TrainConfig(model="vit_test_patch7_28", val_size=100, train_subset=64, eval_subset=50, epochs=1, batch_size=64,
                   eval_batch_size=100)
RUNS = {"a": TINY, "b": TINY.replace(lr=1e-3)}
CHAPTER, PRESET = "toy_sweep", "smoke"


# Shared fixtures (tests/conftest.py): one torch thread, and data/results/cache in test folders.
SYNTHETIC_IMAGES = (300, 60)  # synthetic Fashion-MNIST: training, test images
pytestmark = pytest.mark.usefixtures("one_torch_thread", "hermetic_data")


def _outcome(result) -> dict:
    """A record without its timings: what must be identical between two runs of the same (config, seed)."""
    record = json.loads(json.dumps(result.record))
    for epoch in record["history"]:
        for key in TIMING_KEYS:
            epoch.pop(key)
    record.pop("wall_time_s")
    return record


# ----------------------------------------------------------------------------- parallel workers
@pytest.mark.slow
def test_two_workers_give_the_numbers_of_one_worker(tmp_path, monkeypatch):
    """A run's numbers depend on (config, seed, threads, numerics), never on which worker ran it or when."""
    runs = {"a": TINY, "b": TINY.replace(lr=1e-3), "c": TINY.replace(weight_decay=0.0)}
    parallel = load_or_run(CHAPTER, PRESET, runs, [0, 1], executor="local", workers=2, progress=False)
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path / "again"))
    # Other order, so other runs land on other workers; the runs are the same.
    single = load_or_run(CHAPTER, PRESET, dict(reversed(runs.items())), [1, 0], executor="local", workers=2, progress=False)
    by_key = {(r.name, r.seed): r for r in single}
    for r in parallel:
        assert _outcome(r) == _outcome(by_key[(r.name, r.seed)])
        assert r.manifest["numerics"]["pinned"] is True
        assert r.manifest["hardware"]["torch_threads"] == 1
        assert "avx2" in r.manifest["hardware"]["cpu"]["dispatch_flags"] or not r.manifest["hardware"]["cpu"]["avx2"]
        assert r.manifest["numerics"]["cpu_capability"] == "AVX2"


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_are_stored(tmp_path):
    # Valid for Fashion-MNIST's 55,000 training images, too big for the 200 of this synthetic copy: fails in the worker.
    runs = {"ok": TINY, "too_big": TINY.replace(train_subset=None, batch_size=256), "ok2": TINY.replace(lr=1e-3)}
    with pytest.raises(SweepError) as info:
        load_or_run(CHAPTER, PRESET, runs, [0], executor="local", workers=2, progress=False)
    message = str(info.value)
    assert "1 of 3 run(s) failed; the other 2 are stored" in message and "too_big seed 0" in message
    assert "batch_size=256" in message and "log: " in message
    [failure] = info.value.failures
    assert Path(failure.log).is_file() and "batch_size=256" in Path(failure.log).read_text()
    assert not list((tmp_path / "results").rglob(".too_big*.lock"))  # the failed run leaves no lock behind
    stored = sorted(p.name.split("__")[0] for p in (tmp_path / "results" / PRESET / CHAPTER).glob("*.json"))
    assert stored == ["ok", "ok2"]


# ----------------------------------------------------------------------------- concurrency
_CONCURRENT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from vmoe_lib import train as vtrain
    from vmoe_lib.results import load_or_run
    from vmoe_lib.train import TrainConfig
    real = vtrain.train_model
    def counting(config, seed, **kw):
        with open(os.environ["TRAINED_LOG"], "a") as f:
            f.write(f"{kw.get('run_label')}\\n")
        return real(config, seed, **kw)
    vtrain.train_model = counting
    tiny = TrainConfig(model="vit_test_patch7_28", val_size=100, train_subset=64, eval_subset=50, epochs=1,
                       batch_size=64, eval_batch_size=100)
    runs = {"a": tiny, "b": tiny.replace(lr=1e-3), "c": tiny.replace(weight_decay=0.0)}
    out = load_or_run("toy_sweep", "smoke", runs, [0, 1], executor="inline", progress=False)
    print(json.dumps({f"{r.name}:{r.seed}": r.final for r in out}))
""")


@pytest.mark.slow
def test_two_concurrent_sweeps_train_each_run_once_and_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINED_LOG": str(tmp_path / "trained.txt"),
           "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    trained = (tmp_path / "trained.txt").read_text().split("\n")[:-1]
    assert len(trained) == 6 == len(set(trained))  # every run trained exactly once, by one of the two sweeps
    assert first == second and len(first) == 6
    # The same as one sweep alone.
    env_single = {**env, "VMOE_RESULTS_DIR": str(tmp_path / "single"), "VMOE_CACHE_DIR": str(tmp_path / "cache1"),
                  "TRAINED_LOG": str(tmp_path / "trained1.txt")}
    alone = subprocess.run([sys.executable, "-c", _CONCURRENT], env=env_single, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout.strip().splitlines()[-1]) == first
    assert not list((tmp_path / "results").rglob("*.tmp"))


def test_a_run_locked_by_another_sweep_is_not_trained_twice(tmp_path):
    from filelock import FileLock

    from vmoe_lib.sweep import RunTask, execute_task

    path = tmp_path / "results" / "r.json"
    task = RunTask(CHAPTER, PRESET, "a", 0, TINY, "k", path, tmp_path / "cache")
    with FileLock(str(task.lock_path)):
        assert execute_task(task).status == "busy"
    assert not path.exists()


# ----------------------------------------------------------------------------- storage and corrupt files
def test_storage_checks_name_the_folder_and_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"results folder .*a_file/results.* is not writable.*VMOE_RESULTS_DIR"):
        check_storage(blocker / "results", tmp_path / "cache", [TINY], 1)
    with pytest.raises(ConfigError, match=r"cache \(checkpoints\) folder .*a_file.* is not writable.*VMOE_CACHE_DIR"):
        check_storage(tmp_path / "ok", blocker / "cache", [TINY], 1)
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1024))
    with pytest.raises(ConfigError, match=r"has 0 MiB free but the sweep needs about \d+ MiB.*VMOE_CACHE_DIR|VMOE_RESULTS_DIR"):
        check_storage(tmp_path / "ok", tmp_path / "cache", [TINY], 2)


@pytest.mark.parametrize("executor, workers, expected", [("local", 1, 1), ("local", 2, 2), ("inline", 1, 1),
                                                        ("torchrun", 2, 1), ("slurm", 1, 5)])
def test_the_storage_check_counts_the_checkpoints_written_at_once(tmp_path, monkeypatch, executor, workers, expected):
    """Five missing runs: one checkpoint per local worker at a time (not five), all five under SLURM."""
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    seen = []

    def stop(folder, cache, configs, concurrent):
        seen.append(concurrent)
        raise ConfigError("stop here")

    monkeypatch.setattr("vmoe_lib.results.check_storage", stop)
    with pytest.raises(ConfigError, match="stop here"):
        load_or_run("toy_storage", "smoke", {"a": TINY}, [0, 1, 2, 3, 4], progress=False, executor=executor,
                    workers=workers)
    assert seen == [expected]


def test_an_unwritable_results_folder_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(blocker))
    calls = []
    monkeypatch.setattr(vtrain, "train_model", lambda *a, **k: calls.append(1))
    with pytest.raises(ConfigError, match="VMOE_RESULTS_DIR"):
        load_or_run(CHAPTER, PRESET, RUNS, [0], progress=False)
    assert not calls


@pytest.mark.parametrize("corrupt", [
    lambda p: p["record"]["final"].update(test_accuracy="0.9"),  # a string accuracy
    lambda p: p["record"].update(history={"epoch": 1}),  # a dict history
    lambda p: p["record"].pop("final"),  # a missing field
    lambda p: p["manifest"].update(seed="0"),  # a wrong type in the manifest
    lambda p: p["record"]["final"].update(test_accuracy=float("nan")),
], ids=["string-accuracy", "dict-history", "missing-final", "string-seed", "nan-accuracy"])
def test_a_result_with_wrong_fields_is_reported_and_rerun(tmp_path, corrupt):
    [first] = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], progress=False)
    payload = json.loads(first.path.read_text())
    corrupt(payload)
    first.path.write_text(json.dumps(payload))
    assert read_valid_result(first.path, first.manifest["config_hash"], 0, quiet=True) is None
    with pytest.warns(UserWarning, match=r"ignoring corrupt result file .*a__.*s0\.json"):
        [again] = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], progress=False)
    assert _outcome(again) == _outcome(first)


def test_a_truncated_result_file_is_rerun(tmp_path):
    [first] = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], progress=False)
    first.path.write_text(first.path.read_text()[:200])
    with pytest.warns(UserWarning, match="unreadable"):
        [again] = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], progress=False)
    assert _outcome(again) == _outcome(first)


def test_a_corrupt_checkpoint_is_moved_aside_and_the_run_restarts(tmp_path):
    config = TINY.replace(epochs=2)
    clean = vtrain.train_model(config, 0, device="cpu", progress=False)
    ckpt = tmp_path / "ck" / "run.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.warns(UserWarning, match=r"checkpoint .*run\.pt is corrupt .*moved aside.*restarts from scratch"):
        record = vtrain.train_model(config, 0, device="cpu", checkpoint_path=ckpt, progress=False)
    assert record["final"] == clean["final"]
    assert len(list(ckpt.parent.glob("run.pt.corrupt-*"))) == 1


# ----------------------------------------------------------------------------- divergence
def test_a_diverged_run_stops_names_the_step_and_is_never_stored(tmp_path, monkeypatch):
    import torch

    real = vtrain.F.cross_entropy
    calls = []

    def exploding(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            calls.append(1)
        return out * float("nan") if torch.is_grad_enabled() and len(calls) == 2 else out

    monkeypatch.setattr(vtrain.F, "cross_entropy", exploding)
    with pytest.raises(SweepError) as info:
        load_or_run(CHAPTER, PRESET, {"a": TINY.replace(epochs=3)}, [0], progress=False)
    message = str(info.value)
    assert "diverged" in message and "run a seed 0" in message and "at step 2" in message
    assert "last finite loss: 2." in message
    assert not list((tmp_path / "results").rglob("a__*.json"))


# ----------------------------------------------------------------------------- seeds, overrides, workers
@pytest.mark.parametrize("given, expected", [
    (None, None), ([0, 1], [0, 1]), ((2,), [2]), (3, [3]), ("0,1,2", [0, 1, 2]), ("[0, 1]", [0, 1]), ("4 5", [4, 5]),
    ("None", None),
])
def test_seeds_arrive_as_lists_ints_or_strings(given, expected):
    assert parse_seeds(given) == expected


@pytest.mark.parametrize("given, message", [
    ([], r"seeds=\[\] is empty"), ("", "seeds='' is empty"), ([0, 0], r"duplicate seed\(s\) \[0\]"),
    ("0,0", r"duplicate seed"), ("a,b", "seeds='a,b' is invalid"), ([0.5], "is invalid"), ([-1], ">= 0"),
    ([True], "is invalid"),
])
def test_bad_seeds_are_rejected(given, message):
    with pytest.raises(ConfigError, match=message):
        parse_seeds(given)


def test_overrides_arrive_as_dicts_or_json_strings():
    assert parse_overrides('{"epochs": 2}') == {"epochs": 2}
    assert parse_overrides({}) is None and parse_overrides("") is None and parse_overrides(None) is None
    with pytest.raises(ConfigError, match=r"overrides='\{epochs: 2\}' is not valid JSON.*-y 'overrides: \{epochs: 2\}'"):
        parse_overrides("{epochs: 2}")
    with pytest.raises(ConfigError, match=r"overrides=\[1\] is invalid"):
        parse_overrides("[1]")


def test_nested_overrides_merge_and_must_keep_runs_distinct():
    configs = {
        "tc": TINY.replace(model="vmoe_vit_test_patch7_28", model_kwargs={"router": "softmax_token_choice", "num_experts": 4}),
        "ec": TINY.replace(model="vmoe_vit_test_patch7_28", model_kwargs={"router": "softmax_expert_choice", "num_experts": 4}),
    }
    out = apply_overrides(configs, {"model_kwargs": {"num_experts": 2}, "epochs": 2})
    assert out["tc"].model_kwargs == {"router": "softmax_token_choice", "num_experts": 2}
    assert out["ec"].model_kwargs == {"router": "softmax_expert_choice", "num_experts": 2} and out["ec"].epochs == 2
    with pytest.raises(ConfigError, match=r"make runs 'tc' and 'ec' the same experiment"):
        apply_overrides(configs, {"model_kwargs": {"router": "softmax_token_choice"}})


@pytest.mark.parametrize("workers", [0, -1, "many", 1.5, True])
def test_bad_workers_are_rejected(workers):
    with pytest.raises(ConfigError, match=rf"workers={workers!r} is invalid"):
        resolve_workers(workers)


def test_auto_workers_use_one_thread_per_core_on_cpu():
    assert resolve_workers("auto", "cpu") == (os.cpu_count(), 1)
    assert resolve_workers(1, "cpu") == (1, os.cpu_count())
    assert resolve_workers("2", "cpu")[0] == 2


PRESETS = {"smoke": Preset("smoke", "tiny", "any CPU", 0.1, seeds=(0, 1))}


def _toy(name: str = CHAPTER, configs=None):
    from helpers_foundation import toy_chapter

    return toy_chapter(name, configs or {"a": TINY}, PRESETS)


def test_verdicts_of_record_only_from_the_presets_own_seeds(tmp_path):
    toy = _toy()
    full = toy.run("smoke", seeds=[1, 0], executor="inline", progress=False)
    assert full.of_record and full.verdicts_path() == tmp_path / "results" / "smoke" / CHAPTER / "verdicts.json"
    subset = toy.run("smoke", seeds="0", executor="inline", progress=False)
    extra = toy.run("smoke", seeds=[0, 1, 2], executor="inline", progress=False)
    for results in (subset, extra):
        assert not results.of_record
        assert results.verdicts_path() == tmp_path / "results" / "custom" / CHAPTER / "verdicts.json"
    with pytest.raises(ConfigError, match="duplicate seed"):
        toy.run("smoke", seeds=[0, 0], executor="inline", progress=False)


def test_runs_of_different_seed_counts_train_from_one_queue(tmp_path, monkeypatch):
    """Per-run seed lists go to the executor as one list of tasks (no group waits for another)."""
    from vmoe_lib import sweep

    calls = []
    real = sweep.run_tasks

    def spy(tasks, **kwargs):
        calls.append([(t.name, t.seed) for t in tasks])
        return real(tasks, **kwargs)

    monkeypatch.setattr("vmoe_lib.results.run_tasks", spy)
    out = load_or_run(CHAPTER, PRESET, {"a": TINY, "b": TINY.replace(lr=1e-3)}, {"a": [0, 1], "b": [0]}, progress=False)
    assert calls == [[("a", 0), ("a", 1), ("b", 0)]]
    assert [(r.name, r.seed) for r in out] == [("a", 0), ("a", 1), ("b", 0)]
    with pytest.raises(ConfigError, match=r"runs without seeds \['b'\]"):
        load_or_run(CHAPTER, PRESET, {"a": TINY, "b": TINY.replace(lr=1e-3)}, {"a": [0]}, progress=False)


def test_chapter_verdicts_of_a_seed_subset_never_touch_the_record(tmp_path, monkeypatch):
    """A chapter's ``verdicts`` writes where its results say: a subset of seeds goes to results/custom."""
    from vmoe_lib.chapters import dense_baselines

    record = tmp_path / "results" / "smoke" / dense_baselines.NAME / "verdicts.json"
    results = chapter_base.ChapterResults(dense_baselines.NAME, "smoke", [], of_record=False)
    assert results.verdicts_path() != record and "custom" in str(results.verdicts_path())


# ----------------------------------------------------------------------------- CLI
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmoe_lib", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=REPO_ROOT)


@pytest.mark.parametrize("args, message", [
    (["run", "dense_baselines", "--preset", "huge"], "error: preset='huge' is not recognised; allowed values: 'smoke', 'cpu', 'gpu'"),
    (["run", "dense_baselines", "--overrides", "{epochs: 2}"], "error: --overrides '{epochs: 2}' is not valid JSON"),
    (["run", "dense_baselines", "--seeds", "0", "0"], "error: seeds=[0, 0] has duplicate seed(s) [0]"),
    (["run", "dense_baselines", "--workers", "0"], "error: workers='0' is invalid"),
])
def test_cli_config_errors_are_one_line_and_exit_2(args, message):
    out = _cli(*args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == message or out.stderr.strip().startswith(message), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- SLURM through submitit (local backend)
@pytest.mark.slow
def test_submitit_local_executor_runs_the_missing_runs_as_jobs(tmp_path):
    pytest.importorskip("submitit")
    runs = {"a": TINY, "b": TINY.replace(lr=1e-3)}
    options = {"cluster": "local", "folder": str(tmp_path / "jobs"), "cpus_per_job": 1, "time": 10}
    first = load_or_run(CHAPTER, PRESET, runs, [0], executor="slurm", slurm=options, progress=False)
    assert [r.name for r in first] == ["a", "b"] and all(r.manifest["numerics"]["pinned"] for r in first)
    # Rerunning after a result went missing submits only what is missing.
    first[1].path.unlink()
    again = load_or_run(CHAPTER, PRESET, runs, [0], executor="slurm", slurm=options, progress=False)
    assert _outcome(again[1]) == _outcome(first[1]) and again[0].path.stat().st_mtime == first[0].path.stat().st_mtime
    assert len(list((tmp_path / "jobs").glob("*_result.pkl"))) == 3  # 2 jobs, then 1


# ----------------------------------------------------------------------------- verify
@pytest.mark.slow
def test_verify_reruns_a_record_and_reports_identical_or_the_differences(tmp_path, monkeypatch):
    from vmoe_lib import chapters
    from vmoe_lib.verify import verify_chapter

    monkeypatch.setitem(chapters.CHAPTERS, "toy_verify", _toy("toy_verify"))
    recorded = load_or_run("toy_verify", "smoke", {"a": TINY}, [0, 1], executor="local", workers=1, progress=False)
    [check] = verify_chapter("toy_verify", "smoke", sample=1, seed=0, progress=False)
    assert check.identical and check.compared > 10 and check.settings == {"threads": os.cpu_count(), "pinned": True}
    # A record that does not match what the code computes is caught, field by field, in seed sds.
    path = check.path
    payload = json.loads(path.read_text())
    payload["record"]["final"]["test_accuracy"] += 0.01
    path.write_text(json.dumps(payload))
    [check] = verify_chapter("toy_verify", "smoke", sample=1, seed=0, progress=False)
    assert not check.identical
    [diff] = [d for d in check.differences if d.field == "final.test_accuracy"]
    assert diff.rerun == pytest.approx(diff.recorded - 0.01) and diff.seed_sd is not None
    assert "seed sd" in diff.describe() or diff.seed_sd == 0
    with pytest.raises(ConfigError, match="sample=3 is larger than the 2 recorded runs"):
        verify_chapter("toy_verify", "smoke", sample=3)
    assert len(recorded) == 2


def test_verify_lists_the_final_metrics_first():
    from vmoe_lib.verify import compare_records

    recorded = {"extra": {"a": 1.0}, "history": [{"val_accuracy": 0.5}], "final": {"test_accuracy": 0.8}, "costs": {"flops": 2}}
    rerun = {"extra": {"a": 2.0}, "history": [{"val_accuracy": 0.6}], "final": {"test_accuracy": 0.7}, "costs": {"flops": 3}}
    n, diffs = compare_records(recorded, rerun, {"final.test_accuracy": 0.05})
    assert n == 4 and [d.field for d in diffs] == ["final.test_accuracy", "history[0].val_accuracy", "costs.flops", "extra.a"]
    assert diffs[0].in_seed_sd == pytest.approx(2.0)


def test_verify_does_not_count_fields_newer_than_the_record():
    """A measurement added to the code after a record was made is listed, not reported as a difference; a field
    the rerun no longer produces is a difference."""
    from vmoe_lib.verify import compare_records, new_fields

    recorded = {"final": {"test_accuracy": 0.8}, "extra": {"routing": {"l0": {"load": 0.5}}}}
    rerun = {"final": {"test_accuracy": 0.8}, "extra": {"routing": {"l0": {"load": 0.5, "gate_entropy": 1.9}}}}
    assert compare_records(recorded, rerun) == (2, [])
    assert new_fields(recorded, rerun) == ["extra.routing.l0.gate_entropy"]
    n, diffs = compare_records(rerun, recorded)
    assert n == 3 and [d.field for d in diffs] == ["extra.routing.l0.gate_entropy"]
