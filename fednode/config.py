"""Node configuration: TOML (stdlib tomllib) -> frozen dataclasses.

Every key has a default here, and `configs/node.toml` documents each one. Unknown keys, wrong
types and out-of-range values raise ConfigError naming the file, the key and what was expected.
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.errors import ConfigError
from fednode.wire.codec import DECODE_CACHE_MAX_BYTES, DECODE_CACHE_MAX_ENTRIES
from fednode.wire.messages import AGGREGATION_METHODS

TRAINER_KEY = "learning.trainer"
# [learning] placement choices; fednode.learning.accel resolves "auto" against the machine.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZATION_CHOICES = ("none", "4bit")
MAX_GRADIENT_ACCUMULATION_STEPS = 1024


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, doc: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeSection:
    data_dir: str = _opt("./fednode-data", doc="where blobs, state.sqlite, adapters and rounds live")
    key_file: str = _opt("node.key", doc="Ed25519 key file (mode 0600); relative to data_dir")
    name: str = _opt("", doc="display name for logs and status")
    keep_rounds: int = _opt(50, lo=0, hi=1_000_000_000,
                            doc="finished rounds kept (rows, records, adapters, blobs only they use); "
                                "older ones are deleted after each round; 0 = keep all")


@dataclass(frozen=True)
class NetworkSection:
    listen: list[str] = _opt(["/ip4/0.0.0.0/tcp/4001"], doc="libp2p listen multiaddrs")
    bootstrap: list[str] = _opt([], doc="multiaddrs with /p2p/<peer id> dialled at start")
    gossip_heartbeat_seconds: float = _opt(1.0, lo=1.0, hi=60.0, doc="gossipsub mesh heartbeat (whole seconds)")
    mesh_degree: int = _opt(4, lo=1, hi=1000, doc="gossipsub mesh degree D: peers each gossip message is "
                            "forwarded to (fewer: less idle CPU, slower spread)")
    mesh_degree_low: int = _opt(3, lo=1, hi=1000, doc="gossipsub D_low: graft peers when the mesh is smaller")
    mesh_degree_high: int = _opt(6, lo=1, hi=1000, doc="gossipsub D_high: prune peers when the mesh is larger")
    gossip_lazy_degree: int = _opt(3, lo=0, hi=1000, doc="gossipsub D_lazy: peers outside the mesh sent IHAVE "
                                   "each gossip heartbeat (at least; 1/4 of them when more)")
    max_message_bytes: int = _opt(65536, lo=1024, hi=1048576, doc="largest control message accepted")
    reconnect_backoff_max_seconds: float = _opt(30.0, lo=0.1, hi=3600.0, doc="cap of reconnect backoff")
    target_peers: int = _opt(8, lo=1, hi=10000, doc="dial peers learned by peer exchange until this many")
    peer_exchange: bool = _opt(True, doc="learn peers beyond the bootstrap list (/fednode/peers/1.0.0)")
    dial_timeout_seconds: float = _opt(10.0, lo=0.1, hi=600.0, doc="give up one dial after this long")
    max_pending_stream_opens: int = _opt(256, lo=1, hi=1_000_000,  # transport.deadline.DEFAULT_MAX_PENDING_CALLS
                                         doc="stream opens and peer exchanges running at once, those py-libp2p "
                                             "still holds past their deadline included; more are refused")
    subscription_buffer: int = _opt(1024, lo=16, hi=1_000_000, doc="gossip messages buffered per topic "
                                    "before drops (always counted and logged)")
    max_messages_per_second: float = _opt(500.0, lo=1.0, hi=1e6, doc="gossipsub spam limit per forwarding peer")
    decode_cache_entries: int = _opt(DECODE_CACHE_MAX_ENTRIES, lo=1, hi=1_000_000,
                                     doc="decoded gossip messages kept by id, so validator and reader decode once")
    decode_cache_bytes: int = _opt(DECODE_CACHE_MAX_BYTES, lo=65536, hi=1 << 30,
                                   doc="bytes the decode cache holds at most (encoded size + 1 KiB per entry)")


@dataclass(frozen=True)
class CommunitySection:
    id: str = _opt("default", doc="community id; topic is fednode/<id>/1")
    members: list[str] = _opt([], doc="allowlist of peer ids; empty = open community")
    replay_window_seconds: float = _opt(300.0, lo=1.0, hi=86400.0, doc="oldest message accepted")
    max_clock_skew_seconds: float = _opt(30.0, lo=0.0, hi=3600.0, doc="newest (future) message accepted")
    seen_cache_size: int = _opt(65536, lo=1, hi=10_000_000, doc="message ids remembered to drop duplicates")


@dataclass(frozen=True)
class ResearchSection:
    federated_learning: bool = _opt(False, doc="the gate: take part in federated rounds at all")


@dataclass(frozen=True)
class CoordinatorSection:
    mode: str = _opt("elect", choices=("elect", "fixed"), doc="elect a coordinator, or follow a fixed one")
    fixed_peer_id: str = _opt("", doc="with mode = fixed: the coordinator's peer id")
    heartbeat_interval_seconds: float = _opt(2.0, lo=0.05, hi=600.0, doc="signed heartbeat period")
    liveness_timeout_heartbeats: float = _opt(2.5, lo=1.5, hi=100.0,
                                              doc="heartbeat intervals of silence before a peer counts as dead")
    heartbeat_fanin: int = _opt(4, lo=0, hi=100000,
                                doc="members per heartbeat interval before a member that is not the coordinator "
                                    "slows its heartbeats: it beats every heartbeat_interval_seconds x live members "
                                    "/ this (election-v1 rule 14), so a node's inbound heartbeat rate stays near "
                                    "this many per interval however large the community (0 = never slow down)")
    max_heartbeat_interval_seconds: float = _opt(30.0, lo=0.05, hi=3600.0,
                                                 doc="the slowest heartbeat pace of rule 14, and the most a member's "
                                                     "declared pace is believed (never below "
                                                     "heartbeat_interval_seconds)")
    idle_heartbeat_interval_seconds: float = _opt(30.0, lo=0.0, hi=3600.0,
                                                  doc="the coordinator's heartbeat pace while it knows no round can "
                                                      "open for twice this long (max_rounds reached, a long pause), "
                                                      "and its followers' (election-v1 rule 18): an idle community "
                                                      "costs next to nothing, and a dead coordinator is noticed after "
                                                      "liveness_timeout_heartbeats x this (0 = off; taken between "
                                                      "heartbeat_interval_seconds and max_heartbeat_interval_seconds)")
    rejoin_wait_heartbeats: float = _opt(30.0, lo=0.0, hi=100000.0,
                                         doc="after a restart, open no round and settle no unknown outcome until "
                                             "every member of the latest published round is heard, or this many "
                                             "heartbeat intervals pass (0 = no wait); also the window of 'recent' "
                                             "members: a round taken over is called unpublished only by a majority "
                                             "of them, and its earlier coordinator, if among them, must answer "
                                             "(so a failover waits up to this long for a silent coordinator)")


@dataclass(frozen=True)
class RoundSection:
    min_participants: int = _opt(2, lo=1, hi=10000, doc="fewer by the deadline fails the round")
    max_participants: int = _opt(20, lo=1, hi=10000, doc="submissions accepted at most")
    round_timeout_seconds: float = _opt(3600.0, lo=1.0, hi=604800.0, doc="deadline after the manifest")
    local_steps: int = _opt(20, lo=1, hi=1000000, doc="optimizer steps per node per round")
    learning_rate: float = _opt(2e-4, lo=1e-9, hi=10.0, doc="local learning rate")
    lora_rank: int = _opt(16, lo=1, hi=1024, doc="LoRA rank r")
    lora_alpha: float = _opt(32.0, lo=1e-6, hi=1e6, doc="LoRA alpha")
    aggregation: str = _opt("fedavg", choices=AGGREGATION_METHODS, doc="aggregation rule")
    max_rounds: int = _opt(0, lo=0, hi=10**9, doc="stop after this many rounds (0 = run forever)")
    pause_seconds: float = _opt(0.0, lo=0.0, hi=86400.0, doc="pause between rounds")
    reannounce_seconds: float = _opt(5.0, lo=0.0, hi=86400.0,
                                     doc="a participant re-publishes its submission after this long, doubling "
                                         "the gap each time, until the round closes (0 = only on failover)")
    wait_for_members: int = _opt(0, lo=0, hi=10000,
                                 doc="coordinator starts a round once this many federated members are live "
                                     "(0 = min_participants)")


@dataclass(frozen=True)
class LearningSection:
    task: str = _opt("minilm-bbc", choices=("minilm-bbc", "smollm2-lm", "fake"), doc="training task profile")
    base_model_id: str = _opt("", doc="local HF model dir; empty = the task's embedded model")
    model_cache_dir: str = _opt("~/.cache/fednode/models", doc="converted-model cache (SmolLM2 fp32)")
    partition: str = _opt("dirichlet", choices=("iid", "dirichlet"), doc="how the node's data share is drawn")
    dirichlet_alpha: float = _opt(0.5, lo=1e-3, hi=1e6, doc="label skew; smaller = more skewed")
    node_index: int = _opt(0, lo=0, hi=100000, doc="this node's share of the partition")
    num_nodes: int = _opt(1, lo=1, hi=100000, doc="number of shares the data is split into")
    seed: int = _opt(0, lo=0, hi=2**31 - 1, doc="data split and training seed")
    batch_size: int = _opt(16, lo=1, hi=4096, doc="training batch size")
    max_length: int = _opt(64, lo=8, hi=8192, doc="tokens per example")
    torch_threads: int = _opt(1, lo=1, hi=256, doc="torch intra-op threads")
    lr_schedule: str = _opt("linear", choices=("constant", "linear", "cosine"),
                            doc="learning rate within one round's local steps, from round.learning_rate down")
    lr_floor: float = _opt(0.1, lo=0.0, hi=1.0, doc="the last local step's rate, as a fraction of the peak")
    target_modules: list[str] = _opt([], doc="LoRA target module names, or [\"all-linear\"]; empty = the task's "
                                     "own, or for a base_model_id dir PEFT's default for its architecture "
                                     "(else all linear layers)")
    device: str = _opt("auto", choices=DEVICE_CHOICES, doc="where to train; auto = cuda, then mps, then cpu")
    precision: str = _opt("auto", choices=PRECISION_CHOICES, doc="autocast dtype; auto = bf16 on cuda that has it, "
                          "else fp16 on cuda/mps, fp32 on cpu. Adapters stay fp32")
    gradient_accumulation_steps: int = _opt(1, lo=1, hi=MAX_GRADIENT_ACCUMULATION_STEPS,
                                            doc="batches per optimizer step (effective batch = batch_size x this)")
    gradient_checkpointing: bool = _opt(False, doc="recompute activations in backward: less memory, ~30% slower")
    quantization: str = _opt("none", choices=QUANTIZATION_CHOICES, doc="\"4bit\" = QLoRA: NF4 base weights "
                             "through bitsandbytes; needs CUDA")
    fake_step_seconds: float = _opt(0.0, lo=0.0, hi=60.0, doc="task \"fake\" only: seconds each step takes "
                                    "(simulates training time in protocol tests)")
    fake_aggregate_delay_seconds: float = _opt(0.0, lo=0.0, hi=600.0, doc="task \"fake\" only: the coordinator "
                                               "waits this long before aggregating (fault tests act in that gap)")
    evaluate: bool = _opt(True, doc="evaluate local and merged adapters on the held-out split each round")
    trainer: str = _opt("", doc="your own training code: \"package.module:factory\"; factory(config) returns an "
                        "object with the Trainer protocol (fednode/node/trainers.py); empty = the task's trainer")
    trainer_path: str = _opt("", doc="folder put first on sys.path to import learning.trainer from; relative to "
                             "the config file's folder")


DATA_FORMATS = ("chat", "instruction", "text", "classification")
OVERLENGTH_ACTIONS = ("truncate", "drop", "error")
DEFAULT_DATA_EVAL_FRACTION = 0.1
DEFAULT_MAX_DATA_ROWS = 1_000_000


@dataclass(frozen=True)
class DataSection:
    """The node's own training data (issue 10). Read and validated by fednode.learning.local_data
    when the node starts or `fednode config --check` runs; empty `path` = the task's built-in data."""

    path: str = _opt("", doc="the node's own data: a JSONL/CSV/Parquet file, a folder of them, or a `datasets` "
                     "save_to_disk folder; relative to this file (empty = the task's built-in data)")
    format: str = _opt("text", choices=DATA_FORMATS, doc="chat (messages), instruction (prompt/completion or "
                       "alpaca), text (plain causal LM) or classification (text + label)")
    eval_path: str = _opt("", doc="held-out data in the same format (empty = a seeded eval_fraction of path)")
    eval_fraction: float = _opt(DEFAULT_DATA_EVAL_FRACTION, lo=0.0, hi=0.5,
                                doc="with no eval_path: the share of the rows held out for evaluation")
    seed: int = _opt(0, lo=0, hi=2**31 - 1, doc="seeds the eval_fraction split")
    messages_column: str = _opt("messages", doc="chat: the list of {role, content} turns")
    prompt_column: str = _opt("prompt", doc="instruction: the prompt (no loss)")
    completion_column: str = _opt("completion", doc="instruction: the completion (the loss)")
    instruction_column: str = _opt("instruction", doc="instruction, alpaca style (when prompt_column is absent)")
    input_column: str = _opt("input", doc="instruction, alpaca style: optional context")
    output_column: str = _opt("output", doc="instruction, alpaca style: the answer (the loss)")
    text_column: str = _opt("text", doc="text and classification: the text")
    label_column: str = _opt("label", doc="classification: the label (a string, or an integer written as one)")
    labels: list[str] = _opt([], doc="classification: every label, in head order; part of the task's identity, "
                             "so every node lists the same labels even when its data lacks some")
    overlength: str = _opt("truncate", choices=OVERLENGTH_ACTIONS,
                           doc="rows over learning.max_length tokens: truncate, drop (both counted) or refuse")
    max_rows: int = _opt(DEFAULT_MAX_DATA_ROWS, lo=1, hi=10**9, doc="more rows than this (train and eval "
                         "files together) is an error")


