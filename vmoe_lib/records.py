"""The file format of a result of record: its key, its manifest, and the checks a stored file must pass.

One small JSON file per (experiment config, seed)::

    results/<preset>/<chapter>/<run name>__<config hash>__s<seed>.json  =  {"manifest": {...}, "record": {...}}

The key is the experiment's config (hashed, with any ``hash_extra`` settings that change the record) and the
seed; the git sha, library and torch/timm versions, hardware and wall time go into the manifest, not the key.
This module reads and checks such files and writes their manifests; :mod:`vmoe_lib.results` decides what to
load and what to train, and :mod:`vmoe_lib.sweep` trains and stores. It imports neither, so both use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import ConfigError

__all__ = [
    "FORMAT_VERSION", "config_hash", "results_root", "cache_root", "regenerate_command", "validate_payload",
    "read_valid_result", "build_manifest",
]

FORMAT_VERSION = 1


def config_hash(config: Any, extra: Mapping[str, Any] | None = None) -> str:
    """Stable 12-hex-digit hash of a config (a ``TrainConfig`` or its dict) and of ``extra`` settings that change the outcome."""
    payload = config.to_dict() if hasattr(config, "to_dict") else dict(config)
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


_NUMBER = (int, float)
# Every field a stored record must have, with the types it must hold: a file failing any of these
# is corrupt (reported and rerun), never used.
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "chapter": (str,), "preset": (str,), "run": (str,), "seed": (int,),
    "config_hash": (str,), "config": (dict,), "wall_time_s": _NUMBER, "hardware": (dict,), "versions": (dict,),
}
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "history": (list,), "final": (dict,), "costs": (dict,), "extra": (dict,), "wall_time_s": _NUMBER, "device": (str,),
}
_EPOCH_FIELDS: dict[str, tuple[type, ...]] = {"epoch": (int,), "train_loss": _NUMBER, "train_accuracy": _NUMBER}


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def validate_payload(payload: Any, key: str, seed: int) -> list[str]:
    """What is wrong with a stored result for (key, seed): missing fields, wrong types, wrong key. Empty when valid."""
    if not isinstance(payload, dict) or not isinstance(payload.get("manifest"), dict) or not isinstance(payload.get("record"), dict):
        return ["not a {manifest, record} object"]
    manifest, record = payload["manifest"], payload["record"]
    problems = []
    for part, spec, data in (("manifest", _MANIFEST_FIELDS, manifest), ("record", _RECORD_FIELDS, record)):
        for name, types in spec.items():
            if name not in data:
                problems.append(f"{part}.{name} missing")
            elif not _is(data[name], types):
                problems.append(f"{part}.{name} is {type(data[name]).__name__}, not {'/'.join(t.__name__ for t in types)}")
    if problems:
        return problems
    if manifest["format_version"] != FORMAT_VERSION:
        problems.append(f"format_version {manifest['format_version']} != {FORMAT_VERSION}")
    try:
        if manifest["config_hash"] != key or config_hash(manifest["config"], manifest.get("hash_extra")) != key:
            problems.append("stored config does not match its key")
    except ConfigError as err:
        problems.append(str(err))
    if manifest["seed"] != seed:
        problems.append(f"seed {manifest['seed']} != {seed}")
    if not record["history"]:
        problems.append("empty history")
    for i, epoch in enumerate(record["history"]):
        if not isinstance(epoch, dict):
            problems.append(f"record.history[{i}] is {type(epoch).__name__}, not dict")
            continue
        for name, types in _EPOCH_FIELDS.items():
            if not _is(epoch.get(name), types):
                problems.append(f"record.history[{i}].{name} is missing or not a number")
    for name, value in record["final"].items():
        if not _is(value, _NUMBER) or not math.isfinite(value):
            problems.append(f"record.final.{name}={value!r} is not a finite number")
    if not any(k.endswith("accuracy") for k in record["final"]):
        problems.append("record.final has no accuracy")
    return problems


def read_valid_result(path: Path, key: str, seed: int, *, quiet: bool = False) -> dict[str, Any] | None:
    """The stored payload if ``path`` holds a complete result for exactly (key, seed); else ``None``.

    A file that is unreadable, truncated, misses a field or holds a value of the wrong type is
    reported (unless ``quiet``) and treated as missing, so its run is trained again.
    """
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        problems = validate_payload(payload, key, seed)
    except (OSError, ValueError) as err:
        problems = [f"unreadable ({type(err).__name__}: {err})"]
    if problems:
        if not quiet:
            warnings.warn(f"ignoring corrupt result file {path}: {'; '.join(problems)}; its run is trained again", stacklevel=3)
        return None
    return payload


def build_manifest(task: Any, record: Mapping[str, Any], *, session_seconds: float) -> dict[str, Any]:
    """The manifest stored beside a run's record: what ran, where, with which code and numerics."""
    from .numerics import cpu_info, numerics_settings

    return {
        "format_version": FORMAT_VERSION,
        "chapter": task.chapter,
        "preset": task.preset,
        "run": task.name,
        "seed": task.seed,
        "config_hash": task.key,
        "config": task.config.to_dict(),
        "hash_extra": dict(task.hash_extra) if task.hash_extra else None,
        "wall_time_s": record["wall_time_s"],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "session_seconds": session_seconds,
        "hardware": {**_hardware(record["device"]), "cpu": cpu_info()},
        "numerics": numerics_settings(),
        "versions": _versions(),
        "git_sha": task.git_sha,
        "regenerate": task.regenerate,
        "compile": task.compile,
    }
