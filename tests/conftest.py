"""Fixtures shared by the test modules that train tiny runs on a synthetic Fashion-MNIST.

A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread", "hermetic_data")`` and sets
``SYNTHETIC_IMAGES = (n_train, n_test)`` for the size of its data (default 300 / 60).
"""

from __future__ import annotations

import pytest

from helpers_foundation import single_torch_thread, use_hermetic_folders, write_fashion_mnist


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the whole module (see ``helpers_foundation.single_torch_thread``)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def data_dir(request, tmp_path_factory):
    """A synthetic Fashion-MNIST (learnable labels) in the Debian IDX layout, sized by the module's SYNTHETIC_IMAGES."""
    n_train, n_test = getattr(request.module, "SYNTHETIC_IMAGES", (300, 60))
    folder = tmp_path_factory.mktemp("fashion-mnist")
    write_fashion_mnist(folder, n_train=n_train, n_test=n_test)
    return folder


@pytest.fixture
def hermetic_data(tmp_path, monkeypatch, data_dir):
    """Data, results and cache in this test's folders (``helpers_foundation.use_hermetic_folders``)."""
    use_hermetic_folders(monkeypatch, data_dir, tmp_path)