@dataclass(frozen=True)
class BlobsSection:
    max_blob_bytes: int = _opt(1 << 30, lo=1024, hi=1 << 40, doc="largest blob fetched or served")
    chunk_bytes: int = _opt(1 << 20, lo=4096, hi=4 << 20, doc="chunk size of new blob manifests")
    max_streams_per_peer: int = _opt(4, lo=1, hi=1024, doc="concurrent blob streams served per peer")
    fetch_timeout_seconds: float = _opt(600.0, lo=1.0, hi=86400.0, doc="give up a fetch after this long")
    send_timeout_seconds: float = _opt(20.0, lo=0.1, hi=3600.0,
                                       doc="a served stream whose frame does not leave in this long is aborted")
    idle_timeout_seconds: float = _opt(60.0, lo=0.1, hi=86400.0,
                                       doc="a served stream with no request for this long is closed")


@dataclass(frozen=True)
class AggregationSection:
    max_update_norm: float = _opt(1e4, lo=1e-9, hi=1e12, doc="L2 bound on one update; above is REJECTed")
    trim_beta: float = _opt(0.2, lo=0.0, hi=0.49, doc="trimmed_mean: fraction cut at each end")
    clip_norm: float = _opt(0.0, lo=0.0, hi=1e12, doc="clipped_fedavg bound (0 = median client norm)")
    dp_noise_multiplier: float = _opt(0.0, lo=0.0, hi=100.0, doc="DP Gaussian noise std / clip (0 = off)")
    dp_clip_norm: float = _opt(1.0, lo=1e-9, hi=1e12,
                               doc="with dp_noise_multiplier > 0: every update is clipped to this L2 bound")
    exact_max_batch_bytes: int = _opt(96 * 2**20, lo=2**20, hi=2**40,
                                      doc="exact: float64 working set of one batch of equal-shape modules")


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = _opt(False, doc="serve Prometheus /metrics on 127.0.0.1")
    port: int = _opt(9464, lo=1, hi=65535, doc="metrics port")


