"""Real PostgreSQL and Redis servers for the tests, from the system's packages (`make
test` installs them), each started on loopback in a temporary directory and stopped
after. A test that needs one and finds no binary is skipped with the reason."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from server_utils import free_port


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run it as the packages' postgres user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("PostgreSQL cannot run as root and runuser is missing")
    return [runuser, "-u", "postgres", "--"]


class Postgres:
    """A PostgreSQL server on 127.0.0.1; ``url`` reaches its database ``ledger``."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            pytest.skip("PostgreSQL is not installed (make test installs postgresql)")
        self.pg_ctl = pg_ctl
        # Its own directory under /tmp: pytest's are private to root, and the server
        # runs as the postgres user.
        self.root = root = Path(tempfile.mkdtemp(prefix="deepserve-pg-"))
        self.data = root / "pgdata"
        self.port = free_port()
        self.prefix = _as_postgres_user()
        if self.prefix:
            shutil.chown(root, "postgres", "postgres")

        def run(*a: str) -> None:
            done = subprocess.run([*self.prefix, *a], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode:
                raise RuntimeError(f"{a[0]} failed: {done.stdout}{done.stderr}")

        run(initdb, "-D", str(self.data), "-U", "deepserve", "--auth=trust", "-E", "UTF8")
        self.log = root / "postgres.log"
        run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {root} "
            "-c max_connections=200", "start")
        psql = _pg_bin("psql") or "psql"
        subprocess.run([psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "deepserve",
                        "-d", "postgres", "-c", "CREATE DATABASE ledger"], check=True,
                       capture_output=True, timeout=60)
        self.url = f"postgresql://deepserve@127.0.0.1:{self.port}/ledger"

    def fresh_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        import psycopg

        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    """A Redis server on 127.0.0.1 with no persistence."""

    def __init__(self, root: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("Redis is not installed (make test installs redis-server)")
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root)],
            stdout=open(root / "redis.log", "w"), stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
