"""The local control endpoint: a unix socket (mode 0600) in the data dir.

Protocol: the client sends one line naming a command (`status`, `start_round`), the daemon answers one line
of JSON and closes. Only local users who can open the socket file can ask.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fednode.errors import ConfigError, FednodeError
from fednode.node.reports import NodeStatus

if TYPE_CHECKING:  # trio-typing's stubs shadow trio's own annotations under mypy
    from trio_typing import TaskStatus

MAX_REQUEST_BYTES = 256
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_CONTROL_TIMEOUT_SECONDS = 5.0
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes on Linux, one for the NUL


def check_socket_path(path: Path) -> None:
    """Refuse, naming the keys to change, a socket path the kernel cannot bind (too long)."""
    size = len(os.fsencode(str(path)))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"key 'control.socket': the socket path {str(path)!r} is {size} bytes, over the "
                          f"{MAX_SOCKET_PATH_BYTES}-byte limit of a unix socket address; use a shorter "
                          f"node.data_dir or an absolute, short control.socket (e.g. /tmp/fednode-1.sock)")

StatusFn = Callable[[], dict[str, Any]]  # a command's answer, as JSON

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ControlStatistics:
    served: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # peer_gone, timeout, too_large, ...


class ControlError(FednodeError):
    """The control endpoint could not be reached or answered badly."""


class ControlServer:
    """Answers control connections; one misbehaving client (closing early, sending garbage or too
    much, never finishing its line, never reading) costs only its own connection: every failure
    is logged and counted by reason in `statistics()`, none reaches the daemon's nursery."""

    def __init__(self, commands: dict[str, StatusFn], timeout: float = DEFAULT_CONTROL_TIMEOUT_SECONDS) -> None:
        self.commands = commands
        self.timeout = timeout
        self._served = 0
        self._failed: collections.Counter[str] = collections.Counter()

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(self._served, dict(self._failed))

    def _fail(self, reason: str, detail: str) -> None:
        self._failed[reason] += 1
        log.info("control client: %s (%s)", reason, detail)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                with trio.move_on_after(self.timeout) as scope:
                    await self._answer(stream)
                if scope.cancelled_caught:
                    self._fail("timeout", f"no complete exchange within {self.timeout} s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail("peer_gone", repr(exc))
        except Exception:  # a bug in a command must not take the daemon down with it
            self._failed["internal_error"] += 1
            log.exception("control command failed")

    async def _answer(self, stream: trio.SocketStream) -> None:
        request = b""
        while b"\n" not in request and len(request) <= MAX_REQUEST_BYTES:
            data = await stream.receive_some(MAX_REQUEST_BYTES + 1)
            if not data:
                break
            request += data
        line = request.split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST_BYTES:
            self._fail("too_large", f"request line over {MAX_REQUEST_BYTES} bytes")
            body: dict[str, Any] = {"error": f"request line exceeds MAX_REQUEST_BYTES = {MAX_REQUEST_BYTES}"}
        else:
            command = line.strip().decode("ascii", "replace")
            fn = self.commands.get(command)
            if fn is None:
                self._fail("unknown_command", repr(command[:40]))
                body = {"error": f"unknown command {command[:40]!r}; known: {', '.join(sorted(self.commands))}"}
            else:
                try:
                    body = fn()
                except Exception as exc:
                    self._failed["internal_error"] += 1
                    log.exception("control command %r failed", command)
                    body = {"error": f"command {command!r} failed: {exc.__class__.__name__}: {exc}"}
        await stream.send_all(json.dumps(body, sort_keys=True, default=str).encode() + b"\n")
        self._served += 1


def _refuse_a_live_socket(path: Path) -> None:
    """A socket someone still accepts on belongs to a live daemon (e.g. another data dir with the
    same absolute control.socket): never delete it from under that daemon."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # nothing there, or a stale file of a killed daemon
    raise ConfigError(f"key 'control.socket': another daemon is serving {path}; give this node its own "
                      f"control.socket (or node.data_dir)")


async def serve_control(path: Path, commands: dict[str, StatusFn], *,
                        timeout: float = DEFAULT_CONTROL_TIMEOUT_SECONDS,
                        task_status: TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `commands` on a unix socket at `path` (mode 0600) until cancelled; `nursery.start`
    returns the ControlServer (for `statistics()`)."""
    check_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_a_live_socket(path)
    path.unlink(missing_ok=True)  # a stale socket from a killed daemon
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    server = ControlServer(commands, timeout)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(server)
            await trio.serve_listeners(server.handle, [listener], handler_nursery=nursery)
    finally:
        path.unlink(missing_ok=True)


async def query_control(path: Path, command: str = "status",
                        timeout: float = DEFAULT_CONTROL_TIMEOUT_SECONDS) -> dict[str, Any]:
    check_socket_path(path)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(command.encode() + b"\n")
                chunks = []
                size = 0
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    size += len(data)
                    if size > MAX_RESPONSE_BYTES:
                        raise ControlError(f"response exceeds {MAX_RESPONSE_BYTES} bytes")
                    chunks.append(data)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ControlError(f"no daemon answers at {path} ({exc.__class__.__name__}); is `fednode run` running "
                           f"with this config?") from None
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"daemon at {path} sent malformed JSON") from None
    if not isinstance(result, dict):
        raise ControlError(f"daemon at {path} sent {type(result).__name__}, not an object")
    return result


async def query_status(path: Path, timeout: float = DEFAULT_CONTROL_TIMEOUT_SECONDS) -> NodeStatus:
    """The daemon's `status` as a NodeStatus. ControlError when no daemon answers; ReportError (naming
    the field) when one answers with a status that does not fit the type: that is a bug to see, not
    a node to wait for."""
    answer = await query_control(path, "status", timeout)
    if "error" in answer and "node_id" not in answer:
        raise ControlError(f"daemon at {path}: {answer['error']}")
    return NodeStatus.from_json(answer)
