"""`fednode run`: the daemon process around a Node (logging, signals, clean shutdown)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

import trio

from fednode.config import Config
from fednode.errors import DiskFull
from fednode.identity import load_key_file
from fednode.node.control import check_socket_path
from fednode.node.daemon import Node
from fednode.node.diskfull import DISK_FULL_RETRY_SECONDS
from fednode.node.jobs import run_blocking
from fednode.node.ownership import check_listen_addrs_free, data_dir_lock
from fednode.node.trainers import Trainer, make_trainer
from fednode.state import StateDB

# SIGINT/SIGTERM -> process gone within this long (README: "< 5 s"). Stopping the services takes
# well under a second (measured 0.1-0.3 s mid-round with a connected peer); past this a watchdog
# ends the process anyway (state.sqlite is crash-safe: a node killed at any instant resumes).
SHUTDOWN_GRACE_SECONDS = 4.0
EXIT_SHUTDOWN_OVERDUE = 3
logger = logging.getLogger("fednode.run")


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(logging.WARNING)


async def run_daemon(config: Config) -> None:
    check_socket_path(config.control_socket_path)  # before any task starts: a ConfigError, not a crash
    with data_dir_lock(config.data_dir):  # held for the daemon's life; a second daemon stops here
        check_listen_addrs_free(config.network.listen)
        await _run_locked(config)


async def _run_locked(config: Config) -> None:
    identity = load_key_file(config.key_path)
    if not await _wait_for_state_db(config):
        return
    trainer: Trainer | None = None
    if config.research.federated_learning:
        logger.info("loading the %s task (federated_learning = true)", config.learning.task)
        trainer = await trio.to_thread.run_sync(make_trainer, config)
    else:
        logger.info("[research] federated_learning = false: joining as a member only; no rounds")
    node = Node(config, identity, trainer=trainer)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            logger.info("node %s up; community %s; control socket %s", node.node_id, config.community.id,
                        config.control_socket_path)
            print(f"fednode: node {node.node_id} running (status: fednode status --config {config.source})",
                  file=sys.stderr, flush=True)
            warm_up = getattr(trainer, "warm_up", None)
            if warm_up is not None:  # after "up", off the event loop (fake_task.FakeTrainer.warm_up says why)
                nursery.start_soon(functools.partial(run_blocking, warm_up, inline=False, abandon=True))
            async for signum in signals:
                logger.info("signal %s: shutting down", signal.Signals(signum).name)
                started = time.monotonic()
                watchdog = threading.Timer(SHUTDOWN_GRACE_SECONDS, _shutdown_overdue)
                watchdog.daemon = True
                watchdog.start()
                nursery.cancel_scope.cancel()
                break
    logger.info("stopped cleanly in %.2f s", time.monotonic() - started)


async def _wait_for_state_db(config: Config) -> bool:
    """Open state.sqlite once before the slow start: a corrupt one is refused (CorruptState). On a
    full disk the node waits, paused, retrying every DISK_FULL_RETRY_SECONDS, instead of exiting; a
    SIGINT/SIGTERM meanwhile stops it cleanly (False)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        while True:
            try:
                StateDB(config.data_dir / "state.sqlite").close()
                return True
            except DiskFull as exc:
                logger.warning("PAUSED disk_full at start: %s; trying again every %.0f s", exc,
                               DISK_FULL_RETRY_SECONDS)
            with trio.move_on_after(DISK_FULL_RETRY_SECONDS):
                async for signum in signals:
                    logger.info("signal %s while waiting for disk space: stopping", signal.Signals(signum).name)
                    return False


def _shutdown_overdue() -> None:
    logger.error("shutdown took over SHUTDOWN_GRACE_SECONDS = %.1f s; exiting now (state.sqlite is crash-safe)",
                 SHUTDOWN_GRACE_SECONDS)
    exit_now(EXIT_SHUTDOWN_OVERDUE)


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's finalization. Measured before (fake task, a
    connected peer, mid-round): the services stopped 0.2-0.3 s after SIGTERM, but the process
    exited 6-12 s later, all of it in module teardown (torch, transformers, numpy: no Python frame
    left, `finalize_modules` in the stack). Nothing is lost: state.sqlite is closed and checkpointed
    by then, and the logs and standard streams are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(config: Config) -> int:
    setup_logging()
    trio.run(run_daemon, config)
    exit_now(0)  # a clean stop: nothing left to finalize
