"""Results of record: one small JSON file per (experiment config, seed), reused when present.

Layout::

    results/<preset>/<chapter>/<run name>__<config hash>__s<seed>.json

The key is the experiment's config (hashed) and the seed; the git sha, library
and torch/timm versions, hardware and wall time go into the file's manifest,
not the key, so a later commit that does not change an experiment keeps its
results valid. Presets ``cpu`` and ``gpu`` are results of record and committed;
``smoke`` results live in ``results/smoke/``, which git ignores, so a smoke run
never overwrites a result of record.

A sweep is a list of runs; :func:`load_or_run` runs only the missing ones, each
with a checkpoint under ``.cache/vmoe/checkpoints`` so that a sweep killed
halfway resumes where it stopped. A file that cannot be read or whose stored
config does not match its key is reported and rerun, never used.

In *require* mode (``VMOE_REQUIRE_RESULTS=1``, set by the book build and CI)
nothing is trained: a missing or stale result raises
:class:`MissingResultError` naming the command that regenerates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import ConfigError
from .train import TrainConfig, train_model

__all__ = [
    "FORMAT_VERSION",
    "MissingResultError",
    "RunResult",
    "config_hash",
    "results_root",
    "load_or_run",
    "regenerate_command",
]

FORMAT_VERSION = 1


class MissingResultError(RuntimeError):
    """A result of record is missing or stale and training is not allowed here."""


@dataclass
class RunResult:
    """One finished run as stored: ``name`` (the run's label in its sweep), its config and seed, the record."""

    name: str
    seed: int
    config: TrainConfig
    record: dict[str, Any]
    manifest: dict[str, Any]
    path: Path

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record["history"]

    @property
    def final(self) -> dict[str, float]:
        return self.record["final"]


def config_hash(config: TrainConfig | Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """Stable 12-hex-digit hash of a config (and of ``extra`` settings that change the outcome)."""
    payload = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    # Fields left at None ("feature off") are not part of the key, so adding a new
    # optional field to TrainConfig later keeps every existing result valid.
    payload = {k: v for k, v in payload.items() if v is not None}
    if extra:
        payload = {"config": payload, "extra": dict(extra)}
    try:
        # No default= here: what is hashed must also be storable in the manifest, exactly.
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ConfigError(f"config/hash_extra must hold only JSON values (str, int, float, bool, None, list, dict): {err}") from err
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _repo_root() -> Path | None:
    """The checkout this package lives in (editable install), or the one around the cwd."""
    for start in (Path(__file__).resolve().parent.parent, Path.cwd()):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "vmoe_lib").is_dir():
                return folder
    return None


def results_root() -> Path:
    """``$VMOE_RESULTS_DIR``, else ``results/`` of the checkout, else ``./results``."""
    if os.environ.get("VMOE_RESULTS_DIR"):
        return Path(os.environ["VMOE_RESULTS_DIR"])
    root = _repo_root()
    return (root / "results") if root is not None else Path.cwd() / "results"


def cache_root() -> Path:
    """Checkpoints and weights: ``$VMOE_CACHE_DIR``, else ``.cache/vmoe`` of the checkout (git-ignored)."""
    if os.environ.get("VMOE_CACHE_DIR"):
        return Path(os.environ["VMOE_CACHE_DIR"])
    root = _repo_root()
    return (root if root is not None else Path.cwd()) / ".cache" / "vmoe"


def regenerate_command(chapter: str, preset: str) -> str:
    """The shell command that (re)creates a chapter's results for a preset."""
    return f"python -m vmoe_lib run {chapter} --preset {preset}"


def _git_sha() -> str | None:
    root = _repo_root()
    if root is None:
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "vmoe_lib"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _versions() -> dict[str, str]:
    import timm

    return {
        "vmoe_lib": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _read_valid(path: Path, key: str, config: TrainConfig, seed: int) -> dict[str, Any] | None:
    """The stored payload if ``path`` holds a complete result for exactly (config, seed); else ``None`` with a warning."""
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        manifest = payload["manifest"]
        problems = []
        if manifest.get("format_version") != FORMAT_VERSION:
            problems.append(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
        if manifest.get("config_hash") != key or config_hash(manifest["config"], manifest.get("hash_extra")) != key:
            problems.append("stored config does not match its key")
        if manifest.get("seed") != seed:
            problems.append(f"seed {manifest.get('seed')} != {seed}")
        if not payload["record"]["history"]:
            problems.append("empty history")
    except (OSError, ValueError, KeyError, TypeError) as err:
        problems = [f"unreadable ({type(err).__name__}: {err})"]
    if problems:
        warnings.warn(f"ignoring result file {path}: {'; '.join(problems)}", stacklevel=3)
        return None
    return payload


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def require_mode() -> bool:
    """True when results must come from files (book builds, CI): ``VMOE_REQUIRE_RESULTS=1``."""
    return os.environ.get("VMOE_REQUIRE_RESULTS", "").lower() in {"1", "true", "yes"}


def load_or_run(
    chapter: str,
    preset: str,
    runs: Mapping[str, TrainConfig],
    seeds: Sequence[int],
    *,
    device: str = "auto",
    progress: bool = True,
    extra_eval: Callable | None = None,
    hash_extra: Mapping[str, Any] | None = None,
    keep_weights: bool = False,
    require: bool | None = None,
) -> list[RunResult]:
    """Results of every (run, seed) of a sweep: read from disk when present, trained otherwise.

    Args:
        chapter: the chapter's name (a folder under ``results/<preset>/``).
        preset: ``smoke``, ``cpu`` or ``gpu``; only ``cpu``/``gpu`` are results of record.
        runs: run name -> config; the name labels the run in tables and figures.
        seeds: the seeds to run each config with.
        device: where missing runs train.
        extra_eval: passed to :func:`vmoe_lib.train.train_model` (post-training evaluations).
        hash_extra: settings outside :class:`TrainConfig` that change the record
            (e.g. the grid of an ``extra_eval``); they enter the key.
        keep_weights: save final weights to ``.cache/vmoe/weights`` (git-ignored).
        require: never train; raise :class:`MissingResultError` for a missing or
            stale result. Defaults to ``$VMOE_REQUIRE_RESULTS``.

    Returns:
        One :class:`RunResult` per (run, seed), in sweep order.
    """
    if not runs:
        raise ConfigError("runs is empty; a sweep needs at least one config")
    if not seeds:
        raise ConfigError("seeds is empty; pass at least one seed, e.g. seeds=[0]")
    require = require_mode() if require is None else require
    folder = results_root() / preset / chapter
    todo, results = [], {}
    for name, config in runs.items():
        key = config_hash(config, hash_extra)
        for seed in seeds:
            path = folder / f"{name}__{key}__s{seed}.json"
            payload = _read_valid(path, key, config, seed)
            if payload is not None:
                results[(name, seed)] = RunResult(name, seed, config, payload["record"], payload["manifest"], path)
            else:
                todo.append((name, seed, config, key, path))
    if todo and require:
        missing = "\n  ".join(str(t[4]) for t in todo)
        raise MissingResultError(
            f"{len(todo)} result(s) of chapter {chapter!r}, preset {preset!r} are missing or stale:\n  {missing}\n"
            f"Regenerate them with:  {regenerate_command(chapter, preset)}"
        )
    git_sha = _git_sha() if todo else None  # the code that trains, read before any run starts
    for i, (name, seed, config, key, path) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] training {name} seed {seed} ({chapter}/{preset})", flush=True)
        ckpt = cache_root() / "checkpoints" / preset / chapter / f"{name}__{key}__s{seed}.pt"
        weights = cache_root() / "weights" / preset / chapter / f"{name}__{key}__s{seed}.safetensors"
        started = time.time()
        record = train_model(
            config, seed, device=device, checkpoint_path=ckpt, progress=progress, extra_eval=extra_eval,
            weights_path=weights if keep_weights else None,
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "chapter": chapter,
            "preset": preset,
            "run": name,
            "seed": seed,
            "config_hash": key,
            "config": config.to_dict(),
            "hash_extra": dict(hash_extra) if hash_extra else None,
            "wall_time_s": record["wall_time_s"],
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "session_seconds": time.time() - started,
            "hardware": _hardware(record["device"]),
            "versions": _versions(),
            "git_sha": git_sha,
            "regenerate": regenerate_command(chapter, preset),
        }
        _write_atomic(path, {"manifest": manifest, "record": record})
        ckpt.unlink(missing_ok=True)
        results[(name, seed)] = RunResult(name, seed, config, record, manifest, path)
    return [results[(name, seed)] for name in runs for seed in seeds]
