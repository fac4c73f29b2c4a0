"""An adversarial peer in a community of three honest daemons running two rounds.

Each test runs the attacked federation and, in the same test, the same federation without the
attacker, and checks: every attack is rejected (or bounded), `node.status()` counts it by reason,
the merged adapter of every round is byte-identical to the clean run's, every bounded structure
of the honest nodes is within its bound, and their Python heap peak grows by at most
ATTACK_MEMORY_SLACK_BYTES over the clean run.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
import trio

from fednode.blobs.fetch import fetch_blob
from fednode.blobs.serve import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_STREAMS_PER_PEER, DEFAULT_SEND_TIMEOUT
from fednode.blobs.store import BlobStore
from fednode.errors import RemoteProtocolError, TransferError
from fednode.identity import Identity
from fednode.node.sync import request_sync
from fednode.wire import codec
from fednode.wire.messages import (
    AggregateAnnounce,
    Contribution,
    CoordinatorClaim,
    Heartbeat,
    RoundManifest,
    SubmissionAnnounce,
)
from tests.node.conftest import clock, wait_until
from tests.security.adversary import BAD_DELTA_KINDS, Adversary, bad_delta, good_delta, non_canonical, with_field
from tests.security.federation import (
    ATTACK_MEMORY_SLACK_BYTES,
    COMMUNITY,
    HONEST,
    MEMBER,
    NODE_MAX_MESSAGE_BYTES,
    OUTSIDER,
    Federation,
    assert_bounded,
    clean_run,
    federation,
    heap_peak,
    honest_ids,
)


def rejected(fed: Federation) -> list[dict[str, int]]:
    return [c["rejected"] for c in fed.counters()]


def ignored(fed: Federation) -> list[dict[str, int]]:
    return [c["ignored"] for c in fed.counters()]


def fake_sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


async def same_as_clean_run(scratch: Path, attacked: list[str], attacked_peak: int) -> None:
    """Run the federation again without the attacker (same test, same config) and compare."""
    clean, clean_peak = await clean_run(scratch)
    assert attacked == clean, "the attacker changed a merged adapter"
    assert attacked_peak <= clean_peak + ATTACK_MEMORY_SLACK_BYTES, (attacked_peak, clean_peak)


# -- forged signatures ---------------------------------------------------------------------------
async def test_forged_signatures_are_rejected(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER) as fed:
            adv = fed.adversary
            assert adv is not None
            manifest = await adv.wait_manifest(1)
            coordinator, victim = manifest.coordinator_node_id, next(n for n in honest_ids()
                                                                     if n != manifest.coordinator_node_id)
            forgeries = [
                adv.forge(Heartbeat(community_id=COMMUNITY, node_id=coordinator, term=99, seq=1, sent_at=clock(),
                                    federated_learning=True, coordinator_node_id=coordinator)),
                adv.forge(RoundManifest(round_id="r9-t99", base_model_id="fake-model",
                                        coordinator_node_id=coordinator, community_id=COMMUNITY, created_at=clock(),
                                        term=99, round_number=9)),
                adv.forge(SubmissionAnnounce(round_id=manifest.round_id, participant_node_id=victim,
                                             num_samples=10**6, submitted_at=clock(), community_id=COMMUNITY,
                                             delta_sha256=fake_sha("evil"), delta_size=1000)),
                adv.forge(AggregateAnnounce(community_id=COMMUNITY, round_id=manifest.round_id, round_number=1,
                                            coordinator_node_id=coordinator, term=manifest.term,
                                            merged_sha256=fake_sha("evil merged"), merged_size=1000,
                                            aggregation="fedavg", announced_at=clock(),
                                            contributions=(Contribution(victim, fake_sha("evil"), 1),))),
                adv.forge(CoordinatorClaim(community_id=COMMUNITY, node_id=victim, term=99, claimed_at=clock())),
            ]
            for data in forgeries:
                await adv.publish_raw(data)
            await fed.wait_rounds()
            for counts in rejected(fed):
                assert counts.get("bad_signature") == len(forgeries), counts
            for node in fed.nodes:
                assert node.election.term < 99 and "r9-t99" not in node.driver.rounds
                assert node.driver.pending_manifests == {}
            assert all(a["node_id"] in honest_ids() for k in (1, 2) for a in fed.coordinator_record(k)["accepted"])
            assert_bounded(fed)
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- poisoned deltas from an allowlisted member --------------------------------------------------
@pytest.mark.parametrize("kind", BAD_DELTA_KINDS)
async def test_poisoned_delta_is_refused(scratch: Path, autojump_clock: trio.abc.Clock, kind: str) -> None:
    # The member heartbeats as a federated participant, so the coordinator waits for its update;
    # wait_for_members = 4 makes round 1 start only once it is live (the clean run waits for 3).
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER, wait_for_members=HONEST + 1) as fed:
            adv = fed.adversary
            assert adv is not None
            adv.nursery.start_soon(lambda: adv.heartbeat_forever(federated=True))
            shas = []
            for number in (1, 2):
                manifest = await adv.wait_manifest(number)
                shas.append(await adv.submit_blob(manifest, bad_delta(kind)))
            await fed.wait_rounds()
            for number, sha in zip((1, 2), shas, strict=True):
                record = fed.coordinator_record(number)
                assert sorted(a["node_id"] for a in record["accepted"]) == sorted(honest_ids())
                refused = [r for r in record["rejected"] if r["node_id"] == MEMBER.node_id]
                assert [(r["reason"], r["blob_sha256"]) for r in refused] == [("invalid_update", sha)], record
            assert_bounded(fed, heartbeating={*honest_ids(), MEMBER.node_id})
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- another member's delta, re-announced with an inflated weight --------------------------------
async def test_reannounced_delta_is_rejected(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    # The member heartbeats as a federated participant (so the round stays open for it), copies the
    # first honest submission of each round under its own name with 10^6 samples, and never sends
    # its own: under FedAvg the copy would weigh ~100% and the merged adapter would change.
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER, wait_for_members=HONEST + 1) as fed:
            adv = fed.adversary
            assert adv is not None
            adv.nursery.start_soon(lambda: adv.heartbeat_forever(federated=True))
            copied = []
            for number in (1, 2):
                manifest = await adv.wait_manifest(number)
                while not (mine := [a for a in adv.submissions if a.round_id == manifest.round_id]):
                    await trio.sleep(0.01)
                victim = mine[0]
                await adv.publish_raw(adv.signed(adv.submission(manifest, delta_sha256=victim.delta_sha256,
                                                                delta_size=victim.delta_size, num_samples=10**6)))
                copied.append(victim)
            await fed.wait_rounds()
            for number, victim in zip((1, 2), copied, strict=True):
                record = fed.coordinator_record(number)
                accepted = {a["node_id"]: a for a in record["accepted"]}
                assert sorted(accepted) == sorted(honest_ids())
                assert accepted[victim.participant_node_id]["num_samples"] == victim.num_samples
                refused = [(r["reason"], r["blob_sha256"]) for r in record["rejected"]
                           if r["node_id"] == MEMBER.node_id]
                assert refused == [("duplicate_delta", victim.delta_sha256)], record
            for node in fed.nodes:  # and the other nodes refuse copies too (one may reach a node before
                # its manifest or after its round closed there; the coordinator's verdict is what counts)
                assert node.status().counters["rejected"].get("round:duplicate_delta", 0) >= 1
            assert_bounded(fed, heartbeating={*honest_ids(), MEMBER.node_id})
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- replays -------------------------------------------------------------------------------------
async def test_replayed_messages_are_ignored(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER) as fed:
            adv = fed.adversary
            assert adv is not None
            await adv.wait_manifest(2)  # round 1's manifest, submissions and aggregate are captured by now
            await trio.sleep(1.5)  # and a heartbeat of every honest node
            # From round 1's manifest on (all three were live by then), every honest node saw every message.
            mark = next(i for i, d in enumerate(adv.captured) if codec.decode(d).TYPE == "round_manifest")
            replayed = adv.captured[mark:]
            kinds = collections.Counter(codec.decode(d).TYPE for d in replayed)
            assert {"round_manifest", "submission_announce", "aggregate_announce", "heartbeat"} <= set(kinds)
            before = ignored(fed)
            for data in replayed:  # exact copies, re-published (a fresh gossip id, the same message id)
                await adv.publish_raw(data)
            await adv.publish_raw(adv.signed(adv.heartbeat(sent_at=clock() - 400.0)))  # outside the window
            await adv.publish_raw(adv.signed(adv.heartbeat(sent_at=clock() + 100.0)))  # from the future
            await trio.sleep(0.5)
            after = ignored(fed)
            for b, a in zip(before, after, strict=True):
                assert a.get("duplicate", 0) - b.get("duplicate", 0) == len(replayed), (b, a)
                assert a.get("stale", 0) - b.get("stale", 0) == 1
                assert a.get("future", 0) - b.get("future", 0) == 1
            await fed.wait_rounds()
            assert all(c["rejected"] == {} for c in fed.counters())
            assert_bounded(fed)  # the stale and future heartbeats did not make the adversary a member
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- a key that is not on the allowlist ----------------------------------------------------------
async def test_non_member_is_rejected(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=OUTSIDER) as fed:
            adv = fed.adversary
            assert adv is not None
            manifest = await adv.wait_manifest(1)
            blob = bad_delta("huge_norm")
            sha = adv.store.put_bytes(blob)
            me = adv.node_id
            messages = [
                adv.heartbeat(federated=True),
                CoordinatorClaim(community_id=COMMUNITY, node_id=me, term=manifest.term + 1, claimed_at=clock()),
                RoundManifest(round_id="r1-t77", base_model_id="fake-model", coordinator_node_id=me,
                              community_id=COMMUNITY, created_at=clock(), term=77, round_number=1),
                adv.submission(manifest, delta_sha256=sha, delta_size=len(blob)),
                AggregateAnnounce(community_id=COMMUNITY, round_id=manifest.round_id, round_number=1,
                                  coordinator_node_id=me, term=manifest.term, merged_sha256=sha,
                                  merged_size=len(blob), aggregation="fedavg", announced_at=clock(),
                                  contributions=(Contribution(me, sha, 1),)),
            ]
            for message in messages:
                await adv.publish_raw(adv.signed(message))
            await fed.wait_rounds()
            for counts in rejected(fed):
                assert counts == {"not_member": len(messages)}, counts
            for number in (1, 2):
                record = fed.coordinator_record(number)
                assert me not in {a["node_id"] for a in record["accepted"]} | {r["node_id"] for r in record["rejected"]}
            for node in fed.nodes:
                assert node.election.coordinator != me and "r1-t77" not in node.driver.rounds
                assert not node.store.has(sha)
            assert_bounded(fed)
            attacked = fed.merged()
            # Streams are membership-gated too (M3): knowing a merged adapter's or a delta's sha256
            # does not let a non-member fetch it, nor sync a round's signed messages.
            assert adv.transport is not None
            loot = BlobStore(scratch / "loot")
            round_ids = [str(fed.coordinator_record(k)["round_id"]) for k in (1, 2)]
            for node in fed.nodes:
                with pytest.raises(TransferError):
                    await fetch_blob(adv.transport, attacked[0], [node.node_id], loot)
                with pytest.raises(RemoteProtocolError):
                    await request_sync(adv.transport, node.node_id, round_ids[0])
                refused = node.status().streams_refused
                assert refused["blob"].get("not_member", 0) >= 1 and refused["sync"] == {"not_member": 1}, refused
                assert node.blob_server.statistics().rejected_busy_by_peer.get(me) is None
            assert not loot.has(attacked[0])
            # while a member's streams are served as before
            peer = BlobStore(scratch / "member-fetch")
            await fetch_blob(fed.nodes[1].transport, attacked[0], [fed.nodes[0].node_id], peer)  # type: ignore[arg-type]
            assert peer.has(attacked[0])
            assert await request_sync(fed.nodes[1].transport, fed.nodes[0].node_id, round_ids[0])  # type: ignore[arg-type]
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- malformed, oversize and non-canonical control messages -------------------------------------
def malformed_messages(adv: Adversary) -> list[tuple[str, bytes, str]]:
    """(label, bytes, expected verdict reason) — all from an allowlisted member's transport."""
    hb = codec.sign(adv.heartbeat(), adv.identity)
    rng = random.Random(1)
    unsigned = codec.encode(adv.heartbeat())  # well-formed, with an empty signature
    return [
        ("random bytes", rng.randbytes(200), "malformed"),
        ("msgpack array", codec._pack([1, 2, 3]), "malformed"),
        ("nested 5000 deep", b"\x91" * 5000 + b"\x00", "malformed"),
        ("term is a string", with_field(hb, term="1"), "malformed"),
        ("term is a bool", with_field(hb, term=True), "malformed"),
        ("seq is negative", with_field(hb, seq=-1), "malformed"),
        ("a field missing", codec._pack({k: v for k, v in codec.to_map(hb).items() if k != "seq"}), "malformed"),
        ("an extra field", with_field(hb, admin=True), "malformed"),
        ("unsigned", unsigned, "bad_signature"),
        ("unknown type", with_field(hb, type="launch"), "unknown_type"),
        ("keys out of order", non_canonical(hb), "non_canonical"),
        ("oversize for the node", b"\x80" + rng.randbytes(NODE_MAX_MESSAGE_BYTES + 10), "oversize"),
        ("another community", adv.signed(Heartbeat(community_id="other", node_id=adv.node_id, term=0, seq=1,
                                                   sent_at=clock())), "wrong_community"),
        ("bit-flipped signature", hb_flipped(hb), "bad_signature"),
        ("a future version", with_field(hb, version=2), "unsupported_version"),
    ]


