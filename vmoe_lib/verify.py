"""Rerun recorded runs and compare: is a result of record reproducible here?

``python -m vmoe_lib verify <chapter> --preset cpu --sample N [--seed S]`` picks N recorded runs
(reproducibly, by S), retrains each in a fresh worker process with the thread count and numerics
settings its manifest records (a record trained data-parallel: on as many ``torchrun`` processes), into a scratch folder, and compares every recorded number that
is an outcome of the run (timings are not). A field that differs is shown with its size in units
of the seed-to-seed standard deviation of that field across the record's seeds.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Difference", "RunCheck", "compare_records", "new_fields", "verify_chapter"]

# Keys that measure time or where the run happened, not what it computed.
_NOT_OUTCOMES = ("seconds", "wall_time", "per_second", "images_per_s", "finished_at", "device")


@dataclass
class Difference:
    """One recorded number that came out differently."""

    field: str
    recorded: float
    rerun: float
    seed_sd: float | None  # sd over the record's seeds of this field (None: not defined per seed)

    @property
    def in_seed_sd(self) -> float | None:
        if self.seed_sd is None or self.seed_sd == 0:
            return None
        return abs(self.rerun - self.recorded) / self.seed_sd

    def describe(self) -> str:
        size = f" = {self.in_seed_sd:.2f} seed sd" if self.in_seed_sd is not None else ""
        return f"{self.field}: {self.recorded:.6g} -> {self.rerun:.6g} (|diff| {abs(self.rerun - self.recorded):.3g}{size})"


@dataclass
class RunCheck:
    """The verdict on one rerun record."""

    path: Path
    identical: bool
    compared: int
    differences: list[Difference] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # fields the rerun has and the record predates (not compared)


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            if any(tag in str(k) for tag in _NOT_OUTCOMES):
                continue
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


# Differences are listed headline first: final metrics, then the per-epoch history, then the rest.
_FIRST = ("final.", "history", "costs")


def _reading_order(key: str) -> tuple[int, str]:
    rank = next((i for i, prefix in enumerate(_FIRST) if key.startswith(prefix)), len(_FIRST))
    return rank, key


def compare_records(recorded: dict[str, Any], rerun: dict[str, Any], seed_sds: dict[str, float] | None = None) -> tuple[int, list[Difference]]:
    """``(fields compared, differences)`` between two records, timings ignored; bit-exact comparison.

    Every field of the record is compared (one the rerun lacks is a difference). A field only the rerun has is a
    measurement added to the code after the record was made: it is not compared (:func:`new_fields` lists them).
    """
    seed_sds = seed_sds or {}
    a, b = dict(_leaves(recorded)), dict(_leaves(rerun))
    out = []
    for key in sorted(a, key=_reading_order):
        x, y = a.get(key), b.get(key)
        if x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            continue
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            out.append(Difference(key, float(x), float(y), seed_sds.get(key)))
        else:
            out.append(Difference(key, float("nan"), float("nan"), None))
    return len(a), out


def new_fields(recorded: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """Fields of ``rerun`` that ``recorded`` lacks: measurements the code added after the record was made."""
    a = {key for key, _ in _leaves(recorded)}
    return sorted((key for key, _ in _leaves(rerun) if key not in a), key=_reading_order)


def _seed_sds(records: list[dict[str, Any]]) -> dict[str, float]:
    """Sample sd over the record's seeds of every numeric field (final metrics, history, ...)."""
    import numpy as np

    values: dict[str, list[float]] = {}
    for record in records:
        for key, value in _leaves(record):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    return {k: float(np.std(v, ddof=1)) for k, v in values.items() if len(v) >= 2}


