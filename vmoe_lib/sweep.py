"""The sweep engine: run the missing (config, seed) pairs of a sweep, in parallel, safely.

A sweep is a list of :class:`RunTask` — one (config, seed) each, with the file its result goes to.
Three executors run them; each gives the same numbers for a run, because a run is a pure
function of (config, seed, thread count, numerics settings) and never of which worker ran it:

``inline``
    in this process, one after the other (tests, debugging). Numerics are whatever this process
    was started with: a notebook kernel has loaded torch already, so inline runs are not pinned.
``local`` (the default)
    ``workers`` fresh worker processes on this machine (``python -m vmoe_lib._sweep_worker``), each started
    with the pinned numerics of :mod:`vmoe_lib.numerics` and its share of the CPU threads
    (``workers="auto"``: one worker per core with one thread each on CPU, one per GPU on CUDA).
``slurm``
    one SLURM job per run, submitted as a job array through ``submitit`` (``pip install
    "vmoe-lib[cluster]"``); each job starts the same pinned worker process. ``cluster="local"`` or
    ``"debug"`` runs the jobs through submitit's local executors instead (tests; no SLURM needed).
``torchrun``
    one run at a time, each trained data-parallel by ``workers`` processes that PyTorch's launcher
    starts (``python -m torch.distributed.run --standalone --nproc_per_node workers``; DDP, gloo on the
    CPU, nccl with one GPU per process): the way to give one run of a ``gpu`` preset several GPUs
    (``python -m vmoe_lib run <chapter> --preset gpu --distributed 4``). The processes share the
    global batch (:mod:`vmoe_lib.distributed`): a run is the 1-process run's experiment, its sums taken
    in another order, so its numbers match within float tolerance over a few steps and drift apart
    over a whole run like those of another thread count; its record says so (``distributed``).

Whatever the executor, a run takes a lock (``<result>.lock`` beside its result file) before it
trains, so two sweeps started on the same folders never train the same run twice; it writes its
result through a uniquely named temporary file and an atomic rename; and a run that fails or
diverges is reported with its log file while the other runs go on, the sweep raising
:class:`SweepError` at the end naming every failure.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import queue
import shutil
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, check_choice

__all__ = [
    "EXECUTORS",
    "RunTask",
    "RunOutcome",
    "SweepError",
    "resolve_workers",
    "check_storage",
    "execute_task",
    "run_tasks",
    "write_atomic",
    "summarize_failures",
    "discard_leftovers",
]

EXECUTORS = ("local", "inline", "slurm", "torchrun")
_PROTOCOL_PREFIX = "@@vmoe-sweep@@ "


class SweepError(RuntimeError):
    """Some runs of a sweep failed; the others finished and were stored. ``failures`` lists them."""

    def __init__(self, message: str, failures: Sequence["RunOutcome"]):
        super().__init__(message)
        self.failures = list(failures)


@dataclass
class RunTask:
    """One (config, seed) of a sweep and where everything of it goes.

    ``path`` is the result file; the checkpoint, the final weights, the lock and the log are derived
    from it. ``extra_eval`` must be picklable (a module-level function or object) for the ``local``
    and ``slurm`` executors, which send the task to another process.
    """

    chapter: str
    preset: str
    name: str
    seed: int
    config: Any  # TrainConfig (kept untyped here so this module imports without torch)
    key: str
    path: Path
    cache: Path
    hash_extra: Mapping[str, Any] | None = None
    extra_eval: Callable | None = None
    device: str = "auto"
    compile: bool = False
    keep_weights: bool = False
    git_sha: str | None = None
    regenerate: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed} ({self.chapter}/{self.preset})"

    @property
    def stem(self) -> str:
        return self.path.name[: -len(".json")] if self.path.name.endswith(".json") else self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.cache / "checkpoints" / self.preset / self.chapter / f"{self.stem}.pt"

    @property
    def weights(self) -> Path:
        return self.cache / "weights" / self.preset / self.chapter / f"{self.stem}.safetensors"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.stem}.lock")

    @property
    def log_path(self) -> Path:
        return self.cache / "logs" / self.preset / self.chapter / f"{self.stem}.log"


@dataclass
class RunOutcome:
    """What happened to one task: ``trained``, ``present`` (another sweep stored it), ``busy``
    (locked by another sweep; retried later), ``failed`` or ``diverged``."""

    name: str
    seed: int
    status: str
    error: str = ""
    log: str = ""
    seconds: float = 0.0
    worker: int | None = None
    warnings: list[str] = field(default_factory=list)  # raised in the worker (e.g. a corrupt checkpoint moved aside)

    @property
    def ok(self) -> bool:
        return self.status in ("trained", "present")


# ----------------------------------------------------------------------------- files
def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of this process's own and a rename.

    The temporary name is unique (pid + random), so two processes writing the same result never
    trip over each other's half-written files; a reader sees the old file or the new one, whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _estimate_checkpoint_bytes(configs: Sequence[Any]) -> int:
    """Rough size of one run's checkpoint: weights + two Adam moments (fp32), plus slack."""
    biggest = 0
    for config in configs:
        try:
            import torch

            from .models import create_model

            with torch.device("meta"):
                model = create_model(config.model, **config.model_kwargs)
            biggest = max(biggest, sum(p.numel() for p in model.parameters()))
        except Exception:  # an estimate only: the config's own validation reports real problems
            continue
    return 3 * 4 * biggest + (8 << 20)


