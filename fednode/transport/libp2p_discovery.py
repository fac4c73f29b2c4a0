"""Peer discovery and link upkeep for the libp2p transport (part of the libp2p adapter).

Choice: a tiny peer-exchange protocol of our own, `/fednode/peers/1.0.0`, not gossipsub PX
(py-libp2p 0.8.1 sends PX only on PRUNE, i.e. only once a mesh is over-full, so small
communities would never learn of each other) and not Kademlia (heavy, and nothing else needs
it). The dialler opens a stream and reads one msgpack array of at most `max_peers` entries
`[peer_id, [multiaddr, ...]]` (at most 8 addresses each, 64 KiB in all); the server writes the
peers it is connected to, with the addresses their identify exchange announced (one announced on
0.0.0.0 / :: is rewritten to the IP their connection comes from: `dialable_addrs`), then closes.

Upkeep (`maintain_links`), every `interval` seconds: dial bootstrap addresses that are not
connected, concurrently, each with exponential backoff (min..max) after a failure; while below
`target_peers`, ask one connected peer for its peers (less often while that teaches nothing new:
`ExchangePacer`) and dial peers learned that way (same backoff). A dropped link to a bootstrap peer
is therefore re-dialled with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from fednode.transport.deadline import TooManyPendingCalls
from fednode.transport.libp2p_host import protocol
from fednode.transport.libp2p_stream import PEER_GONE as _PEER_GONE

if TYPE_CHECKING:  # trio-typing's stubs shadow trio's own annotations under mypy
    from trio_typing import TaskStatus

# call_by_deadline bound to the transport's nursery and pending calls: (call, timeout) -> result
DeadlineRunner = Callable[[Callable[[], Awaitable[dict[ID, list[Multiaddr]]]], float],
                          Awaitable[dict[ID, list[Multiaddr]]]]

PEER_EXCHANGE_PROTOCOL = protocol("/fednode/peers/1.0.0")
MAX_ADDRS_PER_PEER = 8
MAX_RESPONSE_BYTES = 64 * 1024
MAX_CONCURRENT_DIALS = 32
ADDRESS_LOOKUP_PEERS = 8  # connected peers asked at once for the address of a peer we must dial
LEARNED_ADDR_TTL_SECONDS = 600  # how long the peerstore keeps an address learned by peer exchange
# An exchange that taught nothing new doubles the wait before the next one, from `interval` up to
# this; news or a lost link brings it back to `interval`. Asking every 2 s for ever in a community of
# fewer than `target_peers` was a new stream every cycle: about 15% of an idle daemon's CPU (py-spy).
PEER_EXCHANGE_MAX_INTERVAL = 60.0
DIAL_FAILURE_LOG_EVERY = 10  # a peer's repeated dial failures are logged at INFO once per this many
PEER_EXCHANGE_SERVE_TIMEOUT = 10.0  # seconds an answer may take to leave before the stream is reset

logger = logging.getLogger("fednode.transport.libp2p")


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, low: float, high: float) -> None:
        self.failures += 1
        delay = min(high, low * math.pow(2, self.failures - 1))
        self.not_before = now + delay * random.uniform(0.8, 1.2)

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0


@dataclass(slots=True)
class ExchangePacer:
    """When to ask for peers next: every `interval` while that teaches something, else less often."""

    interval: float
    max_interval: float = PEER_EXCHANGE_MAX_INTERVAL
    wait: float = 0.0  # the current spacing; 0 until the first exchange
    next_at: float = 0.0
    connected: int = 0  # connected peers when last asked

    def due(self, now: float, connected: int) -> bool:
        if connected < self.connected:  # a link was lost: what others know may replace it
            self.wait, self.next_at = 0.0, now
        self.connected = connected
        return now >= self.next_at

    def asked(self, now: float, learned_something: bool) -> None:
        if learned_something or self.wait == 0.0:
            self.wait = self.interval
        else:
            self.wait = min(self.max_interval, 2.0 * self.wait)
        self.next_at = now + self.wait


@dataclass(slots=True)
class DiscoveryState:
    bootstrap: list[PeerInfo]
    known: dict[ID, list[Multiaddr]] = field(default_factory=dict)
    backoff: dict[ID, _Backoff] = field(default_factory=dict)
    dials_ok: int = 0
    dials_failed: int = 0
    exchanges: int = 0  # peer-exchange round trips asked for
    runner: DeadlineRunner | None = None  # the transport's call_by_deadline, once it runs


def parse_bootstrap(addrs: list[str]) -> list[PeerInfo]:
    """Multiaddrs with a /p2p/<peer id> suffix; ValueError names the bad one."""
    infos = []
    for addr in addrs:
        try:
            infos.append(info_from_p2p_addr(Multiaddr(addr)))
        except Exception as exc:
            raise ValueError(f"bootstrap address {addr!r} is not a multiaddr ending in /p2p/<peer id>") from exc
    return infos


def make_peer_exchange_handler(
    host: IHost, max_peers: int, on_failure: Callable[[str], None] = lambda reason: None,
    timeout: float = PEER_EXCHANGE_SERVE_TIMEOUT,
) -> Callable[[INetStream], Awaitable[None]]:
    """The server side. It reads nothing from the asker, so garbage or an oversize request costs
    nothing; an asker that closes early or never reads is counted (`on_failure(reason)`:
    peer_gone, timeout, internal_error) and never reaches the host."""

    async def handle(stream: INetStream) -> None:
        # An exception escaping a py-libp2p stream handler tears down the whole host: catch all.
        try:
            with trio.fail_after(timeout):
                await answer(stream)
        except trio.TooSlowError:
            on_failure("timeout")
            logger.info("peer exchange answer to %s timed out after %.1f s", _requester(stream), timeout)
            with contextlib.suppress(Exception):
                await stream.reset()
        except _PEER_GONE as exc:
            on_failure("peer_gone")
            logger.debug("peer exchange answer to %s failed: %r", _requester(stream), exc)
            with contextlib.suppress(Exception):
                await stream.reset()
        except Exception:
            on_failure("internal_error")
            logger.exception("peer exchange answer to %s failed", _requester(stream))
            with contextlib.suppress(Exception):
                await stream.reset()

    async def answer(stream: INetStream) -> None:
        requester = stream.muxed_conn.peer_id
        entries = []
        for peer_id, conns in list(host.get_network().connections.items()):
            if peer_id == requester:
                continue
            try:
                known = host.get_peerstore().addrs(peer_id)
            except Exception:  # PeerStoreError: no addresses (yet) for a connected peer
                continue
            addrs = dialable_addrs([str(a) for a in known], _observed_ip(conns))[:MAX_ADDRS_PER_PEER]
            if addrs:
                entries.append([peer_id.to_base58(), addrs])
            if len(entries) >= max_peers:
                break
        await stream.write(msgpack.packb(entries))
        await stream.close()

    return handle


_WILDCARDS = {"/ip4/0.0.0.0/": "/ip4/", "/ip6/::/": "/ip6/"}


def dialable_addrs(addrs: list[str], observed_ip: str | None) -> list[str]:
    """The addresses to pass on for a peer: one it announced on a wildcard (a node listening on
    0.0.0.0 announces /ip4/0.0.0.0/tcp/<port>, which nobody else can dial) becomes the IP we see
    its connection come from, with the announced port; without an observed IP of that family it
    is left out. Order kept, duplicates dropped."""
    out: list[str] = []
    for addr in addrs:
        for wildcard, family in _WILDCARDS.items():
            if addr.startswith(wildcard):
                fits = observed_ip is not None and (":" in observed_ip) == (family == "/ip6/")
                addr = f"{family}{observed_ip}/{addr[len(wildcard):]}" if fits else ""
                break
        if addr and addr not in out:
            out.append(addr)
    return out


def _observed_ip(conns: object) -> str | None:
    for conn in conns if isinstance(conns, list) else ():
        try:
            remote = conn.muxed_conn.get_remote_address()
        except Exception:  # py-libp2p raises many types once a connection is closing
            continue
        if isinstance(remote, tuple) and remote and isinstance(remote[0], str):
            return remote[0]
    return None


def _short(exc: BaseException) -> str:
    """One line for a dial error: py-libp2p wraps the cause in several layers of messages."""
    def line(e: BaseException) -> str:
        return (str(e) or e.__class__.__name__).splitlines()[0]

    root = exc
    while root.__cause__ is not None:  # the innermost cause says what happened (e.g. refused)
        root = root.__cause__
    text = line(exc) if root is exc else f"{line(exc)}: {line(root)}"
    return text[:300]


def _requester(stream: INetStream) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except Exception:
        return "?"


def parse_peer_exchange(data: bytes, max_peers: int) -> dict[ID, list[Multiaddr]]:
    """An answer as protocols/peer-exchange-v1.md says a client reads it: nothing from an answer
    over MAX_RESPONSE_BYTES or that is not one msgpack array; of its first `max_peers` entries,
    each `[peer id str, [multiaddr str, ...]]` whose id and first MAX_ADDRS_PER_PEER addresses
    parse; any other entry is skipped."""
    if len(data) > MAX_RESPONSE_BYTES:
        return {}
    try:
        entries = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises ValueError, TypeError and its own types
        return {}
    if not isinstance(entries, list):
        return {}
    found: dict[ID, list[Multiaddr]] = {}
    for entry in entries[:max_peers]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and all(isinstance(a, str) for a in entry[1])):
            continue
        try:
            found[_peer_id(entry[0])] = [Multiaddr(a) for a in entry[1][:MAX_ADDRS_PER_PEER]]
        except Exception:  # not a peer id or not a multiaddr: skip the entry
            continue
    return found


def _peer_id(text: str) -> ID:
    """A base58btc peer id that is a whole multihash: identity (00) or sha2-256 (12), length right."""
    peer = ID.from_base58(text)
    raw = peer.to_bytes()
    if len(raw) < 2 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2:
        raise ValueError(f"{text!r} is not a libp2p peer id")
    return peer


async def ask_for_peers(host: IHost, peer_id: ID, max_peers: int, timeout: float,
                        runner: DeadlineRunner | None = None) -> dict[ID, list[Multiaddr]]:
    """One peer-exchange round trip; {} on any failure (bad answers are the peer's problem).
    With `runner` (the transport's `call_by_deadline`), a py-libp2p call that ignores the deadline
    cannot hold the caller, which may be link upkeep itself (fednode/transport/deadline.py)."""

    async def exchange() -> dict[ID, list[Multiaddr]]:
        try:
            stream = await host.new_stream(peer_id, [PEER_EXCHANGE_PROTOCOL])
            data = b""
            while len(data) <= MAX_RESPONSE_BYTES:
                try:
                    chunk = await stream.read(MAX_RESPONSE_BYTES)
                except Exception:
                    break
                if not chunk:
                    break
                data += chunk
            await stream.close()
            return parse_peer_exchange(data, max_peers)
        except Exception as exc:
            logger.debug("peer exchange with %s failed: %r", peer_id, exc)
            return {}

    if runner is None:
        with trio.move_on_after(timeout):
            return await exchange()
        return {}
    try:
        return await runner(exchange, timeout)
    except (trio.TooSlowError, trio.ClosedResourceError, TooManyPendingCalls) as exc:
        logger.debug("peer exchange with %s failed: %r", peer_id, exc)
        return {}


def _has_addrs(host: IHost, peer_id: ID) -> bool:
    try:
        return bool(host.get_peerstore().addrs(peer_id))
    except Exception:  # py-libp2p raises PeerStoreError for a peer it has no record of
        return False


async def find_addresses(host: IHost, state: DiscoveryState, target: ID, *, max_peers: int, timeout: float,
                         ask: int = ADDRESS_LOOKUP_PEERS) -> bool:
    """Make sure the peerstore holds addresses for `target`, a peer we hold no connection to (so
    that a stream to it can dial): from what peer exchange taught us, else by asking up to `ask`
    connected peers at once whom they are connected to. False: nobody we asked knows it.

    A node with `target_peers` connections never asks for peers, so it could not dial a member it
    was not linked to: at 32 daemons the coordinator (16 links) could fetch no update from two
    members, and every round failed (issue 12)."""
    if _has_addrs(host, target):
        return True
    if target not in state.known:
        me = host.get_id()
        connected = [p for p, conns in host.get_network().connections.items() if conns and p not in (me, target)]

        async def ask_one(peer: ID) -> None:
            state.known.update(await ask_for_peers(host, peer, max_peers, timeout, state.runner))

        async with trio.open_nursery() as nursery:
            for peer in random.sample(connected, min(ask, len(connected))):
                nursery.start_soon(ask_one, peer)
        state.exchanges += min(ask, len(connected))
    addrs = state.known.get(target)
    if not addrs:
        return False
    host.get_peerstore().add_addrs(target, addrs, LEARNED_ADDR_TTL_SECONDS)
    return True


def forget_addresses(host: IHost, state: DiscoveryState, target: ID) -> None:
    """Drop what we know of `target`'s addresses (peerstore and peer exchange), after a failed dial."""
    state.known.pop(target, None)
    with contextlib.suppress(Exception):  # py-libp2p raises PeerStoreError for a peer it has no record of
        host.get_peerstore().clear_addrs(target)


def pick_peers_to_dial(candidates: list[PeerInfo], room: int, rng: random.Random | None = None) -> list[PeerInfo]:
    """At most `room` of the learned peers, chosen at random. Taking the first ones learned made every
    joiner dial the same earliest members: at 32 daemons the first 8 held 31 connections each and the
    other 24 only links to them, so the hubs' gossip meshes (at most D_hi = 12) could not hold everyone
    and late members went unheard for 15 s at a time (issue 12)."""
    if room <= 0:
        return []
    return (rng or random).sample(candidates, min(room, len(candidates)))


async def maintain_links(
    host: IHost,
    state: DiscoveryState,
    *,
    interval: float,
    dial_timeout: float,
    backoff_min: float,
    backoff_max: float,
    target_peers: int,
    peer_exchange: bool,
    max_peers: int,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    me = host.get_id()
    in_flight: dict[ID, float] = {}  # peer -> when its dial started

    async def dial(info: PeerInfo) -> None:
        backoff = state.backoff.setdefault(info.peer_id, _Backoff())
        started = in_flight[info.peer_id] = trio.current_time()
        try:
            with trio.fail_after(dial_timeout):
                await host.connect(info)
        except Exception as exc:
            state.dials_failed += 1
            backoff.failed(trio.current_time(), backoff_min, backoff_max)
            # Expected while a peer is not up yet: said once at INFO (then every DIAL_FAILURE_LOG_EVERY-th)
            level = logging.INFO if backoff.failures % DIAL_FAILURE_LOG_EVERY == 1 else logging.DEBUG
            logger.log(level, "dial %s failed (%d in a row): %s; will retry with backoff (at most %g s apart)",
                       info.peer_id, backoff.failures, _short(exc), backoff_max)
        else:
            state.dials_ok += 1
            if backoff.failures:
                logger.info("dial %s succeeded after %d failed attempts", info.peer_id, backoff.failures)
            backoff.succeeded()
        finally:
            if in_flight.get(info.peer_id) == started:
                del in_flight[info.peer_id]

    def reap_hung_dials() -> None:
        # py-libp2p 0.8.1: a dial to a peer we have just disconnected from can hang and ignore
        # its deadline. Count it as failed and let a new attempt start; the hung task is bounded
        # by MAX_CONCURRENT_DIALS and cancelled with the transport.
        now = trio.current_time()
        for peer_id, started in list(in_flight.items()):
            if now - started > dial_timeout + interval:
                del in_flight[peer_id]
                state.dials_failed += 1
                state.backoff.setdefault(peer_id, _Backoff()).failed(now, backoff_min, backoff_max)
                logger.info("dial %s hung past its %.1f s deadline; will retry", peer_id, dial_timeout)

    def due(peer_id: ID) -> bool:
        b = state.backoff.get(peer_id)
        # py-libp2p can leave a peer in `connections` with an empty list after a drop
        return (peer_id != me and peer_id not in in_flight
                and not host.get_network().connections.get(peer_id)
                and (b is None or b.not_before <= trio.current_time()))

    running = 0

    async def counted_dial(info: PeerInfo) -> None:
        nonlocal running
        running += 1
        try:
            await dial(info)
        finally:
            running -= 1

    pacer = ExchangePacer(interval)
    async with trio.open_nursery() as nursery:
        first = True
        while True:
            reap_hung_dials()
            connected = {p for p, conns in host.get_network().connections.items() if conns}
            to_dial = [i for i in state.bootstrap if due(i.peer_id)]
            if peer_exchange and connected and len(connected) < target_peers:
                if pacer.due(trio.current_time(), len(connected)):
                    found = await ask_for_peers(host, random.choice(list(connected)), max_peers, dial_timeout,
                                                state.runner)
                    state.exchanges += 1
                    news = any(p != me and p not in connected and p not in state.known for p in found)
                    state.known.update(found)
                    pacer.asked(trio.current_time(), news)
                room = target_peers - len(connected) - len(to_dial)
                chosen = {i.peer_id for i in to_dial}
                extra = [PeerInfo(p, a) for p, a in state.known.items() if due(p) and p not in chosen]
                to_dial += pick_peers_to_dial(extra, room)
            for info in to_dial[:max(MAX_CONCURRENT_DIALS - running, 0)]:
                in_flight[info.peer_id] = trio.current_time()
                nursery.start_soon(counted_dial, info)
            if first:
                with trio.move_on_after(dial_timeout):
                    while in_flight:  # the first bootstrap round finishes before start-up returns
                        await trio.sleep(0.01)
                task_status.started()
                first = False
            await trio.sleep(interval)
