"""Fixtures of the client's own tests: fake servers, nothing of tokenwire_server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_respond import FakeServer


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture
def fake_b() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()
