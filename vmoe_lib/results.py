"""Results of record: one small JSON file per (experiment config, seed), reused when present.

Layout (the file format is :mod:`vmoe_lib.records`)::

    results/<preset>/<chapter>/<run name>__<config hash>__s<seed>.json

The key is the experiment's config (hashed) and the seed; the git sha, library
and torch/timm versions, hardware and wall time go into the file's manifest,
not the key, so a later commit that does not change an experiment keeps its
results valid. Presets ``cpu`` and ``gpu`` are results of record and committed;
``smoke`` results live in ``results/smoke/``, which git ignores, so a smoke run
never overwrites a result of record.

A sweep is a list of runs (:class:`RunSpec`: a config, its seeds, the chapter
folder that holds its records); :func:`load_runs` trains only the missing
(run, seed) pairs, all from one queue, each with a checkpoint under
``.cache/vmoe/checkpoints`` so that a sweep killed halfway resumes where it
stopped. A file that cannot be read or whose stored config does not match its
key is reported and rerun, never used. :func:`load_or_run` is the same for one
chapter's runs given as ``{name: config}``.

In *require* mode (``VMOE_REQUIRE_RESULTS=1``, set by the book build and CI)
nothing is trained: a missing or stale result raises
:class:`MissingResultError` naming the command that regenerates it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import (FORMAT_VERSION, _git_sha, _hardware, _repo_root, _versions, build_manifest, cache_root,  # noqa: F401
                      config_hash, read_valid_result, regenerate_command, results_root, validate_payload)
from .data import check_available
from .sweep import RunTask, SweepError, check_storage, discard_leftovers, resolve_workers, run_tasks, summarize_failures
from .train import TrainConfig

__all__ = [
    "FORMAT_VERSION",
    "MissingResultError",
    "RunResult",
    "RunSpec",
    "config_hash",
    "results_root",
    "load_runs",
    "load_or_run",
    "regenerate_command",
]


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


def require_mode() -> bool:
    """True when results must come from files (book builds, CI): ``VMOE_REQUIRE_RESULTS=1``."""
    return os.environ.get("VMOE_REQUIRE_RESULTS", "").lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its name there, config and seeds, and the chapter folder that holds its records.

    Args:
        name: the run's label in this sweep (tables, figures, :class:`RunResult`).
        config: what trains.
        seeds: the seeds it trains with, in order.
        chapter: the chapter whose results folder holds its records (``results/<preset>/<chapter>/``); for a run
            one chapter reads from another (a *borrowed* run), that other chapter.
        stored_as: the run's name in that folder (default: ``name``).
        extra_eval: a post-training measurement stored in the record (``train_model``'s ``extra_eval``).
        hash_extra: settings outside the config that change the record (the probe's); they enter the key.
    """

    name: str
    config: TrainConfig
    seeds: tuple[int, ...]
    chapter: str
    stored_as: str | None = None
    extra_eval: Callable | None = None
    hash_extra: Mapping[str, Any] | None = None

    @property
    def key(self) -> str:
        """The results key: the config and ``hash_extra`` hashed."""
        return config_hash(self.config, self.hash_extra)

    @property
    def file_stem(self) -> str:
        """``<stored name>__<key>``: a record's file is ``<file_stem>__s<seed>.json``."""
        return f"{self.stored_as or self.name}__{self.key}"