@dataclass(frozen=True)
class ControlSection:
    socket: str = _opt("control.sock", doc="unix socket for `fednode status`; relative to data_dir")


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    community: CommunitySection = field(default_factory=CommunitySection)
    research: ResearchSection = field(default_factory=ResearchSection)
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    round: RoundSection = field(default_factory=RoundSection)
    learning: LearningSection = field(default_factory=LearningSection)
    data: DataSection = field(default_factory=DataSection)
    blobs: BlobsSection = field(default_factory=BlobsSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    control: ControlSection = field(default_factory=ControlSection)
    source: str = field(default="<defaults>", compare=False)

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.node.data_dir))

    @property
    def key_path(self) -> Path:
        return self.data_dir / os.path.expanduser(self.node.key_file)

    @property
    def control_socket_path(self) -> Path:
        return self.data_dir / self.control.socket


def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, "a list of strings")


def _check_value(where: str, key: str, tp: Any, value: Any, meta: typing.Mapping[str, Any]) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: key '{key}': expected {expected}, got {value!r}")

    if tp is bool:
        if not isinstance(value, bool):
            raise fail("a boolean (true or false)")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise fail("a string")
    else:  # list[str]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise fail(f"{_type_name(tp)} in [{lo}, {hi}]")
    if choices is not None and value not in choices:
        raise fail("one of " + ", ".join(repr(c) for c in choices))
    return value


