"""conftest.py for running timm's own model tests against the ``vmoe_*`` models.

timm's ``tests/test_models.py`` lists models from the registry when it is imported, so the
``vmoe_*`` models must be registered first: this file imports ``vmoe_lib``. It also marks each
(test, model) pair named in :data:`vmoe_lib.models.timm_contract.TIMM_CONTRACT_EXCLUSIONS` as
``xfail(strict=True)`` with its reason, so the run reports every exclusion by name and fails if an
excluded test starts to pass (then the exclusion should go). Nothing of timm's suite is changed.

Usage (timm's test file at the tag of the installed timm, see README "timm's model contract")::

    mkdir -p /tmp/timm_tests && cp scripts/timm_suite_conftest.py /tmp/timm_tests/conftest.py
    git --git-dir=<timm checkout>/.git show v<timm version>:tests/test_models.py > /tmp/timm_tests/test_models.py
    PYTHONPATH=$PWD python -m pytest /tmp/timm_tests/test_models.py -k vmoe -rA
"""

from __future__ import annotations

import re

import pytest

import vmoe_lib  # noqa: F401  (registers the vmoe_* models with timm)
from vmoe_lib.models.timm_contract import excluded_from

_MODEL_PARAM = re.compile(r"\b(vmoe_[A-Za-z0-9_]+)\b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        found = _MODEL_PARAM.search(item.name)
        exclusion = excluded_from(item.originalname, found.group(1)) if found else None
        if exclusion is not None:
            item.add_marker(pytest.mark.xfail(strict=True, raises=exclusion.raises, reason=exclusion.reason))
