"""Command-line interface: argument parsing only; the work happens in the packages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fednode.errors import FednodeError

Handler = Callable[[argparse.Namespace], int]


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
    if not args.check:
        print("fednode config: give --example or --check FILE", file=sys.stderr)
        return 2
    config = load_config(args.check)
    gate = "on" if config.research.federated_learning else "off"
    print(f"{args.check}: ok (community {config.community.id!r}, federated_learning {gate})")
    return 0


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
    p.set_defaults(handler=_cmd_config)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FednodeError as exc:
        print(f"fednode {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
