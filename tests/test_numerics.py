"""vmoe_lib.numerics: worker environments, the manifest's numerics, CPU info, and that pinning takes effect in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmoe_lib import numerics
from vmoe_lib.numerics import (
    OVERRIDING_ENV,
    PINNED_ENV,
    THREAD_ENV,
    apply_threads_from_env,
    check_pinning_effective,
    cpu_info,
    numerics_settings,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pinned_env_caps_all_three_dispatchers():
    assert PINNED_ENV["ATEN_CPU_CAPABILITY"] == "avx2"
    assert PINNED_ENV["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert PINNED_ENV["MKL_CBWR"].split(",")[0] == "AVX2"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in PINNED_ENV.items())


def test_worker_env_pinned_adds_pinned_keys_and_threads():
    base = {"PATH": "/bin", "OPENBLAS_CORETYPE": "Haswell", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "AVX512_CORE"}
    env = worker_env(3, base=base)
    for key, value in PINNED_ENV.items():
        assert env[key] == value
    for key in THREAD_ENV:
        assert env[key] == "3"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["VMOE_TORCH_THREADS"] == "3"
    assert env["PATH"] == "/bin" and env["OPENBLAS_CORETYPE"] == "Haswell"  # others pass through
    assert "DNNL_MAX_CPU_ISA" not in env  # an alias that would fight the pinned value is dropped
    assert base["MKL_CBWR"] == "COMPATIBLE" and "OMP_NUM_THREADS" not in base  # base is not modified


def test_worker_env_unpinned_removes_pinned_keys():
    base = {**PINNED_ENV, "PATH": "/bin", "ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}
    env = worker_env(1, pinned=False, base=base)
    assert not set(PINNED_ENV) & set(env)
    assert not set(OVERRIDING_ENV) & set(env)
    assert env["VMOE_TORCH_THREADS"] == "1" and env["PATH"] == "/bin"


def test_worker_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("VMOE_TEST_MARKER", "x")
    env = worker_env(2)
    assert env["VMOE_TEST_MARKER"] == "x" and env["MKL_NUM_THREADS"] == "2"
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # set on purpose on some machines: left alone
        assert env.get(key) == os.environ.get(key)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_worker_env_rejects_bad_threads(threads):
    with pytest.raises(ValueError, match="threads"):
        worker_env(threads)  # type: ignore[arg-type]


def test_numerics_settings_keys():
    settings = numerics_settings()
    for key in PINNED_ENV:
        assert settings[key] == os.environ.get(key)
    for key in ("pinned", "cpu_capability", "torch_threads", "float32_matmul_precision", "deterministic_algorithms",
                "deterministic_algorithms_warn_only", "mkl_cbwr_effective", "thread_env", "overriding_env"):
        assert key in settings
    assert settings["pinned"] == all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
    assert settings["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert settings["torch_threads"] == torch.get_num_threads()
    assert isinstance(settings["deterministic_algorithms"], bool)
    json.dumps(settings)  # goes into a JSON manifest


def test_cpu_info_on_this_machine():
    info = cpu_info()
    assert info["logical_cores"] == os.cpu_count()
    assert isinstance(info["model"], str) and info["model"]
    assert info["dispatch_flags"] == sorted(info["dispatch_flags"])
    json.dumps(info)
    if Path("/proc/cpuinfo").exists() and platform_is_x86():
        flags = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        assert info["vendor"] and info["vendor"] in flags
        assert info["avx2"] == (" avx2" in flags and " fma" in flags)
        assert info["avx512"] == (" avx512f" in flags)
        assert all(f in flags for f in info["dispatch_flags"])
        assert "sse4_2" in info["dispatch_flags"]


def platform_is_x86() -> bool:
    import platform

    return platform.machine().lower() in {"x86_64", "amd64"}


def test_apply_threads_from_env(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("VMOE_TORCH_THREADS", raising=False)
        assert apply_threads_from_env() == before
        monkeypatch.setenv("VMOE_TORCH_THREADS", "1")
        assert apply_threads_from_env() == 1 == torch.get_num_threads()
        monkeypatch.setenv("VMOE_TORCH_THREADS", "zero")
        with pytest.raises(ValueError, match="VMOE_TORCH_THREADS"):
            apply_threads_from_env()
    finally:
        torch.set_num_threads(before)


def test_check_pinning_effective_empty_when_not_pinned(monkeypatch):
    for key in PINNED_ENV:
        monkeypatch.delenv(key, raising=False)
    assert check_pinning_effective() == []


def test_check_pinning_effective_reports_late_setting(monkeypatch):
    # This process has run ATen kernels already, so setting the variables now is too late for ATen.
    torch.ones(8).sum()
    for key, value in PINNED_ENV.items():
        monkeypatch.setenv(key, value)
    problems = check_pinning_effective(probe_onednn=False)
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        assert any("ATen runs CPU capability" in p for p in problems)
    monkeypatch.setenv("MKL_CBWR", "SSE4_2")
    assert any("MKL_CBWR='SSE4_2', not the pinned" in p for p in check_pinning_effective(probe_onednn=False))


# The module is loaded from its file, not through ``vmoe_lib/__init__`` (which imports timm and the
# models): the probe then starts in ~2 s instead of ~8 s.
_PROBE = (
    "import importlib.util, json, sys, torch\n"
    f"spec = importlib.util.spec_from_file_location('_numerics', {str(ROOT / 'vmoe_lib' / 'numerics.py')!r})\n"
    "n = importlib.util.module_from_spec(spec); spec.loader.exec_module(n)\n"
    "threads = n.apply_threads_from_env()\n"
    "problems = n.check_pinning_effective()\n"
    "s = n.numerics_settings()\n"
    "print(json.dumps({'cap': torch.backends.cpu.get_cpu_capability(), 'problems': problems, 'threads': threads,"
    " 'pinned': s['pinned'], 'mkl': s['mkl_cbwr_effective']}))\n"
)


def _probe(pinned: bool) -> dict:
    env = worker_env(1, pinned=pinned)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not platform_is_x86(), reason="the pinned settings are x86-64 dispatch caps")
def test_fresh_processes_pinned_and_unpinned():
    info = cpu_info()
    if info["avx2"] is False:
        pytest.skip("this CPU lacks AVX2: pinned runs cannot match the other machines (see vmoe_lib.numerics)")
    pinned = _probe(True)
    assert pinned["cap"] == "AVX2"
    assert pinned["problems"] == []
    assert pinned["pinned"] is True and pinned["threads"] == 1
    if pinned["mkl"] is not None:
        assert pinned["mkl"].split(",")[0] in {"AVX2", "AUTO"}  # AUTO: oneMKL's branch on non-Intel CPUs
    unpinned = _probe(False)
    assert unpinned["pinned"] is False and unpinned["problems"] == []
    if unpinned["mkl"] is not None:
        assert unpinned["mkl"] == "BRANCH_OFF"
    if info["avx512"]:
        assert unpinned["cap"] == "AVX512"


def test_module_documents_why():
    for obj in (numerics, worker_env, numerics_settings, cpu_info, apply_threads_from_env, check_pinning_effective):
        assert obj.__doc__ and len(obj.__doc__) > 80
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        assert name in numerics.__doc__
