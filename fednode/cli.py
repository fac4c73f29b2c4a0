"""Command-line interface: argument parsing only; the work happens in the packages."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fednode.errors import FednodeError

if TYPE_CHECKING:
    from fednode.node.reports import NodeStatus

Handler = Callable[[argparse.Namespace], int]
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, the shell's convention


def _cmd_keygen(args: argparse.Namespace) -> int:
    from fednode.identity import write_key_file

    identity = write_key_file(args.path, overwrite=args.force)
    print(identity.node_id)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from fednode.config import example_toml, load_config

    if args.example:
        sys.stdout.write(example_toml())
        return 0
    if args.markdown:
        from fednode.config import config_markdown

        sys.stdout.write(config_markdown())
        return 0
    if not args.check:
        print("fednode config: give --example or --check FILE", file=sys.stderr)
        return 2
    config = load_config(args.check)
    gate = "on" if config.research.federated_learning else "off"
    if config.data.path and config.learning.task == "fake":
        print(f"{args.check}: note: data.path is not read: learning.task = \"fake\" trains on no data")
    elif config.data.path:
        from fednode.learning.local_data import check_config_data

        print(check_config_data(config).report)  # raises DataError naming the file, row and column
    print(f"{args.check}: ok (community {config.community.id!r}, federated_learning {gate})")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fednode.node_init import InitOptions, create_node_folder, describe

    folder = create_node_folder(InitOptions(
        Path(args.dir), community=args.community, federated_learning=args.federated_learning, share=args.share,
        listen=args.listen or [], bootstrap=args.bootstrap or [], settings=args.set or []))
    print(describe(folder))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fednode.config import load_config
    from fednode.node.runner import main as run_main

    return run_main(load_config(args.config))


def _control_path(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from fednode.config import load_config

    if args.socket:
        return Path(args.socket)
    return load_config(args.config).control_socket_path


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    import trio

    from fednode.node.control import query_status

    status = trio.run(query_status, _control_path(args))
    if args.json:
        print(json.dumps(status.to_json(), indent=2, sort_keys=True))
        return 0
    print(_format_status(status))
    return 0


def _format_status(s: NodeStatus) -> str:
    p = s.progress
    lines = [f"node        {s.node_id} {s.name}".rstrip(),
             f"community   {s.community_id}   federated_learning={s.federated_learning}",
             f"coordinator {s.coordinator or '-'} (term {s.term})" + (
                 f"; heartbeat every {s.heartbeat_interval_seconds:g} s" + (" (idle: no round due)" if s.idle else "")
                 if s.heartbeat_interval_seconds else ""),
             f"members     {len(s.alive_members())} alive of {len(s.members)} seen; {len(s.peers)} connected"]
    if s.paused:
        lines.append(f"PAUSED      {s.paused.reason} for {s.paused.seconds:.0f} s ({s.paused.detail}); "
                     f"retrying every {s.paused.retry_every_seconds:.0f} s")
    cur = p.current_round
    if cur:
        lines.append(f"round       #{cur.round_number} {cur.round_id} {cur.state.value} as {cur.role.value}, "
                     f"{cur.submissions} submissions (min {cur.min_participants})")
    else:
        lines.append(f"round       {p.disabled_reason or 'none yet'}")
    if p.last_merged:
        last = p.last_merged
        lines.append(f"last merged round {last.round_number}: {last.sha256[:16]}… {last.path}")
    lines.append(f"completed   {p.rounds_completed} rounds")
    for verdict in ("rejected", "ignored"):
        counts = s.counters.get(verdict, {})  # keyed by verdict; one not met yet is absent
        if counts:
            lines.append(f"{verdict:<11} " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    lines.append("bytes       " + ", ".join(f"{k}={v}" for k, v in sorted(s.bytes.to_json().items())))
    errors = {f"{where}:{k}": v for where, counts in s.handler_errors.items() for k, v in counts.items()}
    if errors:  # misbehaving clients, each contained to its own connection
        lines.append("clients     " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    return "\n".join(lines)


def _cmd_rounds(args: argparse.Namespace) -> int:
    import json

    from fednode.config import load_config
    from fednode.node.records import read_record, read_records, record_path

    config = load_config(args.config)
    if args.number is not None:
        path = record_path(config.data_dir, args.number)
        if not path.exists():
            print(f"fednode rounds: no record {path}", file=sys.stderr)
            return 1
        print(json.dumps(read_record(path).to_json(), indent=2, sort_keys=True))
        return 0
    records = read_records(config.data_dir)
    print(json.dumps([r.to_json() for r in records], indent=2, sort_keys=True))
    return 0


def _cmd_start_round(args: argparse.Namespace) -> int:
    import trio

    from fednode.config import load_config
    from fednode.errors import GateClosed
    from fednode.node.control import query_control

    config = load_config(args.config)
    if not config.research.federated_learning:
        raise GateClosed(f"{config.source}: [research] federated_learning = false; this node takes part in no "
                         "round. Set federated_learning = true in the [research] section to start or join rounds.")
    answer = trio.run(query_control, config.control_socket_path, "start_round")
    print(answer.get("result") or answer.get("error"))
    return 0 if "result" in answer else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from fednode.config import load_config

    config = load_config(args.config)
    adapters = config.data_dir / "adapters"
    adapter_dir = adapters / (f"round-{args.round}" if args.round is not None else "latest")
    if not (adapter_dir / "adapter_config.json").is_file():
        installed = sorted((p.name for p in adapters.glob("round-*")), key=lambda n: int(n.split("-")[1]))
        print(f"fednode export: no merged adapter at {adapter_dir}; installed: {', '.join(installed) or 'none'}",
              file=sys.stderr)
        return 1
    from fednode.learning.export import export_merged

    out = export_merged(adapter_dir, args.merge, overwrite=args.force)
    print(f"merged {adapter_dir.resolve()} into its base model: {out}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}) (and AutoTokenizer, same dir)")
    return 0


def _cmd_harness(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import trio
    from rich.console import Console

    from fednode.config import load_config
    from fednode.harness.report import write_report
    from fednode.harness.run import HarnessOptions, run_harness

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
    task = load_config(args.config).learning.task if args.config else "minilm-bbc"
    opts = HarnessOptions(nodes=args.nodes, rounds=args.rounds, config=Path(args.config) if args.config else None,
                          kill_coordinator_at=args.kill_coordinator_at, gate_off_nodes=args.gate_off_nodes,
                          run_dir=Path(args.run_dir) if args.run_dir else None, timeout=args.timeout,
                          live=not args.quiet)
    console.print(f"starting {args.nodes} federated nodes"
                  + (f" + {args.gate_off_nodes} member(s) with federated_learning = false" if args.gate_off_nodes
                     else "") + f" on 127.0.0.1 for {args.rounds} rounds (task {task})")
    result = trio.run(run_harness, opts)
    _report, ok = write_report(result, task=task, verify=not args.no_verify, console=console)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fednode",
        description="Peer-to-peer federated fine-tuning of LoRA adapters over libp2p. Nodes of a community "
        "gossip signed round messages, elect a coordinator, train locally and exchange only adapter deltas. "
        "Federated rounds run only with [research] federated_learning = true in the node's config.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("keygen", help="write a new Ed25519 node key (mode 0600) and print its peer id",
                       description="Write a new Ed25519 node key file with mode 0600 and print the node id "
                       "(its libp2p peer id). Refuses to overwrite an existing file unless --force.")
    p.add_argument("path", help="key file to create")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("config", help="print the documented example config, or check a config file",
                       description="Print every config key with its default and meaning (--example), "
                       "or validate a config file (--check FILE).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--example", action="store_true", help="print the example config (configs/node.toml)")
    g.add_argument("--check", metavar="FILE", help="validate FILE and print a summary")
    g.add_argument("--markdown", action="store_true", help="print every key as a Markdown table")
    p.set_defaults(handler=_cmd_config)

    p = sub.add_parser("init", help="create a node folder: key (0600) and a commented config",
                       description="Create DIR with a new node key (node.key, mode 0600) and node.toml, a "
                       "commented config with every key (data_dir = DIR), set from the flags below; print the "
                       "node id and the address other members bootstrap from. Nothing is written if a flag is bad.")
    p.add_argument("dir", help="folder to create")
    p.add_argument("--community", default="default", help="community id (default: %(default)s)")
    p.add_argument("--federated-learning", action="store_true",
                   help="set [research] federated_learning = true (off by default)")
    p.add_argument("--share", metavar="I/N",
                   help="train on share I (1..N) of the built-in task's data split into N shares: give each "
                   "member its own I (sets learning.node_index = I-1, learning.num_nodes = N)")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="[network] listen address, e.g. /ip4/0.0.0.0/tcp/4001 (repeatable)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="[network] bootstrap: the address another member's `fednode init` printed, "
                   "/ip4/<ip>/tcp/<port>/p2p/<peer id> (repeatable)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="any other config key, e.g. round.local_steps=5 (VALUE in TOML; repeatable)")
    p.set_defaults(handler=_cmd_init)

    p = sub.add_parser("run", help="run the node daemon until SIGINT/SIGTERM",
                       description="Run the long-lived node: join the community over libp2p, heartbeat, elect "
                       "or follow a coordinator, and, with [research] federated_learning = true, train and "
                       "exchange adapter deltas round after round. SIGINT/SIGTERM stop it cleanly.")
    p.add_argument("--config", required=True, metavar="FILE", help="node config (see fednode config --example)")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("status", help="ask a running daemon for its status",
                       description="Ask the daemon over its local control socket: members, coordinator, term, "
                       "current round and state, last merged adapter, counters of accepted/rejected messages by "
                       "reason, bytes moved.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", metavar="FILE", help="the daemon's config (finds its control socket)")
    g.add_argument("--socket", metavar="PATH", help="the control socket itself")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("rounds", help="print the per-round records (JSON) from the data dir",
                       description="Print rounds/round-<n>.json: manifest, accepted submissions (node id, blob "
                       "sha256, num_samples, weight), rejected ones with reasons, aggregation method and the "
                       "merged blob sha256. Without N, all rounds as one JSON array.")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("number", nargs="?", type=int, help="round number")
    p.set_defaults(handler=_cmd_rounds)

    p = sub.add_parser("start-round", help="ask the running coordinator to open a round now",
                       description="Ask the daemon to open the next round now (only the coordinator can). "
                       "Refused when [research] federated_learning = false.")
    p.add_argument("--config", required=True, metavar="FILE")
    p.set_defaults(handler=_cmd_start_round)

    p = sub.add_parser("export", help="write a round's merged adapter merged into its base model",
                       description="Merge a round's merged adapter (adapters/round-N, default adapters/latest) "
                       "into the base model it names (PEFT merge_and_unload) and write the full model with its "
                       "tokenizer to OUT, loadable with AutoModelForCausalLM.from_pretrained(OUT) (or "
                       "AutoModelForSequenceClassification for a classifier task) without fednode or PEFT.")
    p.add_argument("--config", required=True, metavar="FILE", help="the node's config (finds its data dir)")
    p.add_argument("--round", type=int, metavar="N", help="round number (default: the latest installed)")
    p.add_argument("--merge", required=True, metavar="OUT", help="folder to write the merged model to")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("harness", help="run N daemons as local processes over libp2p and report",
                       description="Start N `fednode run` daemons as separate OS processes over libp2p on "
                       "127.0.0.1 (each with its own data dir and log under one run dir), show live progress, "
                       "wait for R rounds, then stop them and write a report (per-round table, report.png, "
                       "report.json). Exit 0 only if every round completed on every live node with one merged "
                       "adapter, and (real tasks) the final accuracy beats the base model with a fresh adapter.")
    p.add_argument("--nodes", type=int, default=4, help="federated nodes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds to complete (default: %(default)s)")
    p.add_argument("--config", metavar="FILE", help="config template applied to every node (e.g. configs/demo.toml)")
    p.add_argument("--kill-coordinator-at", type=int, metavar="ROUND",
                   help="SIGKILL the coordinator mid-collection of this round; the rest must elect a new one "
                   "and complete every round")
    p.add_argument("--gate-off-nodes", type=int, default=0, metavar="K",
                   help="also run K members with federated_learning = false (they must join no round)")
    p.add_argument("--run-dir", metavar="DIR", help="where node folders and the report go (default: runs/<time>)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the plain-PEFT reload and the fresh-adapter baseline at the end")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.set_defaults(handler=_cmd_harness)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        rc = handler(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return rc
    except FednodeError as exc:
        print(f"fednode {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fednode status | head`: the reader left; stop quietly, like any filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
