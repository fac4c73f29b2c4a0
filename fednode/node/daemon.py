"""The node daemon: one trio nursery of services, each started with `nursery.start`.

    transport (memory or libp2p) -> blob server, sync server, gossip reader, heartbeat,
    timer (election + round clocks + starting rounds), control socket, metrics (optional)

Every message from the topic passes `fednode.wire.validate` inside the transport's validator
(so a REJECTed message is neither delivered nor forwarded), then goes to the election or the
round driver. With `[research] federated_learning = false` the node still joins the community
(heartbeats, serving blobs and status) but never creates, joins or coordinates a round.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import trio

from fednode.blobs.manifest import ManifestLimits
from fednode.blobs.serve import ServeLimits, serve_blobs
from fednode.blobs.store import BlobStore
from fednode.config import Config
from fednode.consensus import (
    BeatSoon,
    ClaimSeen,
    ClaimWithheld,
    CoordinatorChanged,
    ElectionConfig,
    ElectionState,
    HeartbeatSeen,
    PublishClaim,
    Quiet,
    Role,
    SignOfLife,
    Tick,
    TopicReach,
)
from fednode.consensus.election import DEFAULT_MAX_MEMBERS, ElectionEvent, Heard
from fednode.consensus.round_book import DEFAULT_SYNC_RETRY_SECONDS, SyncFrom
from fednode.consensus.round_state import TERMINAL
from fednode.errors import DiskFull, FednodeError
from fednode.identity import Identity
from fednode.node.control import serve_control
from fednode.node.diskfull import DiskPause, probe_free_space, watch_disk
from fednode.node.reports import ByteCounts, MemberStatus, NodeStatus, RoundProgress
from fednode.node.rounds import RoundDriver
from fednode.node.sync import request_sync, serve_sync
from fednode.node.trainers import Trainer
from fednode.state import StateDB
from fednode.transport.base import Subscription, Transport
from fednode.wire import codec
from fednode.wire.messages import CoordinatorClaim, Heartbeat, Message, RoundManifest
from fednode.wire.validate import MessageValidator, ValidationPolicy
from fednode.wire.verdict import Validation, Verdict

if TYPE_CHECKING:
    from trio_typing import TaskStatus

logger = logging.getLogger("fednode.node")

TransportFactory = Callable[[Identity], AbstractAsyncContextManager[Transport]]
MAX_TIMER_SLEEP_SECONDS = 0.5  # the timer loop looks around at least this often
MAX_HOLDERS_TRACKED = DEFAULT_MAX_MEMBERS  # the member table's bound (the election's: one table)
MAX_HEARTBEAT_SEQ_START = 2**52  # heartbeat seq is a uint <= 2^53; leave room to count up
MAX_SYNCS_IN_FLIGHT = 4


def libp2p_factory(config: Config) -> TransportFactory:
    def factory(identity: Identity) -> AbstractAsyncContextManager[Transport]:
        from fednode.transport.libp2p import Libp2pLimits, open_libp2p_transport

        net = config.network
        limits = Libp2pLimits(heartbeat_interval=max(1, round(net.gossip_heartbeat_seconds)),
                              max_message_size=net.max_message_bytes, target_peers=net.target_peers,
                              peer_exchange=net.peer_exchange, dial_timeout=net.dial_timeout_seconds,
                              max_pending_stream_opens=net.max_pending_stream_opens,
                              reconnect_backoff_max=net.reconnect_backoff_max_seconds,
                              subscription_buffer=net.subscription_buffer,
                              max_messages_per_topic_per_second=net.max_messages_per_second,
                              mesh_degree=net.mesh_degree, mesh_degree_low=net.mesh_degree_low,
                              mesh_degree_high=net.mesh_degree_high, gossip_lazy_degree=net.gossip_lazy_degree)
        return open_libp2p_transport(identity, listen_addrs=config.network.listen,
                                     bootstrap=config.network.bootstrap, limits=limits)

    return factory


class Node:
    def __init__(self, config: Config, identity: Identity, *, trainer: Trainer | None = None,
                 transport_factory: TransportFactory | None = None, clock: Callable[[], float] = time.time,
                 inline_training: bool = False) -> None:
        self.config = config
        self.identity = identity
        self.node_id = identity.node_id
        self.clock = clock
        self.topic = codec.topic_for(config.community.id)
        codec.SHARED_DECODE_CACHE.resize(config.network.decode_cache_entries, config.network.decode_cache_bytes)
        self.transport_factory = transport_factory or libp2p_factory(config)
        self.transport: Transport | None = None
        self._subscription: Subscription | None = None  # the topic's (set by _read_gossip)
        self._last_gossip_from_peer: float | None = None  # when a peer last handed us a message
        self.enabled = config.research.federated_learning
        self.trainer = trainer if self.enabled else None
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.disk = DiskPause(clock)
        self.store = BlobStore(data / "blobs", chunk_size=config.blobs.chunk_bytes,
                               limits=ManifestLimits(max_blob_bytes=config.blobs.max_blob_bytes))
        self.db = StateDB(data / "state.sqlite")
        members = config.community.members
        # In a closed community, blob and sync streams are served to listed peers only (security.md M3).
        self.allowlist: frozenset[str] | None = frozenset(members) if members else None
        self.validator = MessageValidator(ValidationPolicy(
            community_id=config.community.id, max_message_bytes=config.network.max_message_bytes,
            replay_window_seconds=config.community.replay_window_seconds,
            max_clock_skew_seconds=config.community.max_clock_skew_seconds,
            allowlist=self.allowlist, seen_cache_size=config.community.seen_cache_size))
        c = config.coordinator
        liveness = c.heartbeat_interval_seconds * c.liveness_timeout_heartbeats
        self.election = ElectionState(self.node_id, ElectionConfig(
            mode=c.mode, fixed_node_id=c.fixed_peer_id, heartbeat_interval=c.heartbeat_interval_seconds,
            liveness_timeout=liveness, max_clock_skew=config.community.max_clock_skew_seconds,
            # Before a first claim, hear the community: the gossip mesh forms within a gossip heartbeat,
            # then every live member's heartbeat arrives (with the term and coordinator it follows).
            startup_grace=liveness + config.network.gossip_heartbeat_seconds,
            max_tick_gap=MAX_TIMER_SLEEP_SECONDS,  # the timer loop's promise (rule 11)
            heartbeat_fanin=c.heartbeat_fanin,  # rule 14
            max_heartbeat_interval=max(c.max_heartbeat_interval_seconds, c.heartbeat_interval_seconds),
            idle_heartbeat_interval=c.idle_heartbeat_interval_seconds), now=clock(),  # rule 18
            federated=self.enabled, known_term=self.db.highest_term())  # rule 12: a restart keeps the term
        self._saved_term = self.election.term  # the highest term in state.sqlite (rule 12)
        self.driver = RoundDriver(config=config, identity=identity, store=self.store, db=self.db,
                                  trainer=self.trainer, publish=self.publish, clock=clock, holders=self._holders_of,
                                  live_members=self._live_federated, inline_training=inline_training,
                                  sync=self._round_messages, disk=self.disk, paused_members=self._paused_members,
                                  heard_members=lambda: self.election.heard().keys(),
                                  unendorsed=lambda: self.election.unendorsed(clock()),
                                  recent_members=lambda window: self.election.recent_members(clock(), window))
        self.counters: dict[str, collections.Counter[str]] = {
            "accepted": collections.Counter(), "rejected": collections.Counter(), "ignored": collections.Counter()}
        # Heartbeat seq starts at the wall clock in microseconds, so it keeps growing across restarts:
        # peers ignore a heartbeat whose seq is not above the last they heard (replays, N8).
        self._seq = min(max(0, int(clock() * 1_000_000)), MAX_HEARTBEAT_SEQ_START)
        self._wake = trio.Event()
        self._reach: tuple[int, int] | None = None  # (topic peers, connections) last fed to the election
        self._beat_now = trio.Event()  # set when the next heartbeat should go out early (a new coordinator)
        self._quiet = -math.inf  # the last Quiet fed to the election (rule 18)
        self._syncing: set[str] = set()
        self.started = trio.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with self.transport_factory(self.identity) as transport, trio.open_nursery() as nursery:
                self.transport = transport
                self.driver.attach(transport, nursery)
                bc = self.config.blobs
                limits = ServeLimits(max_streams_per_peer=bc.max_streams_per_peer,
                                     send_timeout=bc.send_timeout_seconds, idle_timeout=bc.idle_timeout_seconds)
                self.blob_server = await nursery.start(functools.partial(
                    serve_blobs, transport, self.store, limits=limits, allow_peer=self._stream_allowed))
                self.sync_server = serve_sync(transport, self._sync_lookup, allow_peer=self._stream_allowed)
                subscription = await transport.subscribe(self.topic, validator=self._validate)
                # The startup grace counts from when we can hear the topic, not from construction:
                # a node restarted while others run must learn the current term before claiming one
                # (else it may claim a term that already has a live coordinator: split brain).
                self.election.started_at = self.clock()
                nursery.start_soon(self._read_gossip, subscription)
                try:  # restarted on a full disk: come up paused (watch_disk resumes when there is room)
                    self._probe_disk()
                except (DiskFull, OSError) as exc:
                    if not self.disk.note(exc, "starting"):
                        logger.warning("disk probe at start failed: %s", exc)
                if self.enabled:
                    self.driver.restore()
                    # a round restored as ours is concluded only once the election names us again, in
                    # a new term whose endorsement proves the others hear us (election-v1 rule 12)
                    self.election.reclaim = any(s.role is Role.COORDINATOR and s.phase not in TERMINAL
                                                for s in self.driver.rounds.values())
                    self.driver.resume_effects()
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(watch_disk, self.disk, self._probe_disk, self._resume_after_disk_full)
                nursery.start_soon(self._timer_loop)
                self.control_server = await nursery.start(functools.partial(
                    serve_control, self.config.control_socket_path,
                    {"status": lambda: self.status().to_json(), "start_round": self._start_round_now}))
                metrics = None
                if self.config.metrics.enabled:
                    from fednode.node.metrics import MetricsServer

                    token = trio.lowlevel.current_trio_token()
                    # scrapes arrive on prometheus_client's thread; the status is read on trio's
                    metrics = MetricsServer(self.config.metrics.port,
                                            lambda: trio.from_thread.run_sync(self.status, trio_token=token))
                try:
                    self.started.set()
                    task_status.started(self)
                    await trio.sleep_forever()
                finally:
                    if metrics is not None:  # off trio's thread: a scrape in flight needs trio to finish
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(metrics.close)
        finally:
            self.db.close()

    def _probe_disk(self) -> None:
        self.db.probe_write(self.clock())
        probe_free_space(self.store.root)

    def _resume_after_disk_full(self) -> None:
        if self.enabled:
            self.driver.resume_after_disk_full()
        self._wake.set()

    def _stream_allowed(self, peer_id: str) -> bool:
        return self.allowlist is None or peer_id in self.allowlist

    # -- gossip in ---------------------------------------------------------------------------
    def _validate(self, data: bytes, received_from: str) -> Validation:
        checked = self.validator.check(data, self.clock())
        v = checked.validation
        if v.verdict is Verdict.REJECT:
            self.counters["rejected"][v.reason] += 1
            logger.info("REJECT %s from %s: %s", v.reason, received_from[-8:], v.detail[:120])
        elif v.verdict is Verdict.IGNORE:
            self.counters["ignored"][v.reason] += 1
        else:
            self.counters["accepted"][checked.message.TYPE if checked.message else "?"] += 1
        return v

    async def _read_gossip(self, subscription: Subscription) -> None:
        self._subscription = subscription
        async for gossip in subscription:
            if gossip.received_from != self.node_id:
                self._last_gossip_from_peer = self.clock()
            try:
                # decoded by the validator already: from the shared decode cache (issue 12)
                message = codec.decode_cached(gossip.data, max_bytes=self.config.network.max_message_bytes)
            except Exception:  # validated already; a decode failure here is a bug worth a log, not a crash
                logger.exception("validated message failed to decode")
                continue
            self.dispatch(message)

    def dispatch(self, message: Message) -> Validation:
        """Route a validated message. Returns what the consumer made of it."""
        now = self.clock()
        if isinstance(message, Heartbeat):
            fresh = not self.election.is_stale(message)
            if not fresh:  # a replayed heartbeat says nothing about now (N8)
                self.counters["ignored"]["stale_seq"] += 1
            validation = self._election_event(HeartbeatSeen(message, now))
            if fresh and message.node_id != self.node_id and message.node_id in self.election.members:
                self._on_heartbeat(message, now)  # the election recorded it (its table had room)
            return validation
        if isinstance(message, CoordinatorClaim):
            return self._election_event(ClaimSeen(message, now))
        verdict = self.driver.on_message(message)
        if verdict.accepted and message.signer != self.node_id:
            # election-v1 rule 16: a coordinator busy serving a round (at 32 daemons, its heartbeats
            # were 5 s apart right after it published) is shown alive by its round messages too
            self._election_event(SignOfLife(message.signer, message.timestamp, now))
        if not verdict.accepted and verdict.reason not in ("duplicate",):
            kind = "ignored" if verdict.verdict is Verdict.IGNORE else "rejected"
            self.counters[kind][f"round:{verdict.reason}"] += 1
        self._wake.set()
        return verdict

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        self._save_term(hb.term)  # rule 12: a member's reported term survives our restart
        if not self.enabled:
            return
        want = hb.open_round_id
        finished = bool(want) and want not in self.driver.rounds and self.db.get_round(want) is not None
        asked = self.driver.book.heartbeat(open_round_id=want, open_round_finished=finished,
                                           last_round_number=hb.last_round_number, now=now)
        for round_id, effect in asked.steps:
            if isinstance(effect, SyncFrom):
                peer = self._sync_peer(hb.node_id, hb.last_round_number) if effect.past else hb.node_id
                self._maybe_sync(peer, round_id)

    def _sync_peer(self, sender: str, last_round_number: int) -> str:
        """Whom to ask for a round we are behind on: the heartbeat's sender if we are connected to it,
        else a connected member whose heartbeat says it is past the round too. A restarted libp2p
        node may hear a member's heartbeat through others before it knows that member's address
        ("No known addresses to peer": how issue 13's r36 node never learned the outcome)."""
        connected = self.transport.peers() if self.transport is not None else frozenset()
        if sender in connected:
            return sender
        ahead = sorted(n for n, h in self.election.heard().items()
                       if n in connected and h.last_round_number >= last_round_number)
        rotate = int(self.clock() / DEFAULT_SYNC_RETRY_SECONDS)  # a different one on each retry
        return ahead[rotate % len(ahead)] if ahead else sender

    def _maybe_sync(self, peer: str, round_id: str) -> None:
        if (round_id not in self._syncing and len(self._syncing) < MAX_SYNCS_IN_FLIGHT
                and self.driver.nursery is not None):
            self._syncing.add(round_id)
            self.driver.nursery.start_soon(self._sync_round, peer, round_id)

    async def _sync_round(self, peer: str, round_id: str) -> None:
        try:
            for message in await self._round_messages(peer, round_id):
                self.dispatch(message)
        except Exception as exc:  # a peer that can't sync us is not fatal; the next heartbeat retries
            logger.info("sync of %s from %s failed: %s", round_id, peer[-8:], exc)
        finally:
            self._syncing.discard(round_id)

    async def _round_messages(self, peer: str, round_id: str) -> list[Message]:
        """The signed messages `peer` holds for `round_id`, each validated as if from gossip (outside
        the replay window: they are old by nature). One we already validated (the duplicate cache
        knows its id) is returned too: the round's outcome must not be lost because gossip brought
        it first, when the round could not take it yet."""
        assert self.transport is not None
        out: list[Message] = []
        for data in await request_sync(self.transport, peer, round_id):
            checked = self.validator.check(data, self.clock(), check_window=False)
            if checked.message is not None:
                out.append(checked.message)
            elif checked.validation.reason == "duplicate":  # passed every check when first seen
                out.append(codec.decode_cached(data, max_bytes=self.config.network.max_message_bytes))
        return out

    def _sync_lookup(self, round_id: str) -> list[bytes]:
        row = self.db.get_round(round_id)
        if row is None:
            return []
        out = [row.manifest]
        if row.outcome:
            out.append(row.outcome)
        return out

    def _gossip_health(self) -> str:
        """What our side of gossip looks like, for the log line of a claim: a node that hears no
        coordinator while holding connections has a gossip problem, not a dead coordinator (issue 12:
        at 16 daemons a bootstrap peer heard nobody for 50 s and claimed a term)."""
        if self.transport is None:
            return "no transport"
        last = self._last_gossip_from_peer
        heard = "never" if last is None else f"{self.clock() - last:.1f} s ago"
        backlog = self._subscription.backlog() if self._subscription is not None else 0
        out = (f"we hold {len(self.transport.peers())} connection(s), {len(self.transport.topic_peers(self.topic))} "
               f"gossip peer(s) on the topic; last gossip from a peer {heard}; {backlog} message(s) not read yet")
        describe = getattr(self.transport, "describe_gossip", None)  # the libp2p transport's details
        return out if describe is None else f"{out}; {describe(self.topic)}"

    def _save_term(self, term: int) -> None:
        """election-v1 rule 12: store a term higher than any stored (one small write per new term;
        the member table is no longer written to state.sqlite, so members' terms are stored here)."""
        if term <= self._saved_term:
            return
        try:
            self.db.save_term(term)
            self._saved_term = term
        except DiskFull as exc:  # tried again with the next heartbeat; rounds carry terms too
            self.disk.note(exc, "saving the term")

    def _election_event(self, event: ElectionEvent) -> Validation:
        outcome = self.election.handle(event)
        for effect in outcome.effects:
            if isinstance(effect, PublishClaim):
                logger.info("claiming term %d: %s; %s", effect.term, effect.reason, self._gossip_health())
                claim = codec.sign(CoordinatorClaim(
                    community_id=self.config.community.id, node_id=self.node_id, term=effect.term,
                    claimed_at=self.clock(), last_round_number=self._last_round_number()), self.identity)
                self._publish_soon(claim)
            elif isinstance(effect, BeatSoon):
                self._beat_now.set()
            elif isinstance(effect, ClaimWithheld):
                logger.info("not claiming term %d: %s; %s", effect.term, effect.reason, self._gossip_health())
            elif isinstance(effect, CoordinatorChanged):
                logger.info("coordinator is now %s (term %d)", effect.coordinator_node_id[-8:], effect.term)
                self._save_term(effect.term)
                self.driver.on_coordinator_changed(effect)
                self._wake.set()
                self._beat_now.set()
        return outcome.validation

    # -- gossip out --------------------------------------------------------------------------
    async def publish(self, message: Message) -> None:
        assert self.transport is not None
        await self.transport.publish(self.topic, codec.encode(message))

    def _publish_soon(self, message: Message) -> None:
        if self.driver.nursery is not None:
            self.driver.nursery.start_soon(self._publish_logged, message)

    async def _publish_logged(self, message: Message) -> None:
        """Publish, and survive a failure: a claim or manifest that did not go out is not worth the
        daemon (heartbeats renew claims; peers sync an open round named in our heartbeats)."""
        try:
            await self.publish(message)
        except FednodeError as exc:
            logger.warning("publishing %s failed: %s", message.TYPE, exc)

    def _last_round_number(self) -> int:
        latest = self.db.latest_published()
        return latest.round_number if latest else 0

    async def _heartbeat_loop(self) -> None:
        base = self.config.coordinator.heartbeat_interval_seconds
        while True:
            # election-v1 rule 14: paced by the community's size unless we coordinate (or none is known)
            interval = self.election.heartbeat_interval(self.clock())
            term, coordinator = self.election.heartbeat_fields()
            open_round = self.driver.open_round()
            latest = self.db.latest_published()
            self._seq += 1
            hb = codec.sign(Heartbeat(
                community_id=self.config.community.id, node_id=self.node_id, term=term, seq=self._seq,
                sent_at=self.clock(), federated_learning=self.enabled, coordinator_node_id=coordinator,
                last_round_number=latest.round_number if latest else 0,
                latest_merged_sha256=latest.merged_sha256 if latest else "",
                open_round_id=open_round.round_id if open_round else "", paused=self.disk.paused,
                interval_ms=0 if interval <= base else math.ceil(interval * 1000)), self.identity)
            with contextlib.suppress(Exception):
                await self.publish(hb)
            sent = trio.current_time()
            self._beat_now = trio.Event()
            due = sent + interval
            while not self._beat_now.is_set():
                # A faster pace is safe at once (rules 14, 18: a round may open, our idle coordinator's
                # next heartbeat says it is back at heartbeat_interval): our pace is read again every
                # heartbeat_interval. A slower one waits for the heartbeat that declares it.
                due = min(due, sent + self.election.heartbeat_interval(self.clock()))
                left = due - trio.current_time()
                if left <= 0:
                    break
                with trio.move_on_after(min(base, left)):
                    await self._beat_now.wait()
            # A new coordinator is answered (named) in the next heartbeat, at once (rule 14: a paced
            # member would keep a new coordinator waiting up to its pace, rule 13), and an idle coordinator
            # greets a member that joined (rule 18), but never sooner than heartbeat_interval after the
            # last one, whatever a flood of claims does.
            await trio.sleep_until(sent + base)

    # -- clocks ------------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        while True:
            now = self.clock()
            if self.transport is not None:  # election-v1 rule 17: a node nobody on the topic hears does not claim
                reach = (len(self.transport.topic_peers(self.topic)), len(self.transport.peers()))
                if reach != self._reach:  # fed on change only: a tick is the daemon's most frequent event
                    self._reach = reach
                    self._election_event(TopicReach(*reach, now))
            self._election_event(Tick(now))
            if self.enabled:
                self.driver.tick(now)
                # only a coordinator with no open round asks the member table (issue 12: an idle member's cost)
                may_open = self.driver.book.may_open_next()
                manifest = None if not may_open else self.driver.maybe_start_round(
                    now, len(self._live_federated()), heard_round_number=self._heard_round_number())
                quiet = self.driver.quiet_until if may_open and manifest is None else -math.inf
                quiet = quiet if quiet > now else -math.inf  # "may open now" is one value, not a new one per tick
                if quiet != self._quiet:  # election-v1 rule 18: fed on change only
                    self._quiet = quiet
                    self._election_event(Quiet(quiet, now))
                if manifest is not None:
                    await self._publish_logged(manifest)
            timers = [t for t in (self.election.next_timer(), self.driver.next_timer()) if t is not None]
            delay = min([MAX_TIMER_SLEEP_SECONDS, *[t - now for t in timers]])
            self._wake = trio.Event()
            with trio.move_on_after(max(0.0, delay) + 1e-3):
                await self._wake.wait()

    def _start_round_now(self) -> dict[str, Any]:
        if not self.enabled:
            return {"error": "[research] federated_learning = false: this node starts no round"}
        if self.driver.coordinator != self.node_id:
            return {"error": f"not the coordinator; ask {self.driver.coordinator or 'nobody (none elected yet)'}"}
        manifest = self.driver.maybe_start_round(self.clock(), len(self._live_federated()), force=True,
                                                 heard_round_number=self._heard_round_number())
        if manifest is None:
            unendorsed = self.election.unendorsed(self.clock())
            if unendorsed:  # election-v1 rule 13: not even an operator overrides it
                return {"error": f"{len(unendorsed)} live member(s) do not follow us as coordinator of term "
                                 f"{self.election.term} yet (election-v1 rule 13); try again in a few seconds"}
            return {"error": "a round is already open"}
        self._publish_soon(manifest)
        return {"result": f"started round {manifest.round_number} ({manifest.round_id})"}

    # -- queries -----------------------------------------------------------------------------
    def _live_federated(self) -> list[str]:
        return self.election.live_members(self.clock()) if self.enabled else []

    def _paused_members(self) -> frozenset[str]:
        return frozenset(self.election.paused)  # round-v1 r4: not waited for by close-early

    def _heard_round_number(self) -> int:
        """The highest round a live member's heartbeat says it finished (published)."""
        now, liveness = self.clock(), self.election.config.liveness_timeout
        return max((h.last_round_number for h in self.election.heard().values() if now - h.at < liveness), default=0)

    @property
    def _heard(self) -> dict[str, Heard]:
        return self.election.heard()

    @property
    def _holders(self) -> dict[str, str]:
        """Node id -> the merged adapter its last heartbeat says it holds."""
        return {n: h.latest_merged_sha256 for n, h in self.election.heard().items() if h.latest_merged_sha256}

    def _holders_of(self, sha: str) -> list[str]:
        return sorted(n for n, h in self.election.heard().items() if h.latest_merged_sha256 == sha)

    def status(self) -> NodeStatus:
        now = self.clock()
        members = [MemberStatus(node_id=n, federated_learning=h.federated_learning,
                                last_seen_seconds_ago=round(now - h.at, 3), alive=self.election.is_live(n, now))
                   for n, h in sorted(self.election.heard().items())]
        transport_stats = self.transport.statistics() if self.transport is not None else None
        blob_stats = self.blob_server.statistics() if hasattr(self, "blob_server") else None
        sync_stats = self.sync_server.statistics() if hasattr(self, "sync_server") else None
        control_stats = self.control_server.statistics() if hasattr(self, "control_server") else None
        if self.enabled:
            progress = self.driver.status()
        else:
            progress = RoundProgress(disabled_reason="disabled: [research] federated_learning = false in "
                                     + self.config.source)
        return NodeStatus(
            node_id=self.node_id,
            name=self.config.node.name,
            community_id=self.config.community.id,
            federated_learning=self.enabled,
            members=members,
            coordinator=self.driver.coordinator,  # the round book's (it follows the election)
            term=self.driver.term,
            counters={k: dict(v) for k, v in self.counters.items()},
            peers=sorted(self.transport.peers()) if self.transport is not None else [],
            paused=self.disk.status(),  # None while participating; else why (e.g. disk_full) and since when
            disk_full_events=self.disk.events,
            bytes=ByteCounts(
                transport_sent=transport_stats.bytes_sent if transport_stats else 0,
                transport_received=transport_stats.bytes_received if transport_stats else 0,
                blob_served=blob_stats.bytes_served if blob_stats else 0,
                blob_fetched=self.driver.progress.bytes_fetched),
            gossip_dropped=transport_stats.dropped if transport_stats else 0,
            gossip_copies_received=transport_stats.copies_received if transport_stats else 0,
            heartbeat_interval_seconds=round(self.election.heartbeat_interval(now), 3),
            idle=self.election.at_idle_pace(now),
            gossip_delivered_from_peers=transport_stats.delivered_from_peers if transport_stats else 0,
            # the transport's verdicts by reason, including what it refuses before our validator runs
            # (e.g. "too_large": over the transport's message limit)
            gossip_rejected=dict(transport_stats.rejected_by_reason) if transport_stats else {},
            # streams refused before they were served (e.g. "not_member" in a closed community)
            streams_refused={"blob": dict(blob_stats.refused_by_reason) if blob_stats else {},
                             "sync": dict(sync_stats.refused_by_reason) if sync_stats else {}},
            # clients that misbehaved or failed (closed early, stalled, sent garbage or too much), by reason:
            # each cost only its own connection or stream
            handler_errors={
                "control": dict(control_stats.failed_by_reason) if control_stats else {},
                "sync": dict(sync_stats.failed_by_reason) if sync_stats else {},
                "blob": dict(blob_stats.aborted_by_reason) if blob_stats else {},
                "streams": dict(transport_stats.streams_failed) if transport_stats else {},
            },
            progress=progress,
        )


@contextlib.asynccontextmanager
async def running_node(node: Node) -> AsyncIterator[Node]:
    """Run `node` for the duration of the block (tests and the harness use this)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()


def manifest_of(node: Node) -> RoundManifest | None:
    state = node.driver.open_round()
    return state.manifest if state else None
