from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .mock_server import MockServer, MockState


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny byte-level BPE tokenizer of tests/tiny_models.py, trained once per session."""
    from tests.tiny_models import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockServer]:
    with MockServer(MockState()) as server:
        yield server


@pytest.fixture
def mock(mock_server: MockServer) -> Iterator[MockServer]:
    """The module's server with its state reset for this test."""
    s = mock_server.state
    s.ttft_s, s.itl_s, s.ttft_per_stream_s, s.send_usage = 0.05, 0.01, 0.0, True
    s.requests.clear()
    s.peak_in_flight = 0
    yield mock_server
