"""Results of record: keys (config hash), reuse, reruns of bad files, require mode."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

import vmoe_lib as vl
from vmoe_lib import results as vresults
from vmoe_lib import train as vtrain
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import MissingResultError, RunResult, config_hash, load_or_run
from vmoe_lib.train import TrainConfig

# One training step per epoch: 64 images, batch 64; 50 val/test images.
TINY = TrainConfig(
    model="vit_test_patch7_28", val_size=100, train_subset=64, eval_subset=50,
    epochs=1, batch_size=64, eval_batch_size=100,
)
CHAPTER, PRESET = "toy_chapter", "smoke"


# Shared fixtures (tests/conftest.py): one torch thread, and data/results/cache in test folders.
SYNTHETIC_IMAGES = (300, 60)  # synthetic Fashion-MNIST: training, test images
pytestmark = pytest.mark.usefixtures("one_torch_thread", "hermetic_data")


@pytest.fixture
def trained(monkeypatch):
    """Wrap the real ``train_model`` seen by ``load_or_run``; the list records each (config, seed) trained."""
    calls = []
    real = vtrain.train_model

    def counting(config, seed, **kwargs):
        calls.append((config, seed))
        return real(config, seed, **kwargs)

    monkeypatch.setattr(vtrain, "train_model", counting)
    return calls


def _folder(tmp_path):
    return tmp_path / "results" / PRESET / CHAPTER


def _files(tmp_path):
    return sorted(p.name for p in _folder(tmp_path).glob("*.json"))


# ---------------------------------------------------------------------------
# config_hash


def test_config_hash_golden_format():
    # The key is sha256 of compact, key-sorted JSON of the non-None fields, cut to 12 hex digits.
    # Pinned so that results of record keep their keys across refactorings.
    text = '{"lr":0.1,"model":"m"}'
    assert config_hash({"model": "m", "lr": 0.1, "train_subset": None}) == hashlib.sha256(text.encode()).hexdigest()[:12]
    text = '{"config":{"model":"m"},"extra":{"grid":[1,2]}}'
    assert config_hash({"model": "m"}, {"grid": (1, 2)}) == hashlib.sha256(text.encode()).hexdigest()[:12]


def test_config_hash_is_stable_and_sensitive():
    key = config_hash(TINY)
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    assert config_hash(TrainConfig.from_dict(TINY.to_dict())) == key == config_hash(TINY.to_dict())
    assert config_hash(json.loads(json.dumps(TINY.to_dict()))) == key  # as read back from a manifest
    changed = {config_hash(TINY.replace(**{field: value})) for field, value in [
        ("lr", 1e-3), ("epochs", 2), ("model", "vit_pico_patch7_28"), ("augment", False),
        ("train_subset", 128), ("eval_subset", None), ("model_kwargs", {"drop_rate": 0.1}),
    ]}
    assert key not in changed and len(changed) == 7
    assert config_hash(TINY, {"grid": [1, 2]}) != key != config_hash(TINY, {"grid": [1, 3]})
    assert config_hash(TINY, {}) == key  # an empty extra is no extra


def test_config_hash_ignores_none_fields():
    # A field added later with default None ("feature off") keeps every existing key.
    key = config_hash(TINY)
    assert config_hash({**TINY.to_dict(), "future_option": None}) == key
    assert TINY.image_size is None and config_hash({k: v for k, v in TINY.to_dict().items() if k != "image_size"}) == key
    assert config_hash({**TINY.to_dict(), "future_option": 0}) != key


# ---------------------------------------------------------------------------
# load_or_run


def test_missing_runs_are_trained_and_written_with_a_manifest(tmp_path, trained):
    runs = {"small": TINY, "other_lr": TINY.replace(lr=1e-3)}
    out = load_or_run(CHAPTER, PRESET, runs, [0, 1], device="cpu", progress=False)
    assert [(r.name, r.seed) for r in out] == [("small", 0), ("small", 1), ("other_lr", 0), ("other_lr", 1)]
    assert [(c, s) for c, s in trained] == [(TINY, 0), (TINY, 1), (runs["other_lr"], 0), (runs["other_lr"], 1)]
    key = config_hash(TINY)
    assert _files(tmp_path) == sorted(
        [f"small__{key}__s0.json", f"small__{key}__s1.json",
         f"other_lr__{config_hash(runs['other_lr'])}__s0.json", f"other_lr__{config_hash(runs['other_lr'])}__s1.json"]
    )
    result = out[1]
    assert isinstance(result, RunResult) and result.path == _folder(tmp_path) / f"small__{key}__s1.json"
    stored = json.loads(result.path.read_text())
    assert stored["record"] == json.loads(json.dumps(result.record))
    manifest = stored["manifest"]
    assert manifest["config"] == TINY.to_dict() and manifest["config_hash"] == key and manifest["seed"] == 1
    assert manifest["format_version"] == vresults.FORMAT_VERSION
    assert (manifest["chapter"], manifest["preset"], manifest["run"]) == (CHAPTER, PRESET, "small")
    assert manifest["wall_time_s"] == result.record["wall_time_s"] > 0
    assert manifest["hardware"]["device"] == "cpu" and manifest["hardware"]["cpu_count"] >= 1
    assert set(manifest["versions"]) >= {"torch", "timm", "vmoe_lib", "python"}
    assert manifest["versions"]["vmoe_lib"] == vl.__version__
    assert "git_sha" in manifest
    assert manifest["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", manifest["git_sha"])
    assert manifest["regenerate"] == f"python -m vmoe_lib run {CHAPTER} --preset {PRESET}"
    assert len(stored["record"]["history"]) == 1 and "test_accuracy" in result.final
    # Checkpoints are removed once a result is written; no weights unless asked.
    assert not list((tmp_path / "cache").rglob("*.pt")) and not list((tmp_path / "cache").rglob("*.safetensors"))
    # Seeds differ in outcome; the two seeds of one config share the key.
    assert out[0].history[0]["train_loss"] != out[1].history[0]["train_loss"]


def test_second_call_reuses_files_without_training(tmp_path, trained):
    first = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    assert len(trained) == 1
    mtime = first[0].path.stat().st_mtime_ns
    again = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    assert len(trained) == 1
    assert again[0].record == json.loads(json.dumps(first[0].record)) and again[0].manifest == first[0].manifest
    assert again[0].path.stat().st_mtime_ns == mtime
    # A new run name for the same config is a new file (the name is part of the file name).
    load_or_run(CHAPTER, PRESET, {"b": TINY}, [0], device="cpu", progress=False)
    assert len(trained) == 2


def test_interrupted_sweep_trains_only_what_is_missing(tmp_path, trained):
    load_or_run(CHAPTER, PRESET, {"a": TINY}, [0, 1], device="cpu", progress=False)
    key = config_hash(TINY)
    (_folder(tmp_path) / f"a__{key}__s1.json").unlink()  # as if killed after the first of two runs
    trained.clear()
    out = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0, 1], device="cpu", progress=False)
    assert trained == [(TINY, 1)]
    assert [r.seed for r in out] == [0, 1] and all(r.path.exists() for r in out)


def test_keep_weights(tmp_path, trained):
    load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False, keep_weights=True)
    weights = list((tmp_path / "cache" / "weights" / PRESET / CHAPTER).glob("*.safetensors"))
    assert [w.name for w in weights] == [f"a__{config_hash(TINY)}__s0.safetensors"]


def _corrupt(path):
    path.write_text('{"manifest": {"format_version": 1, ')  # truncated JSON


def _wrong_config(path):
    payload = json.loads(path.read_text())
    payload["manifest"]["config"]["lr"] = 0.5  # the file claims another config than its key
    path.write_text(json.dumps(payload))


def _wrong_seed(path):
    payload = json.loads(path.read_text())
    payload["manifest"]["seed"] = 7
    path.write_text(json.dumps(payload))


def _empty_history(path):
    payload = json.loads(path.read_text())
    payload["record"]["history"] = []
    path.write_text(json.dumps(payload))


def _not_a_dict(path):
    path.write_text("[1, 2, 3]")


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (_corrupt, "unreadable"),
        (_not_a_dict, "not a {manifest, record} object"),
        (_wrong_config, "stored config does not match its key"),
        (_wrong_seed, "seed 7 != 0"),
        (_empty_history, "empty history"),
    ],
)
def test_bad_files_are_reported_and_rerun(tmp_path, trained, spoil, reason):
    first = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    path = first[0].path
    spoil(path)
    trained.clear()
    with pytest.warns(UserWarning, match=re.escape(reason)) as record:
        out = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    assert any(str(path) in str(w.message) for w in record)
    assert trained == [(TINY, 0)]
    # The rerun rewrote a valid file: a third call neither warns nor trains.
    payload = json.loads(path.read_text())
    assert payload["manifest"]["config"] == TINY.to_dict() and payload["record"] == json.loads(json.dumps(out[0].record))
    trained.clear()
    load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    assert trained == []


def test_hash_extra_enters_the_key_and_the_manifest(tmp_path, trained):
    out = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False, hash_extra={"grid": (1, 2)})
    key = config_hash(TINY, {"grid": (1, 2)})
    assert out[0].path.name == f"a__{key}__s0.json" and key != config_hash(TINY)
    assert out[0].manifest["hash_extra"] == {"grid": [1, 2]}  # as stored: JSON values
    load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False, hash_extra={"grid": (1, 2)})
    assert len(trained) == 1  # read back (tuple -> JSON list) it still matches its key


def test_hash_extra_that_can_be_hashed_can_be_stored(tmp_path, trained):
    import numpy as np

    extra = {"top_k": np.int64(2)}  # e.g. a value taken from a numpy grid
    try:
        load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False, hash_extra=extra)
    except ConfigError:
        assert trained == []  # refusing it up front is fine too
        return
    load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False, hash_extra=extra)
    assert len(trained) == 1 and len(_files(tmp_path)) == 1


# ---------------------------------------------------------------------------
# Require mode


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_require_mode_raises_with_the_regenerate_command(tmp_path, trained, monkeypatch, how):
    kwargs = {"require": True} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("VMOE_REQUIRE_RESULTS", "1")
    with pytest.raises(MissingResultError) as err:
        load_or_run(CHAPTER, PRESET, {"a": TINY}, [0, 1], device="cpu", progress=False, **kwargs)
    message = str(err.value)
    assert f"python -m vmoe_lib run {CHAPTER} --preset {PRESET}" in message
    assert f"a__{config_hash(TINY)}__s0.json" in message and "2 result(s)" in message
    assert trained == [] and not _folder(tmp_path).exists()


def test_require_mode_reads_complete_results(tmp_path, trained, monkeypatch):
    load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    monkeypatch.setenv("VMOE_REQUIRE_RESULTS", "true")
    out = load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    assert len(trained) == 1 and out[0].seed == 0
    # ... and refuses a stale one (a warning, then the error).
    _wrong_config(out[0].path)
    with pytest.warns(UserWarning), pytest.raises(MissingResultError):
        load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False)
    # require=False overrides the environment.
    with pytest.warns(UserWarning):
        load_or_run(CHAPTER, PRESET, {"a": TINY}, [0], device="cpu", progress=False, require=False)
    assert len(trained) == 2


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("", False)])
def test_require_mode_environment_values(monkeypatch, value, expected):
    monkeypatch.setenv("VMOE_REQUIRE_RESULTS", value)
    assert vresults.require_mode() is expected


def test_empty_sweep_is_a_config_error(trained):
    with pytest.raises(ConfigError, match="runs"):
        load_or_run(CHAPTER, PRESET, {}, [0])
    with pytest.raises(ConfigError, match="seeds"):
        load_or_run(CHAPTER, PRESET, {"a": TINY}, [])
    assert trained == []


def test_results_and_cache_roots_follow_the_environment(tmp_path, monkeypatch):
    assert vresults.results_root() == tmp_path / "results"
    assert vresults.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("VMOE_RESULTS_DIR")
    monkeypatch.delenv("VMOE_CACHE_DIR")
    # Without the variables: the checkout's results/ and .cache/vmoe (not created by asking).
    assert vresults.results_root().name == "results" and (vresults.results_root().parent / "vmoe_lib").is_dir()
    assert vresults.cache_root().parts[-2:] == (".cache", "vmoe")
