"""fednode: peer-to-peer federated fine-tuning of LoRA adapters.

Public names are loaded lazily (module `__getattr__`), so `import fednode.wire` stays light:
`fednode.FedLearnCoordinator` imports the coordinator (and, when it aggregates, torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FedLearnCoordinator": "fednode.coordinator",
    "ParticipantSubmission": "fednode.coordinator",
    "RoundManifest": "fednode.wire.messages",
    "RoundID": "fednode.wire.messages",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fednode' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
