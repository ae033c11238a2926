"""A private PostgreSQL cluster a test starts, stops and restarts itself (initdb + pg_ctl, a free port,
a temporary directory), for outages the shared server on 5432 must never see.

The binaries are PostgreSQL's own (``/usr/lib/postgresql/<version>/bin``, the newest found, or ``initdb``
on the PATH). PostgreSQL refuses to run as root, so under root the cluster runs as the ``postgres``
system user. A missing binary or user goes through ``missing_service`` (skips locally, fails under
CI=true), never a silent skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import missing_service
from tests.support.mosquitto import free_port


def postgres_bin_dir() -> Path | None:
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path
    port: int
    user: str | None  # the system user the server runs as (None: this process's own)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "postgres.log"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for Telemetra."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs["user"] = self.user
            kwargs["group"] = pwd.getpwnam(self.user).pw_gid
        proc = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.log()}")
        return proc

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                "max_connections = 50\nshared_buffers = 32MB\nlogging_collector = off\n"
            )

    def init_port(self) -> None:
        """Move to ``self.port`` (a later setting wins in postgresql.conf)."""
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write(f"port = {self.port}\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: connections are cut, a clean shutdown; ``immediate``: as a crash (recovery on start)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.data_dir.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    """A fresh, running cluster on a free port (call ``destroy()`` when done)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        missing_service("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin")
        raise AssertionError("unreachable")
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing_service("running as root and there is no 'postgres' user to run a private cluster as")
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="telemetra-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    os.chmod(root, 0o700)
    cluster = PostgresCluster(bin_dir, root, free_port(), user)
    try:
        cluster.init()
        for attempt in range(3):
            try:
                cluster.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                # The free port was taken meanwhile: pick another.
                cluster.port = free_port()
                cluster.init_port()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster
