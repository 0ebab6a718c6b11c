"""`make run`: the whole system on one machine, with nothing installed beforehand but Python.

Starts (and supervises) a private redis-server (with a password) unless REDIS_URL is set, declares the
queue topology, then one process for the gateway (every service's API on one port), one Celery worker per
service queue, and Celery beat. Ctrl-C stops everything. A child (or the private redis-server) that dies is
restarted with backoff (1 s, 2 s, 4 s ... up to 30 s while it keeps dying; back to 1 s once it has run for a
minute), and each restart is printed. The data folder is 0700 and every file the children create is
private to the owner (umask 077): stores, secrets, logs, Redis' append-only file.

`Stack` is also what the end-to-end tests use, so they run the same processes a user runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.redis_server import RedisServer, free_port, wait_or_kill
from shared.contracts import SERVICES

ROOT = Path(__file__).resolve().parent.parent


def worker_command(service: str, *, loglevel: str = "WARNING") -> list[str]:
    """The Celery worker of one service, consuming only that service's queue. The finetune worker runs two
    threads, so a long training job never holds up that service's events and watchdog; every other worker
    is one process doing one message at a time."""
    pool = ["-P", "threads", "-c", "2"] if service == "finetune" else ["-P", "solo"]
    return [
        sys.executable, "-m", "celery", "-A", f"services.{service}.tasks:app", "worker",
        "-Q", service, *pool, "-n", f"{service}@%h", "-l", loglevel,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def process_env(
    redis_url: str, data_dir: Path | str, *, admin_token: str, session_hash_key: str, **overrides: str
) -> dict[str, str]:
    """The environment of one service process started on its own (a test's worker, a benchmark's server): this
    Redis and data folder, these secrets, this checkout importable; `overrides` add or replace variables."""
    env = {"REDIS_URL": redis_url, "DATA_DIR": str(data_dir), "ADMIN_TOKEN": admin_token}
    return {**os.environ, **env, "SESSION_HASH_KEY": session_hash_key, "PYTHONPATH": str(ROOT), **overrides}


def make_private_dir(path: Path) -> None:
    """A folder only the owner can enter (created so; an existing one is tightened)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Write `path` readable by the owner only: the file is created with mode 0600 (never readable by others,
    not even for a moment) and moved into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_secrets(data_dir: Path, env: dict[str, str]) -> None:
    """Generate the admin token and session-hash key once per data folder, unless the environment has them."""
    path = data_dir / "secrets.env"
    stored: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key and value:
                stored[key.strip()] = value.strip()
    changed = False
    for key in ("ADMIN_TOKEN", "SESSION_HASH_KEY"):
        if env.get(key):
            continue
        if key not in stored:
            stored[key] = secrets.token_urlsafe(24)
            changed = True
        env[key] = stored[key]
    if changed:
        make_private_dir(data_dir)
        write_private(path, "".join(f"{k}={v}\n" for k, v in stored.items()))


@dataclass
class _Backoff:
    """When a process that keeps dying may be started again: 1 s after its first death, then 2, 4 ... up to
    30 s; a process that ran for a minute starts from 1 s again."""

    delay: float = 0.0
    next_at: float = 0.0
    started_at: float = 0.0
    count: int = 0
    announced: bool = False

    def due(self, now: float) -> bool:
        if self.next_at == 0.0:  # first noticed dead: schedule it
            ran = now - self.started_at if self.started_at else None
            self.delay = 1.0 if (ran is None or ran >= 60 or self.delay == 0.0) else min(30.0, self.delay * 2)
            self.next_at = now + self.delay
            self.announced = False
        return now >= self.next_at

    def started(self, now: float) -> None:
        self.count += 1
        self.started_at = now
        self.next_at = 0.0

    def failed(self, now: float) -> None:
        self.delay = min(30.0, max(1.0, self.delay * 2))
        self.next_at = now + self.delay