def verify_chapter(chapter: str, preset: str = "cpu", *, sample: int = 1, seed: int = 0, progress: bool = True,
                   workers: int = 1) -> list[RunCheck]:
    """Rerun ``sample`` recorded runs of ``chapter``/``preset`` with their recorded settings and compare.

    Each run trains in a fresh worker process started with the recorded thread count and with the
    numerics pinned exactly when the record was pinned, into a scratch results folder (the record
    is never touched).
    """
    from .chapters import get_chapter
    from .results import results_root
    from .sweep import RunTask, run_tasks
    from .train import TrainConfig

    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 1:
        raise ConfigError(f"sample={sample!r} is invalid; it must be an int >= 1 (how many recorded runs to rerun)")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed={seed!r} is invalid; it must be an int (it chooses which runs, reproducibly)")
    plan = get_chapter(chapter).plan(preset)
    own = {spec.stored_as or spec.name: spec for spec in plan.specs if spec.chapter == chapter}
    folder = results_root() / preset / chapter
    if not folder.is_dir():
        raise ConfigError(f"results folder {str(folder)!r} is missing or not a folder: chapter {chapter!r} has no "
                          f"records of preset {preset!r} here; run it first (python -m vmoe_lib run {chapter} "
                          f"--preset {preset}) or set $VMOE_RESULTS_DIR")
    files = sorted(p for p in folder.glob("*__s*.json"))
    if not files:
        raise ConfigError(f"chapter {chapter!r} has no recorded runs under {folder}; run it first")
    if sample > len(files):
        raise ConfigError(f"sample={sample} is larger than the {len(files)} recorded runs of {chapter}/{preset}")
    chosen = sorted(random.Random(seed).sample(files, sample))
    payloads = {}
    for p in files:
        try:
            payloads[p] = json.loads(p.read_text())
            _ = payloads[p]["manifest"]["run"], payloads[p]["record"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{p} is not a readable record ({type(err).__name__}: {err}); delete it and regenerate it "
                              f"with: python -m vmoe_lib run {chapter} --preset {preset}") from None
    checks = []
    with tempfile.TemporaryDirectory(prefix="vmoe-verify-") as scratch:
        for path in chosen:
            manifest, record = payloads[path]["manifest"], payloads[path]["record"]
            threads = int(manifest["hardware"].get("torch_threads") or 1)
            pinned = bool((manifest.get("numerics") or {}).get("pinned", False))
            hash_extra = manifest.get("hash_extra")
            spec = own.get(manifest["run"])
            if spec is None or spec.key != manifest["config_hash"]:
                raise ConfigError(f"{path.name} is no run of the chapter's {preset!r} preset as it stands (its config or "
                                  f"probe settings {hash_extra!r} changed since): it is stale, not verifiable")
            task = RunTask(chapter, preset, manifest["run"], int(manifest["seed"]), TrainConfig.from_dict(manifest["config"]),
                           manifest["config_hash"], Path(scratch) / "results" / path.name, Path(scratch) / "cache",
                           hash_extra=hash_extra, extra_eval=spec.extra_eval, device=record.get("device", "cpu"),
                           compile=bool(manifest.get("compile", False)))
            # A record trained data-parallel (the torchrun executor) is rerun the same way: the same number of
            # processes sums in the same order, so its rerun can be identical; one process could not be.
            world = int((record.get("distributed") or {}).get("world_size", 1))
            executor, workers_per_run = ("torchrun", world) if world > 1 else ("local", 1)
            if progress:
                where = f"{world} data-parallel processes x " if world > 1 else ""
                print(f"rerunning {path.name} ({where}{threads} thread(s), numerics {'pinned' if pinned else 'not pinned'})",
                      flush=True)
            [outcome] = run_tasks([task], executor=executor, workers=workers_per_run, progress=False, pinned=pinned,
                                  threads=threads)
            if not outcome.ok:
                raise RuntimeError(f"rerun of {path.name} {outcome.status}: {outcome.error} (log: {outcome.log})")
            rerun = json.loads(task.path.read_text())["record"]
            peers = [payloads[p]["record"] for p in files if payloads[p]["manifest"]["run"] == manifest["run"]]
            n, diffs = compare_records(record, rerun, _seed_sds(peers))
            checks.append(RunCheck(path, not diffs, n, diffs, {"threads": threads, "pinned": pinned},
                                   new_fields(record, rerun)))
    return checks
