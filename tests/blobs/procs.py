"""Runs `python -m fednode.blobs.peer_process` children and reads their JSON events."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class PeerProc:
    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fednode.blobs.peer_process", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self._stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                self._stderr.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float) -> Event:
        for e in self.seen:
            if pred(e):
                return e
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.args[0]}: no matching event; stderr tail: {''.join(self._stderr[-20:])}")
            try:
                e = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError(
                        f"{self.args[0]} exited {self.proc.returncode}: {''.join(self._stderr[-30:])}"
                    ) from None
                continue
            self.seen.append(e)
            if pred(e):
                return e

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