def _load_section(where: str, section: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{section}.{key}'{hint}; known keys: {', '.join(known)}")
        tp = hints[key]
        if isinstance(tp, types.GenericAlias):
            tp = list
        values[key] = _check_value(where, f"{section}.{key}", tp, value, known[key].metadata)
    return cls(**values)


def parse_config(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]; known sections: {', '.join(sections)}")
        values[name] = _load_section(source, name, hints[name], table)
    config = Config(**values, source=source)
    if base_dir is not None and not Path(os.path.expanduser(config.node.data_dir)).is_absolute():
        node = dataclasses.replace(config.node, data_dir=str((base_dir / config.node.data_dir).resolve()))
        config = dataclasses.replace(config, node=node)
    trainer_path = config.learning.trainer_path
    if base_dir is not None and trainer_path and not Path(os.path.expanduser(trainer_path)).is_absolute():
        learning = dataclasses.replace(config.learning, trainer_path=str((base_dir / trainer_path).resolve()))
        config = dataclasses.replace(config, learning=learning)
    elif trainer_path:
        learning = dataclasses.replace(config.learning, trainer_path=os.path.expanduser(trainer_path))
        config = dataclasses.replace(config, learning=learning)
    if base_dir is not None:
        config = dataclasses.replace(config, data=_resolve_data_paths(config.data, base_dir))
    _check_cross_fields(config)
    return config


def _resolve_data_paths(data: DataSection, base_dir: Path) -> DataSection:
    def resolve(path: str) -> str:
        if not path:
            return path
        expanded = Path(os.path.expanduser(path))
        return str(expanded if expanded.is_absolute() else (base_dir / expanded).resolve())

    return dataclasses.replace(data, path=resolve(data.path), eval_path=resolve(data.eval_path))


def _check_data_section(where: str, data: DataSection) -> None:
    """What can be said without reading the files (fednode.learning.local_data reads them)."""
    if not data.path:
        for key in ("eval_path", "labels"):
            if getattr(data, key):
                raise ConfigError(f"{where}: key 'data.{key}' is set but 'data.path' is empty (the built-in "
                                  f"task data has its own split and labels)")
        return
    if data.format == "classification":
        if len(data.labels) < 2:
            raise ConfigError(f"{where}: key 'data.labels': format \"classification\" needs the full label list "
                              f"(at least 2), in head order, equal on every node; got {data.labels!r}")
        dupes = sorted({label for label in data.labels if data.labels.count(label) > 1})
        if dupes or "" in data.labels:
            raise ConfigError(f"{where}: key 'data.labels': labels must be distinct and non-empty; "
                              f"{'repeated: ' + ', '.join(map(repr, dupes)) if dupes else 'an empty label'}")
    elif data.labels:
        raise ConfigError(f"{where}: key 'data.labels' is only for format \"classification\" "
                          f"(format is {data.format!r})")


def _check_aggregate_fits(config: Config) -> None:
    """The coordinator's AggregateAnnounce names every contribution and must fit in one control
    message, so max_participants is bounded by network.max_message_bytes (about 400 per 64 KiB)."""
    from fednode.wire.messages import aggregate_announce_bytes

    n, limit = config.round.max_participants, config.network.max_message_bytes
    if aggregate_announce_bytes(n) <= limit:
        return
    lo, hi = 0, n  # the most that fit: aggregate_announce_bytes(lo) <= limit < aggregate_announce_bytes(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if aggregate_announce_bytes(mid) <= limit else (lo, mid)
    raise ConfigError(f"{config.source}: key 'round.max_participants' ({n}): the aggregate announcement naming "
                      f"{n} contributions would be {aggregate_announce_bytes(n)} bytes, over "
                      f"'network.max_message_bytes' ({limit}); at most {lo} fit (or raise max_message_bytes)")


_LISTEN_FORM = "/ip4/<address>/tcp/<port> or /ip6/<address>/tcp/<port>"
_BOOTSTRAP_FORM = "/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<peer id>"


def _check_multiaddrs(config: Config) -> None:
    """Malformed listen/bootstrap addresses are config errors naming the key and the value (before,
    `config --check` passed them and `run` died in libp2p with a 60-line ExceptionGroup)."""
    from multiaddr import Multiaddr  # installed with libp2p; imported only here, config stays light

    def parse(key: str, addr: str, form: str) -> list[tuple[str, str]]:
        def fail(problem: str) -> ConfigError:
            return ConfigError(f"{config.source}: key '{key}': {addr!r} {problem}; expected {form}")

        try:
            parsed = Multiaddr(addr)
            names = [p.name for p in parsed.protocols()]
            values = [parsed.value_for_protocol(p.code) or "" for p in parsed.protocols()]
        except Exception as exc:  # the multiaddr package raises several types for "malformed"
            detail = str(exc).split(" (string:", 1)[0]
            raise fail(f"is not a valid multiaddr ({detail})") from None
        if len(names) < 2 or names[1] != "tcp":
            raise fail("is not a TCP address")
        return list(zip(names, values, strict=True))

    for addr in config.network.listen:
        parts = parse("network.listen", addr, _LISTEN_FORM)
        if parts[0][0] not in ("ip4", "ip6") or len(parts) != 2:
            raise ConfigError(f"{config.source}: key 'network.listen': {addr!r} cannot be listened on; "
                              f"expected {_LISTEN_FORM}")
    for addr in config.network.bootstrap:
        parts = parse("network.bootstrap", addr, _BOOTSTRAP_FORM)
        if parts[0][0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or len(parts) != 3 or parts[2][0] != "p2p":
            raise ConfigError(f"{config.source}: key 'network.bootstrap': {addr!r} must end in /p2p/<peer id> "
                              f"after a host and TCP port; expected {_BOOTSTRAP_FORM}")


def _check_cross_fields(config: Config) -> None:
    where = config.source
    _check_multiaddrs(config)
    if config.round.min_participants > config.round.max_participants:
        raise ConfigError(f"{where}: key 'round.min_participants' ({config.round.min_participants}) "
                          f"must not exceed 'round.max_participants' ({config.round.max_participants})")
    net = config.network
    if not net.mesh_degree_low <= net.mesh_degree <= net.mesh_degree_high:
        raise ConfigError(f"{where}: keys 'network.mesh_degree_low' ({net.mesh_degree_low}) <= "
                          f"'network.mesh_degree' ({net.mesh_degree}) <= 'network.mesh_degree_high' "
                          f"({net.mesh_degree_high}) must hold")
    if config.coordinator.mode == "fixed" and not config.coordinator.fixed_peer_id:
        raise ConfigError(f"{where}: key 'coordinator.fixed_peer_id' is required when coordinator.mode = \"fixed\"")
    _check_aggregate_fits(config)
    from fednode.blobs.manifest import DEFAULT_MAX_CHUNKS as max_chunks  # msgpack only: config stays light

    if config.blobs.max_blob_bytes > config.blobs.chunk_bytes * max_chunks:
        raise ConfigError(f"{where}: key 'blobs.max_blob_bytes' ({config.blobs.max_blob_bytes}) must not exceed "
                          f"{max_chunks} chunks of 'blobs.chunk_bytes' ({config.blobs.chunk_bytes}), "
                          f"the most one manifest lists")
    if config.learning.trainer:
        split_trainer_spec(config.learning.trainer, where=where)
    _check_data_section(where, config.data)
    if config.learning.node_index >= config.learning.num_nodes:
        raise ConfigError(f"{where}: key 'learning.node_index' ({config.learning.node_index}) "
                          f"must be below 'learning.num_nodes' ({config.learning.num_nodes})")


def split_trainer_spec(spec: str, *, where: str = "") -> tuple[str, str]:
    """'package.module:factory' -> ('package.module', 'factory'); anything else is a ConfigError."""
    module, sep, attr = spec.partition(":")
    names = [*module.split("."), *attr.split(".")]
    if not sep or not all(n.isidentifier() for n in names):
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}key '{TRAINER_KEY}': expected \"package.module:factory\" (a module path, a "
                          f"colon, a callable's name), got {spec!r}")
    return module, attr


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load a TOML config file; missing keys take their defaults."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    return parse_config(text, source=str(p), base_dir=p.resolve().parent)


