"""Run a function on N gloo processes from a test: ``results = spawn_gloo(fn, world_size, *args)``.

``fn(rank, world_size, *args)`` runs in a fresh process (``spawn``) with the default process
group initialised (gloo, a file rendezvous in a temporary folder: no ports), one OpenMP thread
and a fixed seed; whatever it returns (picklable) comes back in rank order. An exception in any
rank fails the call with that rank's traceback. Both the expert-parallel and the data-parallel
tests use it; keep it the only launcher in the tests.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn_gloo"]


def _worker(rank: int, world_size: int, folder: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = Path(folder) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent test
        result = ("error", traceback.format_exc())
    out.write_bytes(pickle.dumps(result))


def spawn_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return each rank's result."""
    with tempfile.TemporaryDirectory(prefix="vmoe_gloo_") as folder:
        context = mp.start_processes(_worker, args=(world_size, folder, fn, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=5.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} gloo ranks running {fn.__name__} did not finish in {timeout_s:.0f} s")
        results = []
        for rank in range(world_size):
            path = Path(folder) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} of {world_size} wrote no result (killed?)")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
        return results
