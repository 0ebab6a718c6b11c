"""`make run`: the whole system on one machine, with nothing installed beforehand but Python.

Starts (and supervises) a private redis-server unless REDIS_URL is set, declares the queue topology, then
one process for the gateway (every service's API on one port), one Celery worker per service queue, and
Celery beat. Ctrl-C stops everything; a child that dies is restarted.

`Stack` is also what the end-to-end tests use, so they run the same processes a user runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.redis_server import RedisServer, free_port

SERVICES = ("router", "feedback", "optimizer", "finetune", "dashboard")
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
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in stored.items()))
        path.chmod(0o600)


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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = (self.log_dir or self.data_dir / "logs").resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
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
        self._declare_topology()
        for name in self.commands():
            self.start_process(name)
        self.wait_healthy(wait_s)
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
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(self.commands()[name], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
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
        raise TimeoutError(f"gateway not healthy after {wait_s}s: {last}")

    def supervise_once(self) -> list[str]:
        """Restart any child that died; returns the names restarted."""
        restarted = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.start_process(name)
                restarted.append(name)
        return restarted

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.run_env_path.unlink(missing_ok=True)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
        f"  Broker:             {stack.env['REDIS_URL']}\n"
        f"  Logs:               {stack.log_dir}/\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    try:
        while not stopping:
            for name in stack.supervise_once():
                print(f"{name} exited; restarted it (see {stack.log_dir}/{name}.log)", flush=True)
            time.sleep(1)
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
