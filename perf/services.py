"""Private service instances for the chaos soak: a throwaway PostgreSQL cluster, a Redis server and
a RabbitMQ virtual host, each on its own port or name, so that restarting them never touches the
services the developer (or another test run) is using.

    with ExitStack() as stack:
        pg = stack.enter_context(PrivatePostgres(root))
        pg.restart()            # pg_ctl restart -m fast: every connection is cut
        redis = stack.enter_context(PrivateRedis(root))
        redis.restart(down_for=2.0)   # no persistence: every queued message is gone
        redis = stack.enter_context(PrivateRedis(root, appendfsync="everysec"))
        on_disk = redis.aof_mark()
        redis.crash_restart(back_to=on_disk)  # kill -9, and the AOF loses what came after the mark
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class ServiceError(RuntimeError):
    """A private service did not start, stop or restart as asked."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], *, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"{' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise ServiceError(f"{' '.join(args)} exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl live: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("pg_config"):
        candidates.append(Path(_run(["pg_config", "--bindir"]).strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise ServiceError("no PostgreSQL server binaries (initdb, pg_ctl) found; install postgresql")


def _version_key(path: str) -> int:
    part = Path(path).parent.name
    return int(part) if part.isdigit() else 0


def _runuser() -> str:
    """runuser lives in the sbin folders, which a minimal PATH (a CI runner's `env -i`) leaves out."""
    return shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin") or "runuser"


class PrivatePostgres:
    """A PostgreSQL cluster in `root`/pg on a free port. initdb refuses to run as root, so as root
    the cluster belongs to the `postgres` system user and its commands run through runuser."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "pg"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.bindir = postgres_bindir()
        self.as_postgres = os.geteuid() == 0
        self.started = False

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, name: str, *args: str) -> list[str]:
        command = [str(self.bindir / name), *args]
        return [_runuser(), "-u", "postgres", "--", *command] if self.as_postgres else command

    def start(self) -> PrivatePostgres:
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
        self.root.chmod(0o755)
        _run(self._cmd("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"))
        with open(self.data / "postgresql.conf", "a") as conf:
            # A throwaway cluster: durability against an OS crash is not what the soak tests (a
            # restart is a clean shutdown), so skip fsync to keep the 2-core machine busy with work.
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
        self._pg_ctl("start")
        self.started = True
        return self

    def restart(self) -> None:
        """Fast shutdown (every session is cut, open transactions roll back), then start again."""
        self._pg_ctl("restart", "-m", "fast")

    def shut_down(self) -> None:
        """Fast shutdown; `start_again` brings the same cluster back."""
        self._pg_ctl("stop", "-m", "fast")

    def start_again(self) -> None:
        self._pg_ctl("start")

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, checkpointer, ...): what a freeze
        of the whole server stops."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task").glob("*/children")
        return [postmaster, *(int(pid) for path in children for pid in path.read_text().split())]

    def stop(self) -> None:
        if self.started:
            self._pg_ctl("stop", "-m", "immediate")
            self.started = False

    def _pg_ctl(self, action: str, *args: str) -> None:
        _run(self._cmd("pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args), timeout=90)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class AofMark:
    """A point in a Redis append-only file: the incremental file then being written, and its size."""

    path: Path
    size: int


class PrivateRedis:
    """redis-server on a free port. Without `appendfsync` there is no persistence: a restart loses
    every key. With it ("everysec", "always" or "no"), the append-only file (AOF) is on and a
    restart keeps what had been written to it; `crash_restart` (kill -9) loses what had not."""

    def __init__(self, root: Path, *, appendfsync: str | None = None):
        self.root = Path(root)
        self.port = free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def aof_dir(self) -> Path:
        """Where Redis 7 keeps its multi-part AOF (a manifest, a base and incremental files)."""
        return self.root / "appendonlydir"

    def aof_mark(self) -> AofMark:
        """How far the AOF reaches now: `crash_restart(back_to=...)` cuts it back to here."""
        if self.appendfsync is None:
            raise ServiceError("this Redis runs without an AOF")
        latest = max(self.aof_dir.glob("*.incr.aof"), key=lambda path: int(path.name.split(".")[-3]))
        return AofMark(latest, latest.stat().st_size)

    def start(self, timeout: float = 15.0) -> PrivateRedis:
        persistence = ["--appendonly", "no"]
        if self.appendfsync is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                "--dir", str(self.root), "--logfile", str(self.root / "redis.log")]
        try:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise ServiceError(f"redis-server: {exc}; install redis-server") from exc
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"redis-server did not come up on port {self.port}; see {self.root / 'redis.log'}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        import redis

        try:  # LOADING (an AOF being read back) is an error: not up yet
            return redis.Redis(port=self.port, socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SHUTDOWN NOSAVE (with AOF on, Redis still writes out and fsyncs the AOF first); kill -9
        if it does not go."""
        if self.process is None or self.process.poll() is not None:
            return
        import redis

        from redis.retry import Retry
        from redis.backoff import NoBackoff

        try:  # no retries: the connection drops as the server exits, as it should
            redis.Redis(port=self.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)).shutdown(nosave=True)
        except redis.RedisError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9: nothing is written out. With appendfsync everysec, writes the OS had not yet
        been handed may be lost (about the last second at most, usually nothing)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, *, down_for: float = 2.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def crash_restart(self, *, down_for: float = 2.0, back_to: AofMark | None = None) -> None:
        """kill -9, then start again (reading the AOF back, if it is on). With `back_to`, the AOF
        is first cut back to that mark: what a machine crash does to writes the OS had not yet
        put on disk (with appendfsync everysec, those of about the last second). Redis reads a
        file cut inside a command or a MULTI block back to its last whole command."""
        self.kill()
        if back_to is not None and back_to.path.exists() and back_to.path.stat().st_size > back_to.size:
            with open(back_to.path, "r+b") as aof:
                aof.truncate(back_to.size)
        time.sleep(down_for)
        self.start()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RabbitVhost:
    """A RabbitMQ virtual host of our own on the machine's broker (created with rabbitmqctl), so a
    run's queues and connections can be closed and deleted without touching anyone else's.
    Without rabbitmqctl, the broker URL's own vhost is used and connections are not forced closed."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.name = f"chainsaga-chaos-{uuid.uuid4().hex[:8]}"
        self.private = shutil.which("rabbitmqctl") is not None and urlsplit(base_url).hostname in ("127.0.0.1", "localhost")
        self.created = False

    @property
    def url(self) -> str:
        if not self.private:
            return self.base_url
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{self.name}", "", ""))

    def create(self) -> RabbitVhost:
        if self.private:
            user = urlsplit(self.base_url).username or "guest"
            _run(["rabbitmqctl", "--quiet", "add_vhost", self.name])
            self.created = True
            _run(["rabbitmqctl", "--quiet", "set_permissions", "-p", self.name, user, ".*", ".*", ".*"])
        return self

    def close_connections(self) -> str:
        """Force every connection to our vhost closed (what a broker restart does to clients)."""
        if not self.private:
            raise ServiceError("no private vhost (rabbitmqctl unavailable): not closing shared connections")
        return _run(["rabbitmqctl", "--quiet", "close_all_connections", "--vhost", self.name, "chainsaga chaos soak"]).strip()

    def delete(self) -> None:
        if self.created:
            _run(["rabbitmqctl", "--quiet", "delete_vhost", self.name])
            self.created = False

    def __enter__(self) -> RabbitVhost:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()
