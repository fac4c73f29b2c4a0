"""The data-dir lock, the listen-port probe and the live control socket check, in-process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from fednode.errors import ConfigError
from fednode.node.control import serve_control
from fednode.node.ownership import DataDirLocked, check_listen_addrs_free, data_dir_lock


def test_the_data_dir_lock_is_exclusive_names_the_holder_and_is_released(tmp_path: Path) -> None:
    with data_dir_lock(tmp_path) as path:
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}") as info, data_dir_lock(tmp_path):
            pass
        assert str(tmp_path) in str(info.value) and "node.data_dir" in str(info.value)
    with data_dir_lock(tmp_path):  # released with the block
        pass


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "SO_REUSEPORT"])
def test_a_listen_address_in_use_is_refused_naming_the_key(reuseport: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:  # as py-libp2p binds its listeners
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        addr = f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=r"network\.listen") as info:
            check_listen_addrs_free(["/ip4/127.0.0.1/tcp/0", addr])
        assert addr in str(info.value) and "already in use" in str(info.value)
    check_listen_addrs_free([addr])  # free again once the other listener closed


async def test_a_control_socket_another_daemon_serves_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "shared.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda: {"who": "first"}})
        with pytest.raises(ConfigError, match=r"control\.socket"):
            await serve_control(path, {"status": lambda: {"who": "second"}})
        assert path.exists()
        nursery.cancel_scope.cancel()
    path.touch()  # a stale file of a killed daemon is replaced
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {})
        nursery.cancel_scope.cancel()