@dataclass
class Stack:
    data_dir: Path
    port: int = 8000
    env_overrides: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    beat: bool = True
    log_dir: Path | None = None
    redis: RedisServer | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: dict[str, _Backoff] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def commands(self) -> dict[str, list[str]]:
        py = sys.executable
        cmds = {
            "gateway": [
                py, "-m", "uvicorn", "gateway.app:create_app", "--factory",
                "--host", self.env.get("HOST", "127.0.0.1"), "--port", str(self.port),
                "--log-level", "warning", "--no-access-log",
            ],
        }  # fmt: skip
        for svc in self.services:
            cmds[f"worker-{svc}"] = worker_command(svc)
        if self.beat:
            cmds["beat"] = [
                py, "-m", "celery", "-A", "gateway.beat:app", "beat", "-l", "WARNING",
                "-s", str(self.data_dir / "beat-schedule"),
            ]  # fmt: skip
        return cmds

    def start(self, wait_s: float = 90.0) -> Stack:
        self.data_dir = self.data_dir.resolve()
        make_private_dir(self.data_dir)
        self.log_dir = (self.log_dir or self.data_dir / "logs").resolve()
        make_private_dir(self.log_dir)
        env = {**os.environ, **self.env_overrides}
        env.setdefault("DATA_DIR", str(self.data_dir))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("GATEWAY_URL", self.url)
        ensure_secrets(self.data_dir, env)
        if not env.get("REDIS_URL"):
            self.redis = RedisServer(self.data_dir / "redis").start()
            env["REDIS_URL"] = self.redis.url
        self.env = env
        self._write_run_env()
        try:
            self._declare_topology()
            for name in self.commands():
                self.start_process(name)
            self.wait_healthy(wait_s)
        except BaseException:
            self.stop()  # no process (nor the private Redis) outlives a failed start
            raise
        return self

    @property
    def run_env_path(self) -> Path:
        return self.data_dir / "run.env"

    def _write_run_env(self) -> None:
        """Where this running system's broker and gateway are, for the data team's CLI (services.finetune.cli):
        `data/run.env`, owner-only, removed again by stop()."""
        text = f"REDIS_URL={self.env['REDIS_URL']}\nGATEWAY_URL={self.env['GATEWAY_URL']}\n"
        fd = os.open(self.run_env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _declare_topology(self) -> None:
        subprocess.run(
            [sys.executable, "-c", "from shared.topology import main; main()"],
            env=self.env,
            check=True,
            cwd=ROOT,
        )

    def start_process(self, name: str) -> subprocess.Popen:
        assert self.log_dir is not None
        fd = os.open(self.log_dir / f"{name}.log", os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                self.commands()[name], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, umask=0o077
            )
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def wait_healthy(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log")
            try:
                r = httpx.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.25)
        log = self.log_dir / "gateway.log" if self.log_dir else None
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else "(no log)"
        raise TimeoutError(f"gateway not healthy after {wait_s}s: {last}\ngateway log tail:\n{tail}")

    def supervise_once(self, now: float | None = None) -> list[str]:
        """Restart what died (the private redis-server first, then any child), each no sooner than its backoff
        allows; returns a line per restart (and per restart put off), to print."""
        now = time.monotonic() if now is None else now
        said: list[str] = []
        if self.redis is not None and not self.redis.alive():
            said += self._restart("redis-server", self.redis.process, now, self._restart_redis)
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                said += self._restart(name, proc, now, functools.partial(self.start_process, name))
        return said

    def _restart(self, name: str, proc: subprocess.Popen | None, now: float, start: Callable[[], object]) -> list[str]:
        backoff = self.restarts.setdefault(name, _Backoff())
        code = None if proc is None else proc.returncode
        if not backoff.due(now):
            if not backoff.announced:
                backoff.announced = True
                return [f"{name} exited (code {code}); restarting in {backoff.next_at - now:.0f}s"]
            return []
        try:
            start()
        except Exception as exc:
            backoff.failed(now)
            return [f"{name} exited (code {code}); restart failed ({exc}); next try in {backoff.delay:.0f}s"]
        backoff.started(now)
        return [f"{name} exited (code {code}); restarted it (restart {backoff.count}; see {self.log_dir}/{name}.log)"]

    def _restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.process = None
        self.redis.start()  # same port, password and append-only file: the queues come back as they were

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            wait_or_kill(proc, max(0.1, deadline - time.monotonic()))
        self.procs.clear()
        self.run_env_path.unlink(missing_ok=True)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _without_password(url: str) -> str:
    import re

    return re.sub(r"//:[^@]*@", "//:***@", url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole self-learning explanation system locally.")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", "data")))
    args = parser.parse_args(argv)
    port = args.port or free_port()
    stack = Stack(data_dir=args.data_dir, port=port)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(
        f"starting: broker {'REDIS_URL' if os.environ.get('REDIS_URL') else 'private redis-server'}, data in {args.data_dir}/"
    )
    try:
        stack.start()
    except Exception as exc:
        print(f"failed to start: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    print(
        f"\n  The system is up:   {stack.url}/\n"
        f"  Admin token:        {stack.env['ADMIN_TOKEN']}   (Authorization: Bearer ...; kept in {args.data_dir}/secrets.env)\n"
        f"  Stats:              curl -H 'Authorization: Bearer {stack.env['ADMIN_TOKEN']}' {stack.url}/api/admin/llm-learning\n"
        f"  Broker:             {_without_password(stack.env['REDIS_URL'])}\n"
        f"  Logs:               {stack.log_dir}/\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    try:
        while not stopping:
            for line in stack.supervise_once():
                print(line, flush=True)
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
