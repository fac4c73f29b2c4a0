"""Suite-wide collection order: the multi-process scenarios (marker `slow`) run first.

./scripts/test runs pytest on two processes (pytest-xdist, `--dist load --maxschedchunk 1`: each worker
takes the next test when it is done). Starting the minute-long scenarios first and finishing with the
many short tests keeps both workers busy to the end, instead of one worker starting a long scenario
while the other has nothing left (longest-first list scheduling). In one process the order changes
nothing but the order."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: same order within each part
