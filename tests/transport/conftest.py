"""Fixtures for transport tests; other packages' tests can use `fednode.transport.testing` directly.

`make_transports(n, topology, **options)` opens n transports of the parametrized kind:

    async def test_x(make_transports):
        async with make_transports(3, "line") as (a, b, c): ...
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest

from fednode.transport.base import Transport
from fednode.transport.testing import TransportKind, open_transports

TRANSPORT_KINDS: list[TransportKind] = ["memory", "libp2p"]

MakeTransports = Callable[..., AbstractAsyncContextManager[list[Transport]]]


@pytest.fixture(params=TRANSPORT_KINDS)
def transport_kind(request: pytest.FixtureRequest) -> TransportKind:
    kind: TransportKind = request.param
    return kind


@pytest.fixture
def make_transports(transport_kind: TransportKind) -> MakeTransports:
    return functools.partial(open_transports, transport_kind)


@pytest.fixture
def live_threads() -> Iterator[Callable[[], set[threading.Thread]]]:
    """Call it to get the threads started since the test began (and still alive)."""
    before = set(threading.enumerate())
    yield lambda: {t for t in threading.enumerate() if t not in before and t.is_alive()}


