"""Trainer tests share one tokenizer/token-stream cache per session, outside the user's ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))