def check_storage(results_folder: Path, cache_folder: Path, configs: Sequence[Any], concurrent: int) -> None:
    """Fail early, in one line, when a folder the sweep writes to is not writable or has no room.

    Checked before any training: the results folder (``$VMOE_RESULTS_DIR`` moves it) and the cache
    folder that holds checkpoints (``$VMOE_CACHE_DIR``), for ``concurrent`` checkpoints at once
    (each written next to its previous version before the rename).
    """
    need = {results_folder: 1 << 20, cache_folder: 2 * max(1, concurrent) * _estimate_checkpoint_bytes(configs)}
    env = {results_folder: "VMOE_RESULTS_DIR", cache_folder: "VMOE_CACHE_DIR"}
    for folder, needed in need.items():
        what = "results" if folder is results_folder else "cache (checkpoints)"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"{what} folder {str(folder)!r} is not writable ({err.strerror or err}); "
                f"set ${env[folder]} to a writable folder"
            ) from None
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise ConfigError(
                f"{what} folder {str(folder)!r} has {free / 2**20:.0f} MiB free but the sweep needs about "
                f"{needed / 2**20:.0f} MiB; free some space or set ${env[folder]} to a folder with room"
            )


# ----------------------------------------------------------------------------- one task
def execute_task(task: RunTask, *, progress: bool = False, wait: bool = False, worker: int | None = None,
                 distributed: Any = None) -> RunOutcome:
    """Run one task in this process, under its lock; store its result; never raise for a failed run.

    If the lock is held by another process, return ``busy`` (or, with ``wait``, block until it is
    free). Once the lock is held, a valid result already on disk (stored by another sweep meanwhile)
    is kept and the run is not trained again. With ``distributed`` (a
    :class:`~vmoe_lib.distributed.DistributedContext`), every rank calls this: rank 0 waits for the
    lock, decides and stores the result, the others train their share; a failure other than
    divergence is raised, so the rank exits and ``torchrun`` stops the others instead of leaving
    them waiting in a collective.
    """
    from filelock import FileLock, Timeout

    from .records import build_manifest, read_valid_result
    from .train import TrainingDiverged, train_model

    ranks = distributed if distributed is not None and distributed.world_size > 1 else None
    main = ranks is None or ranks.is_main
    started = time.time()
    lock = None
    if main:
        task.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(task.lock_path), timeout=-1 if wait or ranks is not None else 0)
        try:
            lock.acquire()
        except Timeout:
            return RunOutcome(task.name, task.seed, "busy", worker=worker)
    try:
        present = [main and read_valid_result(task.path, task.key, task.seed, quiet=True) is not None]
        if ranks is not None:
            import torch.distributed as dist

            dist.broadcast_object_list(present, src=0)
        if present[0]:
            return RunOutcome(task.name, task.seed, "present", worker=worker, seconds=time.time() - started)
        try:
            record = train_model(
                task.config, task.seed, device=task.device, compile=task.compile, checkpoint_path=task.checkpoint,
                progress=progress,
                extra_eval=task.extra_eval, weights_path=task.weights if task.keep_weights else None, run_label=task.label,
                distributed=ranks,
            )
        except TrainingDiverged as err:  # in a data-parallel run every rank sees the same global loss: all stop here
            return RunOutcome(task.name, task.seed, "diverged", error=str(err), log=str(task.log_path), worker=worker,
                              seconds=time.time() - started)
        except Exception as err:  # reported with its traceback in the log; the sweep goes on
            if ranks is not None:
                raise
            traceback.print_exc()
            return RunOutcome(task.name, task.seed, "failed", error=f"{type(err).__name__}: {err}", log=str(task.log_path),
                              worker=worker, seconds=time.time() - started)
        if record is not None:  # None on the ranks other than 0
            manifest = build_manifest(task, record, session_seconds=time.time() - started)
            write_atomic(task.path, json.dumps({"manifest": manifest, "record": record}, indent=1) + "\n")
            task.checkpoint.unlink(missing_ok=True)
        return RunOutcome(task.name, task.seed, "trained", worker=worker, seconds=time.time() - started)
    finally:
        if lock is not None:
            lock.release()


