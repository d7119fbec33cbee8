"""Pinned CPU numerics: the same config, seed and thread count give the same bits on every x86-64 machine we run on.

Why this exists
---------------
PyTorch on x86-64 picks its kernels at run time from the CPU it finds. Three libraries do so
independently, and each one changes the floating-point result of a training run (a different
vector width means a different summation order, different FMA contraction, different
polynomial approximations of ``exp``/``erf``):

* **ATen** (PyTorch's own kernels: element-wise ops, reductions, softmax, LayerNorm, the fused
  optimiser steps) is compiled several times, once per "CPU capability" (``DEFAULT``, ``AVX2``,
  ``AVX512``), and dispatches to the highest one the CPU supports. PyTorch documents the
  ``ATEN_CPU_CAPABILITY`` environment variable (``default``/``avx2``/``avx512``) to cap it
  (PyTorch docs, "torch.backends.cpu.get_cpu_capability"; ``aten/src/ATen/native/DispatchStub``).
* **oneDNN** (``torch.backends.mkldnn``: convolutions, GELU and other eltwise primitives here)
  JIT-compiles kernels for the best ISA it detects; the oneDNN developer guide, "CPU Dispatcher
  Control", documents ``ONEDNN_MAX_CPU_ISA`` (older alias ``DNNL_MAX_CPU_ISA``; the ``ONEDNN_``
  name wins when both are set) to cap it.
* **oneMKL** (PyTorch's BLAS here, ``BLAS_INFO=mkl`` in ``torch.__config__.show()``: every fp32
  matmul/linear/bmm) dispatches per ISA and, unless told otherwise, also picks blocking from the
  cache sizes and may reduce in a thread-dependent order. The oneMKL developer guide, "Conditional
  Numerical Reproducibility (CNR)" / "Specifying Code Branches", documents ``MKL_CBWR``: a code
  branch (e.g. ``AVX2``) plus CNR mode, i.e. "fixed cache sizes, deterministic reductions, and
  static scheduling". Its "Reproducibility Conditions" page adds that the thread count must be
  fixed and that ``MKL_DYNAMIC``/``OMP_DYNAMIC`` should be ``FALSE`` ("especially needed if you
  are running your program on different systems"): with dynamic threading oneMKL may run a call
  on fewer threads than asked, decided from the machine's topology.

All three read their setting once, lazily, at their first use in a process (the first dispatched
ATen kernel or ``get_cpu_capability()`` call, the first oneDNN primitive, the first oneMKL call),
not at ``import torch``. Setting them in ``os.environ`` before that works, but the only robust
place is the environment of a fresh process, which is what :func:`worker_env` builds for the
sweep engine's worker processes. :func:`check_pinning_effective` verifies, from inside such a
process, that the libraries really run under the pinned settings.

What pinning cannot do (see ``results/benchmarks/cpu/numerics.md`` for the measurements):

* A CPU without AVX2 (and FMA) cannot run the AVX2 kernels; ATen then falls back to ``DEFAULT``
  and its results differ. :func:`check_pinning_effective` reports it.
* oneMKL honours an explicit ISA branch only on Intel CPUs: the developer guide notes that on
  non-Intel CPUs ``MKL_CBWR=AVX2`` runs the ``AUTO`` CNR branch instead (measured here: on the AMD
  EPYC development machine the effective branch is ``AUTO``). An AMD and an Intel machine therefore
  run different oneMKL kernels even when both are pinned; only ``MKL_CBWR=COMPATIBLE`` (SSE2) is
  the same branch on both vendors. ``numerics_settings()["mkl_cbwr_effective"]`` records which
  branch a run really had.
* The thread count is part of the result: ATen's parallel reductions and oneDNN split work by
  thread, so 1 and 2 threads give different (each reproducible) numbers.
* OpenBLAS settings (``OPENBLAS_CORETYPE``, ``OPENBLAS_L2_SIZE``) only reach NumPy/SciPy's bundled
  OpenBLAS; PyTorch's BLAS here is oneMKL, so they cannot change training numerics and are left
  alone (some machines set them on purpose).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PINNED_ENV",
    "OVERRIDING_ENV",
    "THREAD_ENV",
    "worker_env",
    "numerics_settings",
    "cpu_info",
    "apply_threads_from_env",
    "check_pinning_effective",
    "mkl_cbwr_effective",
    "onednn_isa",
]

#: The pinned settings of a worker process (values as the libraries spell them).
#:
#: * ``ATEN_CPU_CAPABILITY=avx2``: ATen's kernels are the AVX2 build, not AVX-512 (PyTorch,
#:   ``torch.backends.cpu.get_cpu_capability``). AVX2 is the widest ISA all our x86-64 machines share.
#: * ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN JITs AVX2 kernels at most (oneDNN, "CPU Dispatcher Control").
#: * ``MKL_CBWR=AVX2``: oneMKL in CNR mode on the AVX2 code branch (on Intel CPUs; on AMD oneMKL
#:   uses its ``AUTO`` CNR branch, still with fixed cache sizes, deterministic reductions and static
#:   scheduling; oneMKL, "Specifying Code Branches"). ``STRICT`` was measured to change nothing in
#:   our runs (it only makes ?gemm/?trsm independent of the thread count, which the rest of the
#:   run is not), so it is not added.
#: * ``MKL_DYNAMIC=FALSE``: oneMKL must use exactly the threads it is given; the oneMKL
#:   "Reproducibility Conditions" require it for reproducibility across systems.
PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_DYNAMIC": "FALSE",
}

#: Variables that would override or bypass the pinned ones (older aliases, other dispatch or
#: fp-math switches). :func:`worker_env` removes them in both modes, so a pinned worker runs exactly
#: :data:`PINNED_ENV` and an unpinned one exactly the libraries' defaults, whatever the parent had.
OVERRIDING_ENV: tuple[str, ...] = (
    "DNNL_MAX_CPU_ISA",  # oneDNN's older name for ONEDNN_MAX_CPU_ISA
    "ONEDNN_DEFAULT_FPMATH_MODE",  # oneDNN: BF16/TF32 math inside f32 primitives
    "DNNL_DEFAULT_FPMATH_MODE",
    "MKL_ENABLE_INSTRUCTIONS",  # oneMKL's ISA cap outside CNR mode
    "MKL_DEBUG_CPU_TYPE",  # old oneMKL vendor-dispatch override
)

#: The thread-count variables :func:`worker_env` sets: OpenMP's and oneMKL's pools (read at
#: their start-up) and ``VMOE_TORCH_THREADS``, which :func:`apply_threads_from_env` turns into
#: ``torch.set_num_threads``.
THREAD_ENV: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VMOE_TORCH_THREADS")

# ``torch.backends.cpu.get_cpu_capability()`` names for the ATEN_CPU_CAPABILITY values.
_ATEN_NAMES = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
# mkl_cbwr.h: the branch values mkl_cbwr_get(MKL_CBWR_ALL) returns, and the STRICT flag.
_MKL_BRANCHES = {
    0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
    8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1",
}
_MKL_CBWR_ALL, _MKL_CBWR_STRICT = -1, 0x10000
# /proc/cpuinfo flags that decide which kernels the three libraries dispatch to.
_DISPATCH_FLAG = re.compile(r"^(sse4_1|sse4_2|avx|avx2|fma|f16c|bmi2|avx512.*|amx.*|avx_vnni.*|avx_ne_convert|avx_ifma)$")
_interop_set = False


def worker_env(threads: int, *, pinned: bool = True, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh worker process that trains with ``threads`` threads.

    A copy of ``base`` (default ``os.environ``) with :data:`PINNED_ENV` added when ``pinned``, or
    with those keys removed when not (so "unpinned" means the libraries' own defaults, not whatever
    the parent happened to export); :data:`OVERRIDING_ENV` removed in both cases; and
    ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``VMOE_TORCH_THREADS`` set to ``threads``
    (a fixed thread count is the first oneMKL reproducibility condition, and the result depends on
    it). Other variables (e.g. ``OPENBLAS_*``) pass through unchanged.

    Raises:
        ValueError: ``threads`` is not an int >= 1.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads={threads!r} is invalid; it must be an int >= 1")
    env = dict(os.environ if base is None else base)
    for key in OVERRIDING_ENV:
        env.pop(key, None)
    if pinned:
        env.update(PINNED_ENV)
    else:
        for key in PINNED_ENV:
            env.pop(key, None)
    for key in THREAD_ENV:
        env[key] = str(threads)
    return env


def _torch_cpu_lib() -> ctypes.CDLL | None:
    path = Path(torch.__file__).parent / "lib" / ("libtorch_cpu.so" if sys.platform.startswith("linux") else "")
    if not path.is_file():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def mkl_cbwr_effective() -> str | None:
    """oneMKL's CNR mode as oneMKL itself reports it (``mkl_cbwr_get(MKL_CBWR_ALL)``), e.g. ``"AUTO"``.

    ``"BRANCH_OFF"`` means CNR is off (the default). On non-Intel CPUs an ISA branch request such as
    ``MKL_CBWR=AVX2`` reads back as ``"AUTO"`` (oneMKL's documented fallback). ``",STRICT"`` is
    appended in strict CNR mode. ``None`` where the oneMKL statically linked into PyTorch does not
    export the query (non-Linux builds, builds without MKL).

    Like the libraries themselves, the first call fixes oneMKL's mode from the environment in force
    then: call it only once the environment is final.
    """
    lib = _torch_cpu_lib()
    func = getattr(lib, "mkl_serv_cbwr_get", None) if lib is not None else None
    if func is None:
        return None
    func.restype, func.argtypes = ctypes.c_int, [ctypes.c_int]
    value = int(func(_MKL_CBWR_ALL))
    name = _MKL_BRANCHES.get(value & ~_MKL_CBWR_STRICT, f"UNKNOWN({value & ~_MKL_CBWR_STRICT})")
    return name + (",STRICT" if value & _MKL_CBWR_STRICT else "")


def onednn_isa() -> str | None:
    """The ISA oneDNN dispatches to in this process (its verbose ``isa:`` line), e.g. ``"Intel AVX2"``.

    Runs one tiny GELU (a oneDNN eltwise primitive in PyTorch's CPU build) with oneDNN verbose
    output switched on for that call only (``torch.backends.mkldnn.verbose``), capturing file
    descriptor 1 meanwhile. ``None`` when oneDNN is unavailable or prints nothing parsable.
    Creating the primitive fixes oneDNN's ISA from the environment in force then.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        return None
    text = ""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            os.dup2(tmp.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.gelu(torch.ones(8, 16))
        except (RuntimeError, OSError):
            pass
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    match = re.search(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:([^\n]+)", text)
    if match:
        return match.group(1).strip()
    match = re.search(r"eltwise,jit:([a-z0-9_]+)", text)
    return f"jit:{match.group(1)}" if match else None


def numerics_settings() -> dict[str, Any]:
    """The numerics this process runs under, for a result's manifest.

    Keys: every :data:`PINNED_ENV` name with its value in ``os.environ`` (``None`` when unset);
    ``pinned`` (all of them at their pinned values); ``overriding_env`` (any
    :data:`OVERRIDING_ENV` variable that is set); ``thread_env`` (the :data:`THREAD_ENV` values);
    ``cpu_capability`` (ATen's, ``torch.backends.cpu.get_cpu_capability()``); ``mkl_cbwr_effective``
    (:func:`mkl_cbwr_effective`); ``torch_threads`` and ``torch_interop_threads``;
    ``float32_matmul_precision`` (``"highest"`` keeps fp32 matmuls in fp32; lower values allow
    bf16/tf32 inside them, PyTorch "torch.set_float32_matmul_precision"); ``mkldnn_fp32_precision``;
    ``deterministic_algorithms`` and ``deterministic_algorithms_warn_only``
    (``torch.use_deterministic_algorithms``).

    Reading ATen's capability and oneMKL's mode fixes them for this process: call it after the
    environment is final (in a worker, it always is).
    """
    settings: dict[str, Any] = {key: os.environ.get(key) for key in PINNED_ENV}
    settings["pinned"] = all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
    settings["overriding_env"] = {k: os.environ[k] for k in OVERRIDING_ENV if k in os.environ}
    settings["thread_env"] = {k: os.environ.get(k) for k in THREAD_ENV}
    settings["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    settings["mkl_cbwr_effective"] = mkl_cbwr_effective()
    settings["torch_threads"] = torch.get_num_threads()
    settings["torch_interop_threads"] = torch.get_num_interop_threads()
    settings["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    settings["mkldnn_fp32_precision"] = getattr(matmul, "fp32_precision", None)
    settings["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    settings["deterministic_algorithms_warn_only"] = torch.is_deterministic_algorithms_warn_only_enabled()
    return settings


def _cache_sizes() -> dict[str, str]:
    # oneDNN picks blockings from the detected cache sizes, so they belong to the record too.
    sizes: dict[str, str] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        sizes[name] = size
    return sizes


def cpu_info() -> dict[str, Any]:
    """The CPU, as far as kernel dispatch is concerned.

    ``model``, ``vendor``, ``family``/``model_number`` (``/proc/cpuinfo``), ``dispatch_flags`` (the
    sorted instruction-set flags the libraries dispatch on: sse4_x, avx, avx2, fma, f16c, bmi2,
    avx512*, amx*, avx_vnni...), ``avx2``/``avx512`` booleans, ``hypervisor``, ``cache`` (per level,
    from sysfs), ``logical_cores`` (``os.cpu_count()``) and ``usable_cores`` (this process's CPU
    affinity). Off Linux, ``model`` is ``platform.processor()`` and the flags are empty.
    """
    info: dict[str, Any] = {
        "model": platform.processor() or platform.machine(),
        "vendor": None,
        "family": None,
        "model_number": None,
        "machine": platform.machine(),
        "dispatch_flags": [],
        "avx2": None,
        "avx512": None,
        "hypervisor": None,
        "cache": {},
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n", 1)[0]
    fields: dict[str, str] = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    info.update(
        model=fields.get("model name", info["model"]),
        vendor=fields.get("vendor_id"),
        family=fields.get("cpu family"),
        model_number=fields.get("model"),
        dispatch_flags=sorted(f for f in set(flags) if _DISPATCH_FLAG.match(f)),
        avx2="avx2" in flags and "fma" in flags,
        avx512="avx512f" in flags,
        hypervisor="hypervisor" in flags,
        cache=_cache_sizes(),
    )
    return info


def apply_threads_from_env() -> int:
    """At the top of a worker process: ``torch.set_num_threads($VMOE_TORCH_THREADS)``; return the count in force.

    Also sets the inter-op pool once per process (PyTorch allows that only once, before any
    inter-op work; a refusal is ignored). Without ``VMOE_TORCH_THREADS`` nothing changes.

    Raises:
        ValueError: ``VMOE_TORCH_THREADS`` is set but not an int >= 1.
    """
    global _interop_set
    value = os.environ.get("VMOE_TORCH_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"VMOE_TORCH_THREADS={value!r} is invalid; it must be an int >= 1")
        torch.set_num_threads(threads)
        if not _interop_set:
            _interop_set = True
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError:
                pass  # already set, or inter-op work already started: the intra-op count is what matters
    return torch.get_num_threads()


def check_pinning_effective(*, probe_onednn: bool = True) -> list[str]:
    """What keeps this process from running the pinned numerics it was started for; ``[]`` when fine.

    Only a process whose environment has every :data:`PINNED_ENV` key is expected to be pinned;
    for any other the answer is ``[]``. For a pinned one it checks that each key has its pinned
    value, that no :data:`OVERRIDING_ENV` variable is set, that ATen's capability is the pinned one
    (it is not when a kernel ran before the variable was set, or when the CPU lacks AVX2), that
    oneMKL is in CNR mode (not when oneMKL was used before ``MKL_CBWR`` was set) and, with
    ``probe_onednn``, that oneDNN dispatches to AVX2 (see :func:`onednn_isa`).
    """
    if not all(key in os.environ for key in PINNED_ENV):
        return []
    problems = [
        f"{key}={os.environ[key]!r}, not the pinned {value!r}"
        for key, value in PINNED_ENV.items() if os.environ[key] != value
    ]
    problems += [f"{key}={os.environ[key]!r} is set and may override the pinned settings" for key in OVERRIDING_ENV
                 if key in os.environ]
    wanted = _ATEN_NAMES.get(os.environ["ATEN_CPU_CAPABILITY"].lower())
    actual = torch.backends.cpu.get_cpu_capability()
    if wanted is not None and actual != wanted:
        why = ("this CPU lacks AVX2/FMA" if wanted == "AVX2" and cpu_info().get("avx2") is False
               else "ATen chose its kernels before the variable was set; set it in a fresh process's environment")
        problems.append(f"ATen runs CPU capability {actual}, not {wanted} ({why})")
    cbwr = mkl_cbwr_effective()
    if cbwr is not None and cbwr.split(",")[0] in {"OFF", "BRANCH_OFF"}:
        problems.append(f"oneMKL runs without CNR ({cbwr}) although MKL_CBWR={os.environ['MKL_CBWR']!r}: "
                        "oneMKL was used before the variable was set")
    if probe_onednn:
        isa = onednn_isa()
        want_isa = os.environ["ONEDNN_MAX_CPU_ISA"].upper()
        if isa is not None and want_isa == "AVX2" and ("AVX2" not in isa.upper() or "512" in isa):
            problems.append(f"oneDNN dispatches to {isa!r}, not AVX2: oneDNN was used before ONEDNN_MAX_CPU_ISA was set")
    return problems
