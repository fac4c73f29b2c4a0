"""The local control endpoint: a unix socket (mode 0600) in the data dir.

Protocol: the client sends one line naming a command (`status`, `start_round`), the daemon answers one line
of JSON and closes. Only local users who can open the socket file can ask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fednode.errors import ConfigError, FednodeError

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

StatusFn = Callable[[], dict[str, Any]]


class ControlError(FednodeError):
    """The control endpoint could not be reached or answered badly."""


async def serve_control(path: Path, commands: dict[str, StatusFn], *,
                        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    check_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale socket from a killed daemon
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(DEFAULT_CONTROL_TIMEOUT_SECONDS):
                request = b""
                while b"\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    data = await stream.receive_some(MAX_REQUEST_BYTES)
                    if not data:
                        break
                    request += data
                command = request.split(b"\n", 1)[0].strip().decode("ascii", "replace")
                fn = commands.get(command)
                if fn is not None:
                    body: dict[str, Any] = fn()
                else:
                    body = {"error": f"unknown command {command[:40]!r}; known: {', '.join(sorted(commands))}"}
                await stream.send_all(json.dumps(body, sort_keys=True, default=str).encode() + b"\n")

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(handle, [listener], handler_nursery=nursery)
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
    except (OSError, trio.TooSlowError) as exc:
        raise ControlError(f"no daemon answers at {path} ({exc.__class__.__name__}); is `fednode run` running "
                           f"with this config?") from None
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"daemon at {path} sent malformed JSON") from None
    if not isinstance(result, dict):
        raise ControlError(f"daemon at {path} sent {type(result).__name__}, not an object")
    return result