def hb_flipped(hb: Heartbeat) -> bytes:
    sig = bytearray(hb.sig)
    sig[0] ^= 1
    return codec.encode(dataclasses.replace(hb, sig=bytes(sig)))


async def test_malformed_control_messages_are_rejected(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER) as fed:
            adv = fed.adversary
            assert adv is not None
            await adv.wait_manifest(1)
            cases = malformed_messages(adv)
            for _, data, _ in cases:
                await adv.publish_raw(data)
            # Beyond the transport's own 64 KiB limit: dropped by the transport before any validator.
            await adv.publish_raw(b"\x80" * (100 * 1024))
            await fed.wait_rounds()
            want = collections.Counter(reason for _, _, reason in cases)
            unsupported = want.pop("unsupported_version")
            for node, counts in zip(fed.nodes, fed.counters(), strict=True):
                assert counts["rejected"] == dict(want), counts["rejected"]
                assert counts["ignored"].get("unsupported_version") == unsupported
                stats = node.status()
                assert stats.gossip_rejected == {**want, "too_large": 1}, stats.gossip_rejected
            assert_bounded(fed)
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- a blob whose bytes do not match its address ------------------------------------------------
@pytest.mark.parametrize("forged_manifest", [False, True], ids=["bad_chunks", "forged_manifest"])
async def test_blob_not_matching_its_hash_is_refused(scratch: Path, autojump_clock: trio.abc.Clock,
                                                     forged_manifest: bool) -> None:
    from fednode.aggregation.delta import dump_delta

    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER, wait_for_members=HONEST + 1) as fed:
            adv = fed.adversary
            assert adv is not None
            adv.serve_lies()
            adv.nursery.start_soon(lambda: adv.heartbeat_forever(federated=True))
            announced = []
            for number in (1, 2):
                manifest = await adv.wait_manifest(number)
                good, other = dump_delta(good_delta(seed=number)), dump_delta(good_delta(scale=50.0, seed=number))
                lie = adv.lie_about(announced=good, served=other, forged_manifest=forged_manifest)
                await adv.publish_raw(adv.signed(adv.submission(manifest, delta_sha256=lie.announced_sha,
                                                                delta_size=len(good))))
                announced.append(lie.announced_sha)
            await fed.wait_rounds()
            for number, sha in zip((1, 2), announced, strict=True):
                record = fed.coordinator_record(number)
                assert sorted(a["node_id"] for a in record["accepted"]) == sorted(honest_ids())
                refused = [r for r in record["rejected"] if r["node_id"] == MEMBER.node_id]
                assert [(r["reason"], r["blob_sha256"]) for r in refused] == [("unavailable", sha)], record
                assert refused[0]["detail"].startswith("TransferError"), refused[0]["detail"]
            for node in fed.nodes:
                assert not any(node.store.has(sha) for sha in announced)
            assert_bounded(fed, heartbeating={*honest_ids(), MEMBER.node_id})
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- 100 blob streams opened and stalled ---------------------------------------------------------
async def test_stalled_blob_streams_are_bounded(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    count = 100
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER) as fed:
            adv = fed.adversary
            assert adv is not None
            manifest = await adv.wait_manifest(1)
            target = fed.node(manifest.coordinator_node_id)
            await adv.stall_blob_streams(target.node_id, count)
            await trio.sleep(0.1)
            stats = target.blob_server.statistics()
            assert stats.rejected_busy_by_peer == {adv.node_id: count - DEFAULT_MAX_STREAMS_PER_PEER}
            assert target.blob_server._active[adv.node_id] == DEFAULT_MAX_STREAMS_PER_PEER
            await fed.wait_rounds()  # the coordinator serves its honest peers meanwhile
            attacked = fed.merged()
            # Busy streams end within send_timeout, served but idle ones within idle_timeout.
            assert DEFAULT_SEND_TIMEOUT < DEFAULT_IDLE_TIMEOUT
            started = trio.current_time()
            await wait_until(lambda: adv.node_id not in target.blob_server._active, timeout=DEFAULT_IDLE_TIMEOUT + 5)
            assert trio.current_time() - started <= DEFAULT_IDLE_TIMEOUT + 1
            await trio.sleep(1)
            transport = target.transport
            assert transport is not None
            assert not [s for s in transport._streams if s.remote_peer_id == adv.node_id]  # type: ignore[attr-defined]
            assert_bounded(fed)
    await same_as_clean_run(scratch, attacked, peak.bytes)


