"""A real PostgreSQL server for the ledger tests, started from Debian's package in a temporary folder.

Found under /usr/lib/postgresql/<version>/bin; where it is missing and the tests run as root, Debian's
`postgresql` package is installed first. Tests that need it are skipped, with the reason, only where
neither works.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from triton_models.launcher import free_port


class PostgresUnavailable(RuntimeError):
    pass


def _binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def find_or_install_postgres() -> Path:
    binaries = _binaries()
    if binaries is not None:
        return binaries
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresUnavailable("PostgreSQL is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"], capture_output=True, text=True, env=env
    )
    if install.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        install = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"], capture_output=True, text=True,
            env=env,
        )  # fmt: skip
    binaries = _binaries()
    if binaries is None:
        raise PostgresUnavailable(f"installing Debian's postgresql failed: {install.stderr[-500:]}")
    return binaries


class PostgresServer:
    """One throw-away cluster on a loopback port, trust authentication, run as the `postgres` user when the
    tests run as root (the server refuses to run as root)."""

    def __init__(self) -> None:
        self.bin = find_or_install_postgres()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            try:
                entry = pwd.getpwnam(self.user)
            except KeyError:
                raise PostgresUnavailable("running as root, and there is no postgres user to run the server") from None
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{tool} failed: {result.stdout[-400:]} {result.stderr[-400:]}")

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(PostgresUnavailable):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