def config_keys() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: used by docs and the example-config test."""
    return [(section, f.name, _field_default(f), f.metadata.get("doc", "")) for section, f in _config_fields()]


def _config_fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    hints = typing.get_type_hints(Config)
    return [(sec.name, f) for sec in dataclasses.fields(Config) if sec.name != "source"
            for f in dataclasses.fields(hints[sec.name])]


def _field_default(f: dataclasses.Field[Any]) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]


def config_choices() -> dict[str, tuple[str, ...]]:
    """{"section.key": allowed values} for every enum key (those declared with `choices`)."""
    return {f"{section}.{f.name}": f.metadata["choices"] for section, f in _config_fields()
            if f.metadata.get("choices")}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        import json

        return json.dumps(value)
    return repr(value)


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write a {section: {key: value}} mapping (the shape of our configs) as TOML."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(Config)
            if f.name != "source"}


def example_toml(values: dict[str, dict[str, Any]] | None = None) -> str:
    """The documented example config (configs/node.toml is this text; a test keeps them equal).
    `values` = {section: {key: value}} written instead of the defaults (what `fednode init` sets)."""
    lines = [
        "# fednode node configuration: every key, with its default and meaning.",
        "# Load with `fednode run --config FILE`. Unknown keys, wrong types and out-of-range values",
        "# are errors that name the file and the key. Relative paths resolve against this file's folder.",
    ]
    current = None
    for section, f in _config_fields():
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        doc, choices = f.metadata.get("doc", ""), f.metadata.get("choices")
        if choices:
            doc += "; one of " + ", ".join(_toml_value(c) for c in choices)
        value = (values or {}).get(section, {}).get(f.name, _field_default(f))
        lines += [f"# {doc}", f"{f.name} = {_toml_value(value)}"]
    return "\n".join(lines) + "\n"


def config_markdown() -> str:
    """Every key as a Markdown table (README.md embeds it; a test keeps them equal)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, f in _config_fields():
        doc, choices = f.metadata.get("doc", ""), f.metadata.get("choices")
        if choices:
            doc += "; one of " + ", ".join(f"`{_toml_value(c)}`" for c in choices)
        rows.append(f"| `{section}.{f.name}` | `{_toml_value(_field_default(f))}` | {doc} |")
    return "\n".join(rows) + "\n"