def _distributed_task_main(task_file: str, outcome_file: str) -> int:
    """Entry point of each rank of a ``torchrun`` executor run (``python -m vmoe_lib._sweep_worker --torchrun``)."""
    from .distributed import init_from_env
    from .numerics import apply_threads_from_env
    from .train import resolve_device

    apply_threads_from_env()
    task: RunTask = _decode(Path(task_file).read_text())
    import torch.distributed as dist

    context = init_from_env(resolve_device(task.device))
    try:
        outcome = execute_task(task, progress=context.is_main, distributed=context)
    finally:
        dist.destroy_process_group()
    if context.is_main:
        Path(outcome_file).write_text(_encode(outcome))
    return 0


def _run_torchrun(tasks: Sequence[RunTask], nproc: int, threads: int, progress: bool, pinned: bool) -> list[RunOutcome]:
    """Each task in turn, on ``nproc`` data-parallel processes started by ``torch.distributed.run``."""
    from .train import check_data_parallel

    for task in tasks:  # a batch the processes cannot share fails here, before any run starts
        try:
            check_data_parallel(task.config, nproc)
        except ConfigError as err:
            raise ConfigError(f"run {task.label} cannot train on {nproc} data-parallel processes: {err}") from None
    bar, _ = _progress_bars(len(tasks), 1, progress, f"sweep (torchrun: {nproc} processes x {threads} thread{'s' * (threads > 1)} per run)")
    env = _worker_env(threads, pinned=pinned)
    out = []
    for task in tasks:
        bar.set_postfix_str(f"{task.name} s{task.seed}")
        task.log_path.parent.mkdir(parents=True, exist_ok=True)
        exchange = task.log_path.with_name(f".{task.stem}.{uuid.uuid4().hex[:8]}")
        task_file, outcome_file = exchange.with_suffix(".task"), exchange.with_suffix(".outcome")
        task_file.write_text(_encode(task))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "vmoe_lib._sweep_worker", "--torchrun", str(task_file), str(outcome_file)]
        started = time.time()
        try:
            with open(task.log_path, "a", buffering=1) as log:
                print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} torchrun, {nproc} processes: {task.label}", file=log, flush=True)
                code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code == 0 and outcome_file.exists():
                outcome = _decode(outcome_file.read_text())
            else:
                outcome = RunOutcome(task.name, task.seed, "failed", error=f"torchrun exited with code {code}",
                                     log=str(task.log_path), seconds=time.time() - started)
        finally:
            task_file.unlink(missing_ok=True)
            outcome_file.unlink(missing_ok=True)
        _report(bar, outcome)
        out.append(outcome)
        bar.update(1)
    bar.close()
    return out


