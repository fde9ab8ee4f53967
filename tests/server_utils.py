"""Start a real `deepserve serve` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``url``/health answers 200; False on timeout or when ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


class ServerProcess:
    """A server subprocess; ``url`` is its base, logs go to a file for failure messages."""

    def __init__(self, *args: str, log_dir: Path, timeout: float = 180.0,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_dir / f"server-{host}-{self.port}.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--host", host, "--port",
               str(self.port), "--kv-cache-memory", "128MiB", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if not wait_healthy(self.url, self.proc, timeout):
            self.stop()
            raise RuntimeError(f"server did not become healthy:\n{self.log()}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
