"""A fresh prefix on the session's SeaweedFS S3 server (the `seaweed` fixture, tests/conftest.py), or a fresh directory, per test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from sidecar.storage.base import Store
from sidecar.storage.local import LocalStore
from tests.storage.seaweed import SeaweedServer


@pytest.fixture
def prefix() -> str:
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> Store:
    """The same behaviour is asked of both homes."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: SeaweedServer = request.getfixturevalue("seaweed")
    return server.store(prefix)