# ----------------------------------------------------------------------------- workers
def resolve_workers(workers: int | str, device: str = "auto") -> tuple[int, int]:
    """``(workers, threads per worker)`` for a ``workers`` setting.

    ``"auto"``: one worker per CPU core with one torch thread each on CPU, one per GPU on CUDA.
    An int ``n``: ``n`` workers sharing the cores (``cores // n`` threads each, at least one).
    """
    cores = os.cpu_count() or 1
    shown = workers
    if isinstance(workers, str) and workers.strip().isdigit():
        workers = int(workers)
    if workers == "auto":
        if _uses_cuda(device):
            import torch

            return max(1, torch.cuda.device_count()), max(1, cores // max(1, torch.cuda.device_count()))
        return cores, 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers={shown!r} is invalid; it must be an int >= 1 or 'auto'")
    return workers, max(1, cores // workers)


def _uses_cuda(device: str) -> bool:
    if str(device).startswith("cuda"):
        return True
    if device == "auto":
        try:
            import torch

            return torch.cuda.is_available()
        except ImportError:
            return False
    return False


def _encode(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def _decode(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


def _worker_env(threads: int, *, pinned: bool = True, gpu: int | None = None) -> dict[str, str]:
    from .numerics import worker_env

    env = worker_env(threads, pinned=pinned)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    # The worker must import this checkout's library, also when it is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _Worker:
    """A worker process: reads pickled tasks on stdin, answers one protocol line per task on stdout."""

    def __init__(self, index: int, threads: int, pinned: bool, gpu: int | None):
        self.index = index
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmoe_lib._sweep_worker", str(index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1,
            env=_worker_env(threads, pinned=pinned, gpu=gpu),
        )

    def run(self, task: RunTask, wait: bool) -> RunOutcome:
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(_encode({"task": task, "wait": wait}) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith(_PROTOCOL_PREFIX):
                    return _decode(line[len(_PROTOCOL_PREFIX):].strip())
        except (BrokenPipeError, OSError):
            pass
        code = self.proc.wait()
        return RunOutcome(task.name, task.seed, "failed", error=f"worker process {self.index} died (exit code {code})",
                          log=str(task.log_path), worker=self.index)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def _worker_main(index: int) -> int:
    """Entry point of a worker process (``python -m vmoe_lib._sweep_worker N``)."""
    from .numerics import apply_threads_from_env

    apply_threads_from_env()
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    for line in sys.stdin:
        if not line.strip():
            continue
        message = _decode(line.strip())
        task: RunTask = message["task"]
        task.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(task.log_path, "a", buffering=1) as log:
            old_out, old_err = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = log
            try:
                print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} worker {index} (pid {os.getpid()}): {task.label}", flush=True)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("default")
                    outcome = execute_task(task, progress=True, wait=message["wait"], worker=index)
                outcome.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
                for text in outcome.warnings:
                    print(f"warning: {text}", flush=True)
                print(f"== {outcome.status} after {outcome.seconds:.0f} s {outcome.error}", flush=True)
            finally:
                sys.stdout, sys.stderr = old_out, old_err
        protocol.write(_PROTOCOL_PREFIX + _encode(outcome) + "\n")
    return 0


def _run_one_in_subprocess(task: RunTask, threads: int, pinned: bool = True) -> RunOutcome:
    """One task in a fresh pinned worker process (what each SLURM job does)."""
    worker = _Worker(0, threads, pinned, None)
    try:
        return worker.run(task, wait=True)
    finally:
        worker.close()


# ----------------------------------------------------------------------------- executors
def _progress_bars(total: int, workers: int, enabled: bool, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="run", disable=not enabled, dynamic_ncols=True)
    lines = [tqdm(total=0, bar_format="{desc}", position=i + 1, leave=False, disable=not enabled or workers < 2)
             for i in range(workers)]
    return bar, lines


def run_tasks(
    tasks: Sequence[RunTask],
    *,
    executor: str = "local",
    workers: int | str = 1,
    device: str = "auto",
    progress: bool = True,
    pinned: bool = True,
    threads: int | None = None,
    slurm: Mapping[str, Any] | None = None,
) -> list[RunOutcome]:
    """Run ``tasks`` with an executor; return one outcome per task. Raises nothing for failed runs.

    Args:
        tasks: the missing runs of a sweep.
        executor: ``local`` (worker processes here), ``inline`` (this process), ``slurm`` or ``torchrun``.
        workers: ``local``: an int or ``"auto"`` (see :func:`resolve_workers`); ``torchrun``: the
            processes that train each run together.
        device: the device the runs train on (for ``workers="auto"``).
        progress: the overall bar (runs done / total, with an ETA) and one line per worker.
        pinned: start workers with the pinned numerics (``local``/``slurm``).
        threads: torch threads per ``local`` worker (default: the cores shared among the workers).
        slurm: ``slurm`` only: ``folder``, ``cluster`` (``slurm``/``local``/``debug``), ``partition``,
            ``time`` (minutes), ``gpus_per_job``, ``cpus_per_job``, ``options`` (extra ``slurm_*``
            parameters of submitit, e.g. ``{"account": "x"}``), ``wait`` (default True).
    """
    check_choice("executor", executor, EXECUTORS)
    if not tasks:
        return []
    if executor == "inline":
        return _run_inline(tasks, progress)
    if executor == "slurm":
        return _run_slurm(tasks, dict(slurm or {}), progress, pinned)
    n, per_worker = resolve_workers(workers, device)
    threads = per_worker if threads is None else threads
    if executor == "torchrun":
        return _run_torchrun(tasks, n, threads, progress, pinned)
    return _run_local(tasks, min(n, len(tasks)), threads, progress, pinned, gpus=_uses_cuda(device) and workers == "auto")


def _report(bar, outcome: RunOutcome) -> None:
    for text in outcome.warnings:
        bar.write(f"warning ({outcome.name} seed {outcome.seed}): {text}")
    if not outcome.ok:
        bar.write(f"!! {outcome.name} seed {outcome.seed} {outcome.status}: {outcome.error}\n   log: {outcome.log}")


def _run_inline(tasks: Sequence[RunTask], progress: bool) -> list[RunOutcome]:
    bar, _ = _progress_bars(len(tasks), 1, progress, "sweep")
    out = []
    for task in tasks:
        bar.set_postfix_str(f"{task.name} s{task.seed}")
        bar.write(f"training {task.label}")
        outcome = execute_task(task, progress=progress, wait=True)
        _report(bar, outcome)
        out.append(outcome)
        bar.update(1)
    bar.close()
    return out


def _run_local(tasks: Sequence[RunTask], n: int, threads: int, progress: bool, pinned: bool, gpus: bool) -> list[RunOutcome]:
    todo: deque[tuple[int, RunTask, bool]] = deque((i, t, False) for i, t in enumerate(tasks))
    done: dict[int, RunOutcome] = {}
    guard = threading.Lock()
    events: queue.Queue = queue.Queue()
    bar, lines = _progress_bars(len(tasks), n, progress, f"sweep ({n} worker{'s' * (n > 1)} x {threads} thread{'s' * (threads > 1)})")

    def serve(index: int) -> None:
        worker = _Worker(index, threads, pinned, index if gpus else None)
        try:
            while True:
                with guard:
                    if not todo:
                        return
                    i, task, wait = todo.popleft()
                events.put(("start", index, task))
                outcome = worker.run(task, wait)
                if outcome.status == "failed" and worker.proc.poll() is not None:
                    worker = _Worker(index, threads, pinned, index if gpus else None)  # a dead worker is replaced
                if outcome.status == "busy":  # another sweep trains it: come back to it last, then wait
                    with guard:
                        todo.append((i, task, True))
                    events.put(("busy", index, task))
                    continue
                with guard:
                    done[i] = outcome
                events.put(("done", index, outcome))
        finally:
            worker.close()
            events.put(("exit", index, None))

    threads_ = [threading.Thread(target=serve, args=(k,), daemon=True) for k in range(n)]
    for t in threads_:
        t.start()
    running = n
    while running:
        kind, index, payload = events.get()
        if kind == "start":
            lines[index].set_description_str(f"  worker {index}: {payload.name} seed {payload.seed}")
            if n == 1:
                bar.set_postfix_str(f"{payload.name} s{payload.seed}")
        elif kind == "busy":
            lines[index].set_description_str(f"  worker {index}: {payload.name} seed {payload.seed} is being trained elsewhere")
        elif kind == "done":
            _report(bar, payload)
            bar.update(1)
            lines[index].set_description_str(f"  worker {index}: idle")
        elif kind == "exit":
            running -= 1
    for t in threads_:
        t.join()
    for line in lines:
        line.close()
    bar.close()
    return [done[i] for i in range(len(tasks))]


def _slurm_job(task: RunTask, threads: int, pinned: bool) -> RunOutcome:
    """The function each SLURM job runs (pickled by submitit)."""
    return _run_one_in_subprocess(task, threads, pinned)


def _run_slurm(tasks: Sequence[RunTask], options: dict[str, Any], progress: bool, pinned: bool) -> list[RunOutcome]:
    try:
        import submitit
    except ImportError:
        raise ConfigError("executor='slurm' needs submitit: pip install \"vmoe-lib[cluster]\"") from None
    allowed = {"folder", "cluster", "partition", "time", "gpus_per_job", "cpus_per_job", "mem_gb", "options", "wait", "job_name"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"slurm options {unknown} are not recognised; allowed: {sorted(allowed)}")
    cluster = check_choice("slurm cluster", options.get("cluster", "slurm"), ("slurm", "local", "debug"))
    folder = Path(options.get("folder") or tasks[0].cache / "slurm" / "%j")
    cpus = int(options.get("cpus_per_job", 2))
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": int(options.get("time", 120)), "cpus_per_task": cpus,
                              "name": options.get("job_name", f"vmoe-{tasks[0].chapter}")}
    if options.get("gpus_per_job"):
        params["gpus_per_node"] = int(options["gpus_per_job"])
    if options.get("mem_gb"):
        params["mem_gb"] = float(options["mem_gb"])
    if cluster == "slurm":
        if options.get("partition"):
            params["slurm_partition"] = options["partition"]
        for key, value in dict(options.get("options") or {}).items():
            params[key if key.startswith("slurm_") else f"slurm_{key}"] = value
    ex.update_parameters(**params)
    threads = max(1, cpus)
    jobs = ex.map_array(_slurm_job, list(tasks), [threads] * len(tasks), [pinned] * len(tasks))
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    print(f"submitted {len(jobs)} job(s) to {cluster} (array {', '.join(ids)}); logs under {folder}", flush=True)
    if not options.get("wait", True):
        return [RunOutcome(t.name, t.seed, "submitted") for t in tasks]
    bar, _ = _progress_bars(len(tasks), 1, progress, f"sweep ({cluster} jobs)")
    outcomes: list[RunOutcome | None] = [None] * len(tasks)
    pending = set(range(len(tasks)))
    while pending:
        for i in sorted(pending):
            job = jobs[i]
            if not job.done():
                continue
            try:
                outcomes[i] = job.result()
            except Exception as err:  # the job itself failed (timeout, node failure): rerun submits it again
                outcomes[i] = RunOutcome(tasks[i].name, tasks[i].seed, "failed", error=f"job {job.job_id}: {err}",
                                         log=str(job.paths.stderr))
            _report(bar, outcomes[i])
            bar.update(1)
            pending.discard(i)
        if pending:
            time.sleep(1.0 if cluster != "slurm" else 15.0)
    bar.close()
    return [o for o in outcomes if o is not None]


def summarize_failures(outcomes: Sequence[RunOutcome]) -> str | None:
    """One line per failed run (run, seed, error, log), or None when every run is stored."""
    bad = [o for o in outcomes if not o.ok and o.status != "submitted"]
    if not bad:
        return None
    lines = [f"  {o.name} seed {o.seed}: {o.status}: {o.error} (log: {o.log})" for o in bad]
    if len(bad) == len(outcomes):
        head = f"all {len(bad)} run(s) failed; nothing was stored:"
    else:
        head = f"{len(bad)} of {len(outcomes)} run(s) failed; the other {len(outcomes) - len(bad)} are stored:"
    return head + "\n" + "\n".join(lines)


def discard_leftovers(tasks: Sequence[RunTask], outcomes: Sequence[RunOutcome]) -> None:
    """After a sweep: for every run that stored nothing, its lock file (when no other sweep holds it) and the
    results folders the sweep created and left empty; its log stays, the failure report names it."""
    from filelock import FileLock, Timeout

    folders = set()
    for task, outcome in zip(tasks, outcomes):
        if outcome.ok or outcome.status == "submitted" or task.path.exists():
            continue
        lock = FileLock(str(task.lock_path), timeout=0)
        try:
            with lock:
                task.lock_path.unlink(missing_ok=True)
        except (Timeout, OSError):
            continue  # another sweep holds it (or it is gone): leave it
        folders.add(task.path.parent)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        for level in (folder, folder.parent):
            try:
                level.rmdir()  # only when empty
            except OSError:
                break


