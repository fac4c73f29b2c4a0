#!/usr/bin/env python3
"""Generate the stream-protocol vectors protocols/vectors/sync-v1.json and peer-exchange-v1.json.

    scripts/gen_stream_vectors.py          rewrite the files
    scripts/gen_stream_vectors.py --check  exit 1 unless the files on disk are what it generates

The bytes are built here from the specs (protocols/sync-v1.md, protocols/peer-exchange-v1.md) with
struct and msgpack, not by the reference implementation; tests/wire/test_stream_vectors.py then runs
the reference server and client against them. The envelopes a sync answer carries are taken from
protocols/vectors/valid.json (round r-0001's manifest and aggregate).
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from fednode.wire.vector_files import generator_main

VECTOR_DIR = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
ALICE = "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"  # seed 01 x 32

# Limits (sync-v1.md, "Parameters"; peer-exchange-v1.md, "Parameters")
MAX_SYNC_REQUEST_BYTES = 1024
MAX_SYNC_MESSAGES = 8
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_SYNC_RESPONSE_BYTES = MAX_SYNC_MESSAGES * MAX_ENVELOPE_BYTES + 1024
MAX_ADDRS_PER_PEER = 8
MAX_PEER_EXCHANGE_BYTES = 64 * 1024
MAX_EXCHANGED_PEERS = 32


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def valid_envelopes() -> dict[str, str]:
    doc = json.loads((VECTOR_DIR / "valid.json").read_text(encoding="utf-8"))
    return {v["name"]: v["hex"] for v in doc["vectors"]}


def sync_file() -> dict[str, Any]:
    env = valid_envelopes()
    held = [env["round-manifest-original-defaults"], env["aggregate-announce"]]
    requests = [
        {"name": "request-held-round", "round_id": "r-0001", "hex": frame(pack({"round_id": "r-0001"})).hex(),
         "expect": {"answer": True, "response_hex": frame(pack([bytes.fromhex(h) for h in held])).hex()},
         "description": "A request for r-0001, which the server holds (manifest and aggregate): one frame "
                        "with an array of two bin envelopes, in the order manifest, outcome; then EOF."},
        {"name": "request-unknown-round", "round_id": "r-0404", "hex": frame(pack({"round_id": "r-0404"})).hex(),
         "expect": {"answer": True, "response_hex": frame(pack([])).hex()},
         "description": "A request for a round the server does not hold: the empty array (00000001 90)."},
        {"name": "request-extra-key-ignored", "round_id": "r-0001",
         "hex": frame(pack({"round_id": "r-0001", "since": 3})).hex(),
         "expect": {"answer": True, "response_hex": frame(pack([bytes.fromhex(h) for h in held])).hex()},
         "description": "Unknown keys in the request map are ignored (room for later minor versions)."},
        {"name": "request-frame-too-large", "hex": struct.pack(">I", MAX_SYNC_REQUEST_BYTES + 1).hex(),
         "expect": {"answer": False, "refused": "too_large"},
         "description": "A length prefix above MAX_SYNC_REQUEST_BYTES: the server closes without reading on."},
        {"name": "request-truncated", "hex": (struct.pack(">I", 20) + pack({"round_id": "r"})).hex(),
         "expect": {"answer": False, "refused": "bad_request"},
         "description": "The stream ends (EOF) before the frame's 20 announced bytes."},
        {"name": "request-not-msgpack", "hex": frame(b"\xc1").hex(),
         "expect": {"answer": False, "refused": "bad_request"},
         "description": "The payload is not msgpack (c1 is never used)."},
        {"name": "request-not-a-map", "hex": frame(pack(["r-0001"])).hex(),
         "expect": {"answer": False, "refused": "bad_request"}, "description": "The payload is an array."},
        {"name": "request-round-id-not-str", "hex": frame(pack({"round_id": 1})).hex(),
         "expect": {"answer": False, "refused": "bad_request"}, "description": "round_id is an integer."},
        {"name": "request-round-id-too-long", "hex": frame(pack({"round_id": "r" * 65})).hex(),
         "expect": {"answer": False, "refused": "bad_request"},
         "description": "round_id of 65 characters (more than an id's 64)."},
    ]
    responses = [
        {"name": "response-two-envelopes", "hex": frame(pack([bytes.fromhex(h) for h in held])).hex(),
         "expect": {"ok": True, "envelopes_hex": held},
         "description": "What request-held-round gets; each entry is then validated as an envelope."},
        {"name": "response-empty", "hex": frame(pack([])).hex(), "expect": {"ok": True, "envelopes_hex": []},
         "description": "The server holds nothing for the round."},
        {"name": "response-too-many", "hex": frame(pack([bytes([i]) for i in range(MAX_SYNC_MESSAGES + 2)])).hex(),
         "expect": {"ok": True, "envelopes_hex": [bytes([i]).hex() for i in range(MAX_SYNC_MESSAGES)]},
         "description": "More than MAX_SYNC_MESSAGES entries: the client keeps the first 8 (and validates them; "
                        "these 1-byte entries then fail as malformed envelopes)."},
        {"name": "response-str-entries", "hex": frame(pack([held[0]])).hex(), "expect": {"ok": False},
         "description": "An entry that is str (here the hex text) instead of bin: the whole response is refused."},
        {"name": "response-not-an-array", "hex": frame(pack({"messages": []})).hex(), "expect": {"ok": False},
         "description": "The payload is a map: refused."},
        {"name": "response-frame-too-large", "hex": struct.pack(">I", MAX_SYNC_RESPONSE_BYTES + 1).hex(),
         "expect": {"ok": False}, "description": "A length prefix above MAX_SYNC_RESPONSE_BYTES: refused unread."},
        {"name": "response-truncated", "hex": frame(pack([]))[:-1].hex(), "expect": {"ok": False},
         "description": "EOF inside the frame."},
    ]
    return {"description": "/fednode/sync/1.0.0: request frames a server must answer or refuse, and response "
                           "frames a client must accept or refuse.",
            "spec": "protocols/sync-v1.md", "generator": "scripts/gen_stream_vectors.py",
            "protocol_id": "/fednode/sync/1.0.0",
            "server_holds": {"r-0001": held},
            "limits": {"max_request_bytes": MAX_SYNC_REQUEST_BYTES, "max_messages": MAX_SYNC_MESSAGES,
                       "max_response_bytes": MAX_SYNC_RESPONSE_BYTES},
            "requests": requests, "responses": responses}


def peer_exchange_file() -> dict[str, Any]:
    bob = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"  # seed 02 x 32
    carol = "12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba"  # seed 03 x 32
    two = [[bob, ["/ip4/192.0.2.2/tcp/4001", "/ip6/2001:db8::2/tcp/4001"]], [carol, ["/ip4/192.0.2.3/tcp/4001"]]]
    many_addrs = [f"/ip4/192.0.2.{i}/tcp/4001" for i in range(1, MAX_ADDRS_PER_PEER + 3)]
    responses = [
        {"name": "two-peers", "hex": pack(two).hex(), "expect": {"peers": {bob: two[0][1], carol: two[1][1]}},
         "description": "What a server connected to bob and carol (besides the asker) writes, then EOF."},
        {"name": "no-peers", "hex": pack([]).hex(), "expect": {"peers": {}},
         "description": "A server with no other connection: the empty array (90)."},
        {"name": "addresses-capped", "hex": pack([[bob, many_addrs]]).hex(),
         "expect": {"peers": {bob: many_addrs[:MAX_ADDRS_PER_PEER]}},
         "description": "More than MAX_ADDRS_PER_PEER addresses: the client uses the first 8."},
        {"name": "bad-entry-skipped", "hex": pack([[bob, two[0][1]], ["not a peer id", ["/ip4/192.0.2.9/tcp/1"]],
                                                     ["abc", ["/ip4/192.0.2.9/tcp/1"]], [carol, two[1][1]]]).hex(),
         "expect": {"peers": {bob: two[0][1], carol: two[1][1]}},
         "description": "Entries whose peer id is not base58 ('not a peer id') or not a whole multihash ('abc') "
                        "are skipped; the others are used."},
        {"name": "bad-address-skips-entry", "hex": pack([[bob, ["not-a-multiaddr"]], [carol, two[1][1]]]).hex(),
         "expect": {"peers": {carol: two[1][1]}},
         "description": "An entry with an address that does not parse is skipped whole."},
        {"name": "not-msgpack", "hex": "c1", "expect": {"peers": {}}, "description": "Garbage: nothing learned."},
        {"name": "not-an-array", "hex": pack({bob: two[0][1]}).hex(), "expect": {"peers": {}},
         "description": "A map instead of an array: nothing learned."},
        {"name": "too-large",
         "hex": pack([[bob, ["/ip4/192.0.2.2/tcp/4001"]], "x" * (MAX_PEER_EXCHANGE_BYTES - 60)]).hex(),
         "expect": {"peers": {}},
         "description": "A valid first entry, then padding to just over MAX_PEER_EXCHANGE_BYTES (64 KiB): the "
                        "answer is refused whole, nothing learned."},
    ]
    return {"description": "/fednode/peers/1.0.0: answers a client must read (the asker sends nothing).",
            "spec": "protocols/peer-exchange-v1.md", "generator": "scripts/gen_stream_vectors.py",
            "protocol_id": "/fednode/peers/1.0.0", "asker": ALICE,
            "limits": {"max_response_bytes": MAX_PEER_EXCHANGE_BYTES, "max_addrs_per_peer": MAX_ADDRS_PER_PEER,
                       "max_peers": MAX_EXCHANGED_PEERS},
            "server_connections": {ALICE: ["/ip4/192.0.2.1/tcp/4001"], **{p: a for p, a in two}},
            "server_answer_hex": pack(two).hex(),
            "responses": responses}


FILES = {"sync-v1.json": sync_file, "peer-exchange-v1.json": peer_exchange_file}


def render(build: Callable[[], dict[str, Any]]) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    return generator_main(argv, doc=__doc__, generator="scripts/gen_stream_vectors.py", vector_dir=VECTOR_DIR,
                          renders={name: functools.partial(render, build) for name, build in FILES.items()})

if __name__ == "__main__":
    sys.exit(main())
