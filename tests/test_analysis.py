"""The tables chapters print, computed from stored runs, and per-image outcomes read back from a record."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vmoe_lib.analysis import correct_of, final_metric, runs_table, summary_table
from vmoe_lib.predictions import pack_predictions
from vmoe_lib.results import RunResult
from vmoe_lib.train import TrainConfig


# ---------------------------------------------------------------------------
# Tables


def _result(name: str, seed: int, test_acc: float, val_acc: float, *, model="vit_test_patch7_28", ips=(100.0, 300.0), wall=10.0,
            image_size=None):
    record = {
        "history": [{"epoch": i + 1, "train_images_per_second": x} for i, x in enumerate(ips)],
        "final": {"test_accuracy": test_acc, "val_accuracy": val_acc, "test_loss": 1.0 - test_acc},
        "costs": {"params_total": 1000, "params_activated": 400, "flops_per_image": 5e5},
        "wall_time_s": wall,
    }
    return RunResult(name, seed, TrainConfig(model=model, image_size=image_size), record, {}, Path(f"/nowhere/{name}__s{seed}.json"))


RESULTS = [
    _result("vit", 0, 0.50, 0.60, wall=10.0),
    _result("vit", 1, 0.75, 0.60, wall=20.0),
    _result("vit", 2, 1.00, 0.60, wall=30.0),
    _result("conv", 0, 0.25, 0.30, model="convnext_test_32", ips=(50.0, 50.0), image_size=32),
    _result("conv", 1, 0.75, 0.50, model="convnext_test_32", ips=(50.0, 50.0), image_size=32),
]


def test_final_metric():
    assert final_metric(RESULTS[1]) == 0.75 and final_metric(RESULTS[1], "val_accuracy") == 0.60


def test_runs_table():
    df = runs_table(RESULTS)
    assert list(df["run"]) == ["vit"] * 3 + ["conv"] * 2 and list(df["seed"]) == [0, 1, 2, 0, 1]
    assert list(df["model"]) == ["vit_test_patch7_28"] * 3 + ["convnext_test_32"] * 2
    assert list(df["test_accuracy"]) == [0.5, 0.75, 1.0, 0.25, 0.75]
    assert list(df["images_per_s"]) == [200.0] * 3 + [50.0] * 2  # mean over epochs
    assert list(df["wall_time_s"]) == [10.0, 20.0, 30.0, 10.0, 10.0]
    assert set(df.columns) >= {"test_loss", "params_total", "params_activated", "flops_per_image"}


def test_summary_table_golden():
    df = summary_table(RESULTS)
    assert list(df.index) == ["vit", "conv"]  # sweep order, not alphabetical
    assert list(df.columns) == [
        "seeds", "test_accuracy_mean", "test_accuracy_std", "val_accuracy_mean", "val_accuracy_std",
        "params_total", "params_activated", "flops_per_image", "images_per_s", "images_per_s_best", "wall_time_s",
    ]
    vit, conv = df.loc["vit"], df.loc["conv"]
    # vit: test [0.5, 0.75, 1.0] -> mean 0.75, sample std sqrt((0.0625 + 0 + 0.0625) / 2) = 0.25.
    assert vit["seeds"] == 3
    assert vit["test_accuracy_mean"] == pytest.approx(0.75) and vit["test_accuracy_std"] == pytest.approx(0.25)
    assert vit["val_accuracy_std"] == pytest.approx(0.0) and vit["wall_time_s"] == pytest.approx(20.0)
    # per-epoch throughput (100, 300): median 200, best 300
    assert vit["images_per_s"] == pytest.approx(200.0) and vit["images_per_s_best"] == pytest.approx(300.0)
    # conv: test [0.25, 0.75] -> mean 0.5, std sqrt(2 * 0.0625 / 1) = 0.353553.
    assert conv["seeds"] == 2 and conv["test_accuracy_std"] == pytest.approx(math.sqrt(0.125))
    assert conv["val_accuracy_mean"] == pytest.approx(0.4) and conv["images_per_s"] == pytest.approx(50.0)
    assert vit["params_activated"] == 400


def test_summary_table_other_metrics():
    df = summary_table(RESULTS, metrics=("test_loss",))
    assert df.loc["vit", "test_loss_mean"] == pytest.approx(0.25) and "test_accuracy_mean" not in df.columns


def test_correct_of_reads_the_stored_predictions():
    r = _result("vit", 0, 0.5, 0.5)
    with pytest.raises(ValueError, match="no per-image predictions"):
        correct_of(r)
    r.record["predictions"] = pack_predictions(np.array([1, 2, 3, 3]), np.array([1, 0, 3, 2]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert correct_of(r).tolist() == [True, False, True, False]