def load_runs(
    specs: Sequence[RunSpec],
    preset: str,
    *,
    device: str = "auto",
    progress: bool = True,
    keep_weights: bool = False,
    require: bool | None = None,
    compile: bool = False,
    executor: str = "inline",
    workers: int | str = 1,
    slurm: Mapping[str, Any] | None = None,
    regenerate: str | None = None,
) -> list[RunResult]:
    """Results of every (run, seed) of ``specs``: read from disk when present, the missing ones trained from one queue.

    Args:
        specs: the runs, each with its own seeds and folder (:class:`RunSpec`).
        preset: the folder under ``results/``: ``smoke``, ``cpu``, ``gpu`` (results of record) or ``custom``.
        device: where missing runs train.
        compile: train the missing runs' steps under ``torch.compile`` (:func:`vmoe_lib.train.train_model`); off by
            default. Not part of a result's key: the manifest records it.
        keep_weights: save final weights to ``.cache/vmoe/weights`` (git-ignored).
        require: never train; raise :class:`MissingResultError` for a missing or stale result. Defaults to
            ``$VMOE_REQUIRE_RESULTS``.
        executor: how missing runs train (:mod:`vmoe_lib.sweep`): ``inline`` (this process, the default here),
            ``local`` (pinned worker processes; what chapters use), ``slurm`` or ``torchrun``.
        workers: the ``local`` executor's worker count, or ``"auto"``.
        slurm: the ``slurm`` executor's options (see :func:`vmoe_lib.sweep.run_tasks`).
        regenerate: the command that regenerates these results, stored in every manifest and named by
            :class:`MissingResultError` (default: ``python -m vmoe_lib run <chapter> --preset <preset>`` of each
            run's chapter).

    Raises:
        SweepError: after every other run is stored, naming the runs that failed or diverged.

    Returns:
        One :class:`RunResult` per (run, seed), runs in the order given, each run's seeds in its order.
    """
    if not isinstance(compile, bool):
        raise ConfigError(f"compile={compile!r} is invalid; it must be True or False")
    if not specs:
        raise ConfigError("runs is empty; a sweep needs at least one config")
    pairs = [(s.name, seed) for s in specs for seed in s.seeds]
    if len(set(pairs)) != len(pairs):
        twice = sorted({p for p in pairs if pairs.count(p) > 1})
        raise ConfigError(f"each (run, seed) may appear once in a sweep; repeated: {twice}")
    for spec in specs:
        if not spec.seeds:
            raise ConfigError(f"run {spec.name!r} has no seeds; pass at least one seed, e.g. seeds=[0]")
    require = require_mode() if require is None else require
    todo, results = [], {}
    for spec in specs:
        key, folder = spec.key, results_root() / preset / spec.chapter
        for seed in spec.seeds:
            path = folder / f"{spec.file_stem}__s{seed}.json"
            payload = read_valid_result(path, key, seed)
            if payload is not None:
                results[(spec.name, seed)] = RunResult(spec.name, seed, spec.config, payload["record"], payload["manifest"], path)
            else:
                todo.append((spec, seed, key, path))
    commands = sorted({regenerate or regenerate_command(spec.chapter, preset) for spec, *_ in todo})
    if todo and require:
        shown = [str(t[3]) for t in todo[:3]] + ([f"and {len(todo) - 3} more"] if len(todo) > 3 else [])
        raise MissingResultError(
            f"{len(todo)} result(s) of preset {preset!r} are missing or stale ({', '.join(shown)}); "
            f"regenerate them with: {' and '.join(commands)}"
        )
    if todo:
        # Checkpoints written at once: one per local worker (one per torchrun run), every run under SLURM.
        if executor in ("inline", "torchrun"):
            n_concurrent = 1
        elif executor == "local":
            n_concurrent = min(len(todo), resolve_workers(workers, device)[0])
        else:
            n_concurrent = len(todo)
        if executor != "slurm":  # the runs train here: their data must be here (a cluster's jobs find their own)
            for dataset in sorted({t[0].config.dataset for t in todo}):
                check_available(dataset)
        for folder in sorted({t[3].parent for t in todo}):
            check_storage(folder, cache_root(), [t[0].config for t in todo], n_concurrent)
        git_sha = _git_sha()  # the code that trains, read before any run starts
        tasks = [
            RunTask(spec.chapter, preset, spec.stored_as or spec.name, seed, spec.config, key, path, cache_root(),
                    hash_extra=spec.hash_extra, extra_eval=spec.extra_eval, device=device, compile=compile, keep_weights=keep_weights,
                    git_sha=git_sha, regenerate=regenerate or regenerate_command(spec.chapter, preset))
            for spec, seed, key, path in todo
        ]
        outcomes = run_tasks(tasks, executor=executor, workers=workers, device=device, progress=progress, slurm=slurm)
        discard_leftovers(tasks, outcomes)
        for (spec, seed, _, _), task, outcome in zip(todo, tasks, outcomes):
            if not outcome.ok:
                continue
            payload = read_valid_result(task.path, task.key, task.seed)
            if payload is None:
                outcome.status, outcome.error = "failed", "its result file is missing or corrupt after training"
                continue
            results[(spec.name, seed)] = RunResult(spec.name, seed, spec.config, payload["record"], payload["manifest"],
                                                   task.path)
        if any(o.status == "submitted" for o in outcomes):
            raise SweepError(f"{len(outcomes)} run(s) submitted; run the same command again when the jobs are done "
                             "to collect their results", [])
        failed = summarize_failures(outcomes)
        if failed:
            raise SweepError(failed, [o for o in outcomes if not o.ok])
    return [results[(spec.name, seed)] for spec in specs for seed in spec.seeds]


def load_or_run(
    chapter: str,
    preset: str,
    runs: Mapping[str, TrainConfig],
    seeds: Sequence[int] | Mapping[str, Sequence[int]],
    *,
    device: str = "auto",
    progress: bool = True,
    extra_eval: Callable | None = None,
    hash_extra: Mapping[str, Any] | None = None,
    keep_weights: bool = False,
    require: bool | None = None,
    executor: str = "inline",
    workers: int | str = 1,
    slurm: Mapping[str, Any] | None = None,
) -> list[RunResult]:
    """Results of every (run, seed) of one chapter's sweep: read from disk when present, trained otherwise.

    Args:
        chapter: the chapter's name (a folder under ``results/<preset>/``).
        preset: ``smoke``, ``cpu`` or ``gpu``; only ``cpu``/``gpu`` are results of record.
        runs: run name -> config; the name labels the run in tables and figures.
        seeds: the seeds to run each config with: one list for every run, or ``{run name: seeds}`` (every run
            named), so that runs of different seed counts train from one queue.
        extra_eval, hash_extra: a post-training measurement for every run and its settings (see :class:`RunSpec`).
        device, progress, keep_weights, require, executor, workers, slurm: as in :func:`load_runs`.

    Returns:
        One :class:`RunResult` per (run, seed), in sweep order.
    """
    if not runs:
        raise ConfigError("runs is empty; a sweep needs at least one config")
    if isinstance(seeds, Mapping):
        missing = sorted(set(runs) - set(seeds))
        extra = sorted(set(seeds) - set(runs))
        if missing or extra:
            raise ConfigError(f"seeds must name every run once: runs without seeds {missing}, seeds of no run {extra}")
        per_run = {name: tuple(seeds[name]) for name in runs}
    else:
        if not seeds:
            raise ConfigError("seeds is empty; pass at least one seed, e.g. seeds=[0]")
        per_run = {name: tuple(seeds) for name in runs}
    specs = [RunSpec(name, config, per_run[name], chapter, extra_eval=extra_eval, hash_extra=hash_extra)
             for name, config in runs.items()]
    return load_runs(specs, preset, device=device, progress=progress, keep_weights=keep_weights, require=require,
                     executor=executor, workers=workers, slurm=slurm)
