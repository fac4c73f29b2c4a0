"""`fednode init`: a node folder (key + commented node.toml) set up from flags, and what to tell
the other members.

Every value a flag sets is an ordinary config key, written into the full commented example config,
so the file an operator opens later still explains every other key. Nothing is written until the
whole config has been checked, so a bad flag leaves no half-made folder behind.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.config import Config, config_keys, example_toml, parse_config
from fednode.errors import ConfigError, DecodeError
from fednode.identity import Identity, public_key_from_peer_id, write_key_file

CONFIG_NAME = "node.toml"
KEY_NAME = "node.key"
_SHARE = re.compile(r"(\d+)/(\d+)")
# Listening on these means "every interface": others must dial one of the machine's real addresses.
_UNSPECIFIED_HOSTS = {"ip4": "0.0.0.0", "ip6": "::"}
# The keys a dedicated flag sets (a --set of the same key would be ambiguous).
_FLAG_KEYS = {"learning.node_index": "--share", "learning.num_nodes": "--share", "network.listen": "--listen",
              "network.bootstrap": "--bootstrap", "community.id": "--community",
              "research.federated_learning": "--federated-learning", "node.data_dir": "DIR"}


@dataclass(frozen=True)
class InitOptions:
    folder: Path
    community: str = "default"
    federated_learning: bool = False
    share: str | None = None
    listen: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NodeFolder:
    identity: Identity
    key_path: Path
    config_path: Path
    config: Config


def parse_share(text: str) -> tuple[int, int]:
    """`--share I/N` (I counted from 1) -> (learning.node_index, learning.num_nodes)."""
    match = _SHARE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"--share {text!r}: expected I/N, this node's share I of N shares (e.g. 1/3)")
    i, n = int(match[1]), int(match[2])
    if not 1 <= i <= n:
        raise ConfigError(f"--share {text}: I counts the shares from 1 to N, so it must be in [1, {n}]")
    return i - 1, n


def parse_setting(text: str) -> tuple[str, str, Any]:
    """`--set SECTION.KEY=VALUE` -> (section, key, value); VALUE is a TOML value, and a string
    key also takes bare text (--set node.name=alice)."""
    name, sep, raw = text.partition("=")
    defaults = {f"{s}.{k}": d for s, k, d, _doc in config_keys()}
    if not sep or name.strip() not in defaults:
        close = difflib.get_close_matches(name.strip(), list(defaults), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        what = f"unknown key '{name.strip()}'{hint}" if sep else "expected SECTION.KEY=VALUE"
        raise ConfigError(f"--set {text}: {what}; `fednode config --example` lists every key")
    name, raw = name.strip(), raw.strip()
    if name in _FLAG_KEYS:
        raise ConfigError(f"--set {text}: '{name}' is set by {_FLAG_KEYS[name]}; use that instead")
    default = defaults[name]
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if not isinstance(default, str):
            raise ConfigError(f"--set {text}: '{raw}' is not a TOML value for key '{name}' "
                              f"(default {json.dumps(default)})") from None
        value = raw
    if isinstance(default, str) and not isinstance(value, str):
        value = raw  # --set node.name=5 means the name "5"
    section, key = name.split(".", 1)
    return section, key, value


def _check_bootstrap(addr: str) -> None:
    parts = addr.split("/")
    if "p2p" not in parts or parts.index("p2p") + 1 >= len(parts):
        raise ConfigError(f"--bootstrap {addr}: expected a multiaddr ending in /p2p/<peer id>, the address "
                          f"`fednode init` printed on that member")
    try:
        public_key_from_peer_id(parts[parts.index("p2p") + 1])
    except DecodeError as exc:
        raise ConfigError(f"--bootstrap {addr}: {exc}") from None
    if len(parts) > 2 and _UNSPECIFIED_HOSTS.get(parts[1]) == parts[2]:
        raise ConfigError(f"--bootstrap {addr}: {parts[2]} means 'every interface' on that member; replace it "
                          f"with that machine's reachable IP")


def init_values(opts: InitOptions) -> dict[str, dict[str, Any]]:
    """The config keys `fednode init` writes instead of the defaults."""
    values: dict[str, dict[str, Any]] = {
        "node": {"data_dir": "."},
        "community": {"id": opts.community},
        "research": {"federated_learning": opts.federated_learning},
    }
    if opts.share is not None:
        index, count = parse_share(opts.share)
        values["learning"] = {"node_index": index, "num_nodes": count}
    if opts.listen:
        values["network"] = {"listen": list(opts.listen)}
    for addr in opts.bootstrap:
        _check_bootstrap(addr)
    if opts.bootstrap:
        values.setdefault("network", {})["bootstrap"] = list(opts.bootstrap)
    for text in opts.settings:
        section, key, value = parse_setting(text)
        values.setdefault(section, {})[key] = value
    return values


def create_node_folder(opts: InitOptions) -> NodeFolder:
    """Check every flag, then write the key (mode 0600) and node.toml; refuses to overwrite either."""
    root = opts.folder
    config_path, key_path = root / CONFIG_NAME, root / KEY_NAME
    if config_path.exists():
        raise ConfigError(f"{config_path} already exists; refusing to overwrite it")
    text = example_toml(init_values(opts))
    config = parse_config(text, source=f"fednode init ({config_path})", base_dir=root.resolve())
    root.mkdir(parents=True, exist_ok=True)
    identity = write_key_file(key_path)
    config_path.write_text(text)
    return NodeFolder(identity, key_path, config_path, config)


def shareable_address(listen: str, node_id: str) -> tuple[str, str]:
    """(the multiaddr other members dial, what the operator does with it)."""
    address = f"{listen}/p2p/{node_id}"
    parts = listen.split("/")
    host = parts[2] if len(parts) > 2 else ""
    if len(parts) > 4 and parts[3] == "tcp" and parts[4] == "0":
        return address, "port 0 is chosen anew at every start: a member others bootstrap from needs a fixed port"
    if _UNSPECIFIED_HOSTS.get(parts[1] if len(parts) > 1 else "") == host:
        return address, (f"give this address to the other members for their --bootstrap, with {host} "
                         f"replaced by this machine's reachable IP")
    return address, "give this address to the other members for their --bootstrap"


def describe(folder: NodeFolder) -> str:
    """What `fednode init` prints (README.md's multi-machine guide shows it word for word)."""
    cfg = folder.config
    learning = cfg.learning
    gate = "true" if cfg.research.federated_learning else "false"
    lines = [f"node id:   {folder.identity.node_id}",
             f"key:       {folder.key_path} (mode 0600; keep it private)",
             f"config:    {folder.config_path}",
             f"community: {cfg.community.id}, federated_learning = {gate}"]
    keys = f"learning.node_index = {learning.node_index}, learning.num_nodes = {learning.num_nodes}"
    if learning.num_nodes > 1:
        lines.append(f"data:      share {learning.node_index + 1} of {learning.num_nodes} of task {learning.task} "
                     f"({keys})")
    else:
        lines.append(f"data:      all of task {learning.task} ({keys}); when N members train, "
                     "give each its own --share I/N")
    for listen in cfg.network.listen:
        address, note = shareable_address(listen, folder.identity.node_id)
        lines += [f"address:   {address}", f"           {note}"]
    lines += [f"bootstrap: {addr}" for addr in cfg.network.bootstrap]
    lines.append(f"next:      fednode run --config {folder.config_path}")
    return "\n".join(lines)
