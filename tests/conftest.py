"""Shared pytest setup for the whole suite.

The suite must never depend on what happens to be cached on the developer's machine,
so every test session gets private, empty caches (torch's and napari-lvunet's weights
and ONNX cache), and random draws are seeded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point torch's and napari-lvunet's caches at an empty session folder.

    A test that passes only because a file was already cached on the developer's
    machine would fail on a clean CI clone; an empty cache makes both behave alike.
    """
    root = tmp_path_factory.mktemp("caches")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root / "torch"))
    mp.setenv("NAPARI_LVUNET_CACHE", str(root / "napari-lvunet"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _private_models_folder(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Give every test its own, empty model-versions folder.

    A version accepted (made current) in one widget test would otherwise become the model
    every later widget in the session starts on.
    """
    monkeypatch.setenv("NAPARI_LVUNET_MODELS", str(tmp_path / "lvunet-models"))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Make every test's random draws reproducible.

    torch is seeded only when a test module has already imported it: importing it here
    would load torch (and triton) before any napari viewer in the whole session, and so
    hide the import-order crashes a user meets (issue 9: torchvision imported after
    Mesa's OpenGL driver segfaults).
    """
    import sys

    import numpy as np

    np.random.seed(0)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
