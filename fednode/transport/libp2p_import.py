"""Importing py-libp2p without the features fednode never turns on (issue 12: start-up CPU).

`import libp2p` (0.8.1) imports every feature it ships, whether a host uses it or not: the QUIC
and WebTransport transports (aioquic, pyOpenSSL), AutoTLS (an ACME client: httpx with its CLI,
rich, pygments, click; requests, urllib3), mDNS (zeroconf) and circuit relay v2 (netaddr, kad-dht,
bitswap). dnspython, which multiaddr uses for /dns addresses, adds aioquic again for DNS over QUIC.
Measured here: the import is most of a fake-task daemon's start-up CPU (py-spy), and leaving these
features out cuts that start by about a third (`python scripts/bench_start.py`: 1.73 s of CPU
against 2.56 s, 5 starts each).

`install()` (called by `fednode.transport`, before any fednode module imports libp2p) puts a finder
first on `sys.meta_path`. The first time libp2p is imported, it turns dnspython's DNS over QUIC off
(`dns._features.force`, dnspython's own switch for this) and from then on answers for the packages
in `UNUSED_LIBP2P_FEATURES` with a stand-in module: every name imported from it is a placeholder
class. A placeholder may appear in a type hint, an `isinstance` check or an `except` clause (it is
an Exception subclass that nothing raises); calling or instantiating it raises `FeatureNotLoaded`,
which names the feature and how to load it. So a code path that does use one of these features
fails loudly, never silently.

fednode's hosts use TCP, Noise, yamux and gossipsub only (`fednode/transport/libp2p_host.py`).
The work on members behind NAT will need circuit relay: it removes `libp2p.relay` from that dict.

Nothing is trimmed when libp2p was imported before `install()`, when the installed libp2p is not
the version this list was made for (`TRIMMED_FOR_VERSION`), or when the environment sets
FEDNODE_LIBP2P_FULL_IMPORT=1.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

FULL_IMPORT_ENV = "FEDNODE_LIBP2P_FULL_IMPORT"
TRIMMED_FOR_VERSION = "0.8.1"  # the pinned py-libp2p (pyproject.toml); another version imports in full

# package prefix -> what it is (fednode enables none of them)
UNUSED_LIBP2P_FEATURES: dict[str, str] = {
    "libp2p.transport.quic": "the QUIC transport",
    "libp2p.transport.webtransport": "the WebTransport transport",
    "libp2p.security.tls.autotls": "AutoTLS (ACME certificates)",
    "libp2p.discovery.mdns": "mDNS discovery",
    "libp2p.relay": "circuit relay v2",
}


class FeatureNotLoaded(RuntimeError):
    """A py-libp2p feature that fednode leaves out of its import was used."""


class _Placeholder(Exception):
    """Stands for a class or function of a left-out feature; see the module docstring."""

    _feature = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise FeatureNotLoaded(
            f"{type(self).__module__}.{type(self).__qualname__} belongs to {self._feature}, which fednode "
            f"does not load (fednode/transport/libp2p_import.py); set {FULL_IMPORT_ENV}=1 to load all of py-libp2p")


class _StandIn(types.ModuleType):
    def __init__(self, name: str, feature: str) -> None:
        super().__init__(name, f"stand-in for {feature}: not loaded by fednode")
        self.__path__: list[str] = []  # a package: its submodules are stand-ins too
        self._feature = feature

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Placeholder,), {"__module__": self.__name__, "__qualname__": name,
                                             "_feature": self._feature})
        setattr(self, name, value)
        return value


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, feature: str) -> None:
        self.feature = feature

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandIn(spec.name, self.feature)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _TrimmingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, features: dict[str, str]) -> None:
        self.features = features
        self.active: bool | None = None  # decided at the first import of libp2p

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name == "libp2p" and self.active is None:
            self.active = _libp2p_version() == TRIMMED_FOR_VERSION
            if self.active:
                _no_dns_over_quic()
            return None
        if not self.active or not name.startswith("libp2p."):
            return None
        for prefix, feature in self.features.items():
            if name == prefix or name.startswith(prefix + "."):
                return importlib.machinery.ModuleSpec(name, _StandInLoader(feature), is_package=True)
        return None


def _libp2p_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libp2p")
    except metadata.PackageNotFoundError:
        return None


def _no_dns_over_quic() -> None:
    try:
        import dns._features
    except ImportError:
        return
    dns._features.force("doq", False)


def install() -> bool:
    """Trim py-libp2p's import in this process; False when it cannot (see the module docstring)."""
    if os.environ.get(FULL_IMPORT_ENV, "") not in ("", "0") or "libp2p" in sys.modules:
        return False
    if not any(isinstance(f, _TrimmingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrimmingFinder(UNUSED_LIBP2P_FEATURES))
    return True


def trimmed() -> list[str]:
    """The left-out packages that this process answered with a stand-in."""
    return sorted(name for name, m in sys.modules.items() if isinstance(m, _StandIn))