# -- a flood of heartbeats -----------------------------------------------------------------------
async def test_heartbeat_flood_is_bounded(scratch: Path, autojump_clock: trio.abc.Clock) -> None:
    flood, sybils = 3000, 300
    identities = [Identity.from_seed(i.to_bytes(2, "big") + b"\x5a" * 30) for i in range(sybils)]
    with heap_peak() as peak:
        async with federation(scratch, "attacked", adversary=MEMBER) as fed:
            adv = fed.adversary
            assert adv is not None
            await adv.wait_manifest(1)
            before = [c["accepted"].get("heartbeat", 0) for c in fed.counters()]
            await adv.flood_heartbeats(flood)  # distinct seq each: valid, signed by a member
            for ident in identities:  # a Sybil swarm of fresh keys, one heartbeat each
                await adv.publish_raw(codec.encode(codec.sign(
                    Heartbeat(community_id=COMMUNITY, node_id=ident.node_id, term=0, seq=1, sent_at=clock(),
                              federated_learning=True), ident)))
            await fed.wait_rounds()
            assert adv.transport is not None
            # A full inbound queue drops (counted by the sender that could not enqueue: here the
            # adversary's transport) instead of buffering: every message is handled or dropped.
            adv_dropped = adv.transport.statistics().dropped
            for node, counts, b in zip(fed.nodes, fed.counters(), before, strict=True):
                dropped = node.status().gossip_dropped + adv_dropped
                not_member = counts["rejected"].get("not_member", 0)
                accepted = counts["accepted"]["heartbeat"] - b  # the flood, and honest heartbeats meanwhile
                assert not_member <= sybils
                assert accepted + not_member + dropped >= flood + sybils, (accepted, not_member, dropped)
            # one member-table entry per identity, however many heartbeats it sends
            assert_bounded(fed, heartbeating={*honest_ids(), MEMBER.node_id})
            attacked = fed.merged()
    await same_as_clean_run(scratch, attacked, peak.bytes)
