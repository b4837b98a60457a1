"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, a free loopback port, scram passwords.

For multi-host tests it can listen elsewhere, run inside a network namespace (`prefix`, e.g.
`ip netns exec NS`), serve TLS with a given certificate and let in more clients (`hba` lines).

Debian's postgresql (or any initdb/pg_ctl on PATH) is used as is; tests skip with the reason when it is
missing. initdb refuses to run as root, so under root the cluster runs as the `postgres` user (or
`nobody`) with the data directory handed to it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest

SEARCH = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin",
          "/usr/local/bin", "/usr/bin")
START_TIMEOUT_S = 30


def find_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres; None when PostgreSQL is not installed."""
    for folder in SEARCH:
        if all((Path(folder) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl") and shutil.which("postgres"):
        return Path(found).resolve().parent
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runas() -> list[str]:
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    pytest.skip("running as root and no unprivileged user (postgres, nobody) to run initdb as")


@dataclass
class Cluster:
    bin: Path
    root: Path
    port: int
    user: str
    password: str
    runas: list[str]
    listen: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS): the server runs in that namespace

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres", *, password: str | None = None, host: str = "127.0.0.1",
            **params: str) -> str:
        pw = self.password if password is None else password
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{self.user}:{pw}@{host}:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *self.runas, *args], capture_output=True, text=True, timeout=timeout,
                              check=True, cwd=self.root)

    def start(self) -> None:
        log = self.root / "server.log"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses='{self.listen}'", "start")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.prefix, *self.runas, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                        "stop"], capture_output=True, timeout=60, cwd=self.root, check=False)

    def createdb(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def read_file(self, relative: str) -> bytes:
        """A file of the data directory (e.g. pg_relation_filepath's answer), with every segment appended."""
        path = self.data / relative
        chunks = [path.read_bytes()]
        segment = 1
        while (more := path.with_name(f"{path.name}.{segment}")).exists():
            chunks.append(more.read_bytes())
            segment += 1
        return b"".join(chunks)


def start_cluster(*, listen: str = "127.0.0.1", prefix: tuple[str, ...] = (), tls: tuple[bytes, bytes] | None = None,
                  hba: tuple[str, ...] = ()) -> Cluster:
    """A running cluster (caller stops it with `remove_cluster`); pytest.skip when PostgreSQL is missing.

    listen: listen_addresses ('*' for every address); prefix: the command prefix that puts the server in a
    network namespace; tls: (certificate PEM, key PEM) to turn ssl on; hba: pg_hba.conf lines appended."""
    folder = find_bin()
    if folder is None:
        pytest.skip("PostgreSQL is not installed (initdb/pg_ctl/postgres not found; apt-get install postgresql)")
    runas = _runas()
    root = Path(tempfile.mkdtemp(prefix="streamer-pg-"))
    os.chmod(root, 0o700)
    if runas:
        owner = pwd.getpwnam(runas[2])
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(folder, root, free_port(), "streamer", secrets.token_urlsafe(12), runas, listen, tuple(prefix))
    pwfile = root / "pw"
    pwfile.write_text(cluster.password + "\n")
    if runas:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    try:
        cluster._run(str(folder / "initdb"), "-D", str(cluster.data), "-U", cluster.user, f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync", timeout=120)
        pwfile.unlink()
        with open(cluster.data / "postgresql.conf", "a") as conf:
            # Throwaway: no fsync; small and quiet.
            conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\n"
                       "max_connections = 60\nlog_min_messages = warning\n")
            if tls is not None:
                conf.write(f"ssl = on\nssl_cert_file = '{root / 'server.crt'}'\nssl_key_file = '{root / 'server.key'}'\n")
        if tls is not None:
            for name, pem, mode in (("server.crt", tls[0], 0o644), ("server.key", tls[1], 0o600)):
                (root / name).write_bytes(pem)
                os.chmod(root / name, mode)  # the server refuses a key others can read
                if runas:
                    os.chown(root / name, owner.pw_uid, owner.pw_gid)
        if hba:
            with open(cluster.data / "pg_hba.conf", "a") as rules:
                rules.write("".join(f"{line}\n" for line in hba))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                cluster.start()
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                cluster.port = free_port()  # the port was taken meanwhile
    except BaseException:
        remove_cluster(cluster)
        raise
    return cluster


def remove_cluster(cluster: Cluster) -> None:
    if (cluster.data / "postmaster.pid").exists():
        cluster.stop("immediate")
    shutil.rmtree(cluster.root, ignore_errors=True)


# Fixtures a test module takes as its own (`cluster = pytest.fixture(scope="module")(cluster_fixture)`,
# `url = pytest.fixture(name="url")(database_fixture)`): plain functions here, so that no module imports a
# fixture by name.
def cluster_fixture() -> Iterator[Cluster]:
    """One cluster for the module."""
    pg = start_cluster()
    try:
        yield pg
    finally:
        remove_cluster(pg)


_databases = count()


def database_fixture(cluster: Cluster) -> str:
    """A fresh database of the module's cluster for each test: its URL."""
    return cluster.createdb(f"db{next(_databases)}")
