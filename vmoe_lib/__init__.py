"""vmoe_lib: Vision Mixture-of-Experts, reproduced in PyTorch.

The book's chapters call this one namespace (``import vmoe_lib as vl``):

* ``vl.data`` — datasets in memory and a fast tensor loader;
* ``vl.models`` — dense and MoE backbones registered with timm;
* ``vl.train`` — :class:`~vmoe_lib.train.TrainConfig` and :func:`~vmoe_lib.train.train_model`;
* ``vl.results`` — :func:`~vmoe_lib.results.load_or_run`, the results of record;
* ``vl.analysis`` and ``vl.plots`` — tables and figures;
* ``vl.stats`` — pre-registered claims, their tests and the rule that decides them;
* ``vl.papers`` — the papers the book re-tests, and the number each claim is read against;
* ``vl.predictions`` — per-image test predictions stored with every run;
* ``vl.calibration`` — log-likelihood, calibration error and ensembles of stored predictions;
* ``vl.chapters`` — one experiment module per chapter (presets, sweep, analysis).
"""

from ._version import __version__
from . import errors, models, data, costs, train, results, predictions, calibration, stats, papers, analysis, plots, chapters, book
from .models import create_model, list_models
from .train import TrainConfig, train_model
from .results import load_or_run

__all__ = [
    "__version__",
    "errors", "models", "data", "costs", "train", "results", "predictions", "calibration", "stats", "papers", "analysis", "plots", "chapters",
    "book",
    "create_model", "list_models", "TrainConfig", "train_model", "load_or_run",
]
