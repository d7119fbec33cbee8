"""Every public surface checks its input before work starts (round 2): chapters, CLI, routers, records.

One class per block, several cases each: a bad setting is refused before any worker or training starts, in one line
that names the setting, the bad value and what is allowed; nothing is left behind; the CLI prints one ``error:`` line
(exit 2 for bad input, 1 for failed runs) and never a traceback for bad input. A property test then feeds random
wrong types to the public option fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmoe_lib as vl
from vmoe_lib.chapters import get_chapter
from vmoe_lib.errors import ConfigError, DataUnavailableError
from vmoe_lib.routers import create_router
from vmoe_lib.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmoe_lib", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_error_line(out: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == code, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """Results and cache in a scratch folder; any attempt to start a run fails the test."""
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMOE_REQUIRE_RESULTS", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr("vmoe_lib.results.run_tasks", refuse)
    return tmp_path


# ----------------------------------------------------------------------------- 1. chapter parameters, once, up front
@pytest.mark.parametrize("device, message", [
    ("cuda", "device='cuda' requested but CUDA is not available here"),
    ("cuda:3", "device='cuda:3' requested but"),
    ("tpu", "device='tpu' is not a torch device"),
    ("xla", "device='xla' is not supported"),
    ("meta", "device='meta' is not supported"),
    (3, "device=3 is invalid"),
])
def test_a_device_this_machine_lacks_is_refused_before_any_run(device, message, no_training):
    if str(device).startswith("cuda") and torch.cuda.is_available() and device != "cuda:3":
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_chapter("dense_baselines").run("smoke", device=device, seeds=[0], progress=False)
    assert not list(no_training.rglob("*")), "a refused sweep leaves nothing behind"


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 4096}, "batch_size=4096 is larger than the 2048 training images of this config"),
    ({"model_kwargs": {"num_classes": 100}}, "set ['num_classes']; the training engine sets the classes"),
    ({"image_size": 32}, "image_size=32 does not fit model='vit_pico_patch7_28', which takes 28x28 images"),
    ({"eval_subset": 50000}, "eval_subset=50000 is larger than the 10000 test images"),
    ({"train_subset": 60000}, "train_subset=60000 is larger than the 55000 training images"),
    ({"val_size": 60000}, "val_size=60000 is invalid for dataset='fashion_mnist'"),
    ({"dataset": "cifar10"}, "does not fit model='vit_pico_patch7_28'"),
])
def test_overrides_no_run_can_satisfy_are_refused_before_any_run(overrides, message, no_training):
    with pytest.raises(ConfigError) as err:
        get_chapter("dense_baselines").run("smoke", overrides=overrides, seeds=[0], progress=False)
    assert message in str(err.value) and "make run" in str(err.value)
    assert not list(no_training.rglob("*"))


def test_the_cli_exits_2_on_a_refused_device(tmp_path):
    out = _cli("run", "dense_baselines", "--preset", "smoke", "--device", "tpu", "--seeds", "0",
               env={"VMOE_RESULTS_DIR": str(tmp_path)})
    _one_error_line(out, 2, "device='tpu' is not a torch device")
    assert not list(tmp_path.rglob("*"))


def test_missing_data_is_refused_before_any_worker_starts(no_training, monkeypatch):
    monkeypatch.setenv("VMOE_DATA_DIR", str(no_training / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("vmoe_lib.data._DEBIAN_FASHION_MNIST", no_training / "nowhere")
    monkeypatch.setattr("vmoe_lib.data.Path.home", lambda: no_training / "home")
    with pytest.raises(DataUnavailableError, match="dataset='fashion_mnist' is not available here. Tried: .*To get it"):
        get_chapter("dense_baselines").run("smoke", seeds=[0], progress=False)


# ----------------------------------------------------------------------------- 2. overrides for some runs only
def test_the_readme_example_applies_an_moe_setting_to_the_moe_runs_only(no_training, capsys):
    chapter = get_chapter("routers_bpr")
    plan = chapter.plan("smoke", overrides={"model_kwargs": {"num_experts": 4}})
    plain = chapter.plan("smoke")
    for spec in plan.specs:
        before = plain.spec(spec.name).config.model_kwargs
        expected = {**before, "num_experts": 4} if spec.name != "dense" else before
        assert spec.config.model_kwargs == expected, spec.name
    assert plan.notes and "dense" in plan.notes[0] and "MoE runs only" in plan.notes[0]


@pytest.mark.parametrize("chapter, kwargs", [
    ("placement", {"k": 2, "capacity_factor": 1.25}),
    ("dense_baselines", {"eval_capacity_factor": 2.0}),
    ("dense_baselines", {"num_experts": 4}),
    ("routers_bpr", {"expert_init": "independent"}),
    ("placement", {"expert_dropout": 0.1}),
])
def test_moe_settings_change_moe_runs_and_leave_dense_runs_alone(chapter, kwargs, no_training):
    c = get_chapter(chapter)
    plan, plain = c.plan("smoke", overrides={"model_kwargs": kwargs}), c.plan("smoke")
    for spec in plan.specs:
        moe = spec.config.model.startswith("vmoe_")
        changed = spec.config.model_kwargs != plain.spec(spec.name).config.model_kwargs
        assert changed == moe, spec.name


def test_an_moe_setting_for_a_sweep_without_moe_runs_is_refused(no_training):
    from helpers_foundation import toy_chapter
    from vmoe_lib.chapters.base import Preset

    toy = toy_chapter("toy_dense", {"a": TrainConfig(model="vit_pico_patch7_28")},
                      {"smoke": Preset("smoke", "toy", "CPU", 1, (0,))})
    with pytest.raises(ConfigError, match=r"model_kwargs \['num_experts'\] are MoE settings, and no run of this sweep"):
        toy.plan("smoke", overrides={"model_kwargs": {"num_experts": 4}})


# ----------------------------------------------------------------------------- 3. types, not truthiness
def _router(**options):
    return create_router("softmax_token_choice", dim=8, num_experts=4, k=1, capacity_factor=1.0,
                         eval_capacity_factor=1.0, **options)


@pytest.mark.parametrize("options, message", [
    ({"batch_priority": "no"}, "batch_priority='no' is invalid; it must be True or False"),
    ({"renormalize": "false"}, "renormalize='false' is invalid; it must be True or False"),
    ({"batch_priority": 1}, "batch_priority=1 is invalid"),
    ({"noise_std": "high"}, "noise_std='high' is invalid"),
    ({"capacity_multiple": 1.5}, "capacity_multiple=1.5 is invalid"),
    ({"capacity_rounding": "up"}, "capacity_rounding='up' is not recognised"),
    ({"importance_loss_weight": None}, "importance_loss_weight=None"),
])
def test_router_options_are_type_checked(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _router(**options)


@pytest.mark.parametrize("setting, value, message", [
    ("batch_priority", "yes", "batch_priority='yes' is invalid; it must be True or False"),
    ("k", 1.5, "k=1.5 is invalid; it must be an integer with 1 <= k <= 8"),
    ("k", 9, "k=9 is invalid; it must be an integer with 1 <= k <= 8"),
    ("num_experts", 4, "set_routing: num_experts=4 is not a setting of these routers"),
    ("capacity", 2.5, "capacity=2.5 is invalid"),
    ("eval_capacity_factor", "1", "eval_capacity_factor='1' is invalid"),
    ("noise_std", -1.0, "noise_std=-1.0 is invalid"),
])
def test_set_routing_checks_every_value(setting, value, message):
    model = vl.create_model("vmoe_vit_test_patch7_28", moe_layers="all")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        vl.models.set_routing(model, **{setting: value})


def test_a_setting_the_weights_are_shaped_by_cannot_change_on_a_built_router():
    router = _router()
    for name, value in (("num_experts", 2), ("dim", 16)):
        with pytest.raises(ConfigError, match=f"{name}={value} cannot be set on a built SoftmaxTokenChoiceRouter"):
            setattr(router, name, value)
    router.batch_priority = True  # a routing setting may change
    assert router.batch_priority is True


@pytest.mark.parametrize("options, message", [
    ({"shared_expert": "yes"}, "shared_expert='yes' is invalid"),
    ({"shared_expert_gate": "no"}, "shared_expert_gate='no' is invalid; it must be True or False"),
    ({"routing_leader": 0}, "routing_leader=0 is invalid"),
    ({"group_size": 2.0}, "group_size=2.0 is invalid"),
    ({"expert_dropout": "0.1"}, "expert_dropout='0.1' is out of range"),
])
def test_moe_layer_options_are_type_checked(options, message):
    from vmoe_lib.layers import MoEMlp

    with pytest.raises(ConfigError, match=message):
        MoEMlp(8, 16, num_experts=4, k=1, capacity_factor=1.0, eval_capacity_factor=1.0, **options)


def test_per_image_router_renormalize_is_a_bool():
    with pytest.raises(ConfigError, match="renormalize='no' is invalid"):
        create_router("per_image", dim=8, num_experts=4, k=1, renormalize="no")


# ----------------------------------------------------------------------------- 4. errors name the setting
@pytest.mark.parametrize("args, message", [
    (["run", "dense_baselines", "--preset", "smoke", "--distributed", "0"], "--distributed 0 is invalid; it must be an int >= 1"),
    (["run", "dense_baselines", "--preset", "smoke", "--distributed", "two"], "--distributed two is invalid"),
    (["run", "dense_baselines", "--preset", "smoke", "--distributed", "-2"], "--distributed -2 is invalid"),
    (["run", "dense_baselines", "--preset", "smoke", "--workers", "1.5"], "workers='1.5' is invalid"),
    (["verify", "dense_baselines", "--sample", "100000"], "sample=100000 is larger than the"),
])
def test_the_cli_names_the_flag_that_is_wrong(args, message):
    _one_error_line(_cli(*args), 2, message)


@pytest.mark.parametrize("sample", [0.5, 0, True, "1"])
def test_verify_sample_must_be_a_positive_int(sample):
    from vmoe_lib.verify import verify_chapter

    with pytest.raises(ConfigError, match=f"sample={sample!r} is invalid; it must be an int >= 1"):
        verify_chapter("dense_baselines", "cpu", sample=sample)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "vit_pico_patch7_28", "image_size": 32}, "image_size=32 does not fit model='vit_pico_patch7_28'"),
    ({"model": "vit_nano_patch4_32", "image_size": 28}, "image_size=28 does not fit model='vit_nano_patch4_32'"),
    ({"model": "convnext_zepto_32"}, "the 28x28 images of 'fashion_mnist' are too small for model='convnext_zepto_32'"),
    ({"model": "convnext_zepto_32", "image_size": 16}, "image_size=16 is too small for model='convnext_zepto_32'"),
    ({"model": "vit_pico_patch7_28", "dataset": "cifar100"}, "the 32x32 images of 'cifar100' does not fit"),
])
def test_an_image_size_the_model_cannot_take_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(**kwargs)


# ----------------------------------------------------------------------------- 5. records and the scoreboard
def _verdicts_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "cpu" / "toy"
    folder.mkdir(parents=True)
    (folder / "verdicts.json").write_text(text)
    return tmp_path


@pytest.mark.parametrize("text, message", [
    ("{oops", "cannot be read (JSONDecodeError"),
    ('{"a": 1}', "is not a list of verdict records"),
    ('[{"claim_id": "x", "verdict": "reproduced"}]', "record 0 lacks ['claim', 'min_effect']"),
    ('[{"claim_id": "x", "claim": "c", "verdict": "yes", "min_effect": 1}]', "has verdict='yes'"),
    ("[1, 2]", "is not a list of verdict records"),
])
def test_a_bad_verdicts_file_is_one_line_naming_it_and_the_fix(text, message, tmp_path):
    root = _verdicts_folder(tmp_path, text)
    out = _cli("scoreboard", env={"VMOE_RESULTS_DIR": str(root)})
    _one_error_line(out, 2, message, "verdicts.json", "python -m vmoe_lib run toy --preset cpu")


def test_a_results_folder_that_is_missing_or_a_file(tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    for env in ({"VMOE_RESULTS_DIR": str(tmp_path / "missing")}, {"VMOE_RESULTS_DIR": str(a_file)}):
        _one_error_line(_cli("scoreboard", env=env), 2, "is missing or not a folder")
        _one_error_line(_cli("verify", "dense_baselines", env=env), 2, "is missing or not a folder")


def test_a_record_verify_cannot_read_names_the_file(tmp_path):
    folder = tmp_path / "cpu" / "dense_baselines"
    folder.mkdir(parents=True)
    (folder / "vit_pico_3ep__bb5437cfe4a5__s0.json").write_text("{broken")
    _one_error_line(_cli("verify", "dense_baselines", env={"VMOE_RESULTS_DIR": str(tmp_path)}), 2,
                    "vit_pico_3ep__bb5437cfe4a5__s0.json is not a readable record", "regenerate it")


# ----------------------------------------------------------------------------- 6. options never silently ignored
@pytest.mark.parametrize("flags", [["--partition", "gpu"], ["--gpus-per-job", "1"], ["--no-wait"],
                                   ["--slurm-option", "account=x"], ["--time", "30"], ["--cpus-per-job", "4"]])
def test_slurm_options_without_the_slurm_executor_are_refused(flags):
    out = _cli("run", "dense_baselines", "--preset", "cpu", *flags, env={"VMOE_REQUIRE_RESULTS": "1"})
    _one_error_line(out, 2, f"{flags[0]}: options of the slurm executor, which do nothing with --executor local")


def test_an_image_folder_dataset_needs_its_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("VMOE_IMAGEFOLDER_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"dataset='imagefolder' needs \$VMOE_IMAGEFOLDER_ROOT"):
        TrainConfig(dataset="imagefolder", image_size=28)
    monkeypatch.setenv("VMOE_IMAGEFOLDER_ROOT", str(tmp_path))
    with pytest.raises(ConfigError, match="has no train/ folder"):
        TrainConfig(dataset="imagefolder", image_size=28)


# ----------------------------------------------------------------------------- 7. the CLI boundary
def test_a_missing_result_in_require_mode_is_one_line(tmp_path):
    out = _cli("run", "dense_baselines", "--preset", "smoke", env={"VMOE_REQUIRE_RESULTS": "1",
                                                                   "VMOE_RESULTS_DIR": str(tmp_path)})
    _one_error_line(out, 2, "result(s) of preset 'smoke' are missing or stale", "and ", "regenerate them with")


def test_unavailable_data_is_one_line(tmp_path):
    out = _cli("run", "routers_bpr", "--preset", "gpu", "--seeds", "0", "--device", "cpu",
               env={"VMOE_DATA_DIR": str(tmp_path / "none"), "HF_HUB_OFFLINE": "1", "VMOE_RESULTS_DIR": str(tmp_path)})
    _one_error_line(out, 2, "dataset='cifar100' is not available here")


def test_a_readme_without_the_scoreboard_markers_is_one_line(tmp_path, monkeypatch, capsys):
    from vmoe_lib import __main__ as cli

    (tmp_path / "README.md").write_text("# a README without the scoreboard markers\n")
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(ROOT / "results"))
    monkeypatch.setattr("vmoe_lib.results._repo_root", lambda: tmp_path)
    assert cli.main(["scoreboard", "--write-readme"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "README.md: README has no scoreboard section" in err[0]


def test_failed_runs_exit_1_and_name_each_run(tmp_path):
    # Valid for the real data's sizes, but Fashion-MNIST here is a 40-image synthetic copy: the run fails in its worker.
    from helpers_foundation import write_fashion_mnist

    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=40, n_test=20)
    out = _cli("run", "dense_baselines", "--preset", "smoke", "--seeds", "0", "--executor", "inline",
               "--overrides", json.dumps({"val_size": 10, "epochs": 1}),
               env={"VMOE_DATA_DIR": str(data), "VMOE_RESULTS_DIR": str(tmp_path / "r"),
                    "VMOE_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 1 and "Traceback" not in out.stderr.split("error:")[-1]
    assert "all 4 run(s) failed; nothing was stored" in out.stderr and "batch_size=128" in out.stderr


# ----------------------------------------------------------------------------- property: wrong types never pass
WRONG = st.one_of(st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                  st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.integers(min_value=-5, max_value=-1))

# Public option fields and the values they accept (anything else must be refused with a ConfigError naming it).
TRAIN_FIELDS = {
    "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 55000,
    "lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 < v < float("inf"),
    "augment": lambda v: isinstance(v, bool),
    "flip": lambda v: isinstance(v, bool),
    "amp": lambda v: isinstance(v, bool),
    "label_smoothing": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 0.99,
    "train_subset": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 128 <= v <= 55000),
}
ROUTER_FIELDS = {
    "batch_priority": lambda v: isinstance(v, bool),
    "renormalize": lambda v: isinstance(v, bool),
    "noise_std": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 <= v < float("inf"),
    "capacity_multiple": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "k": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4,
}


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(TRAIN_FIELDS)), value=WRONG)
def test_property_train_config_refuses_wrong_types(field, value):
    if TRAIN_FIELDS[field](value):
        TrainConfig(**{field: value})
        return
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(ROUTER_FIELDS)), value=WRONG)
def test_property_router_settings_refuse_wrong_types(field, value):
    router = _router()
    if ROUTER_FIELDS[field](value):
        setattr(router, field, value)
        return
    with pytest.raises(ConfigError, match=field):
        setattr(router, field, value)
    with pytest.raises(ConfigError, match=field):
        _router(**{field: value}) if field != "k" else create_router(
            "softmax_token_choice", dim=8, num_experts=4, k=value, capacity_factor=1.0, eval_capacity_factor=1.0)
