"""The data team's command line.

  python -m services.finetune.cli start [--base PATH] [--method sft|kto] [--min-examples N]
                                        [--recipe JSON] [--job-id ID] [--follow]
  python -m services.finetune.cli status JOB_ID
  python -m services.finetune.cli build-tiny-model OUT [--seed N]

`start` sends the task `finetune.start_job` by name through Celery, exactly as any other client of the queue
would; `--follow` then polls the job over HTTP and draws a progress bar until it ends. `status` prints the job as
JSON. The exit code is 0 when the job is (or, followed, ends) registered or still running, 1 when it failed or was
cancelled, 2 on a usage or connection problem.

Which system: REDIS_URL / GATEWAY_URL / ADMIN_TOKEN when set; else what `make run` wrote into its data folder
(DATA_DIR, default ./data: run.env with the broker and gateway of the running system, secrets.env with the admin
token). With neither, the CLI refuses to guess (it never falls back to a Redis it was not told about). `--follow`
gives up with a clear message when the job does not appear at the gateway within --appear-timeout seconds (the
broker and the gateway are then not the same system).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from shared.contracts import StartFineTune

TERMINAL = ("registered", "failed", "cancelled")


class NoSystem(Exception):
    """No broker was named and no running system was found."""


def _read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                out[key.strip()] = value.strip()
    return out


def _data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR", "data"))


def system() -> dict[str, str]:
    """REDIS_URL, GATEWAY_URL and ADMIN_TOKEN of the system to talk to: the environment first, then what
    `make run` wrote into the data folder. NoSystem when there is no broker to use."""
    data = _data_dir()
    run = _read_env_file(data / "run.env")
    secrets = _read_env_file(data / "secrets.env")
    broker = os.environ.get("REDIS_URL") or run.get("REDIS_URL")
    if not broker:
        raise NoSystem(
            f"no broker: set REDIS_URL, or start the system with `make run` (it writes {data / 'run.env'}); "
            "this CLI does not guess one"
        )
    gateway = os.environ.get("GATEWAY_URL") or run.get("GATEWAY_URL") or "http://127.0.0.1:8000"
    token = os.environ.get("ADMIN_TOKEN") or secrets.get("ADMIN_TOKEN") or ""
    return {"REDIS_URL": broker, "GATEWAY_URL": gateway.rstrip("/"), "ADMIN_TOKEN": token}


def _gateway() -> str:
    try:
        return system()["GATEWAY_URL"]
    except NoSystem:
        return os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")


def _headers() -> dict[str, str]:
    try:
        token = system()["ADMIN_TOKEN"]
    except NoSystem:
        token = os.environ.get("ADMIN_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def send_start(cmd: StartFineTune, broker_url: str) -> None:
    """Send `finetune.start_job` by name to the finetune queue (no project code runs on this side)."""
    from celery import Celery

    client = Celery("finetune-cli", broker=broker_url)
    client.conf.update(task_serializer="json", broker_connection_retry_on_startup=False, broker_connection_timeout=5)
    try:
        client.send_task(
            "finetune.start_job",
            kwargs={"payload": cmd.to_payload()},
            queue="finetune",
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.5, "interval_step": 0.5},
        )
    finally:
        client.close()


def fetch_job(job_id: str, gateway: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    r = httpx.get(f"{gateway}/api/finetune/jobs/{job_id}", headers=_headers(), timeout=timeout_s)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


class JobNotFound(Exception):
    """The job never appeared at the gateway."""


def follow(
    job_id: str,
    gateway: str,
    *,
    poll_s: float = 1.0,
    wait_s: float | None = None,
    appear_s: float = 30.0,
    out: Any = None,
) -> dict[str, Any]:
    """Poll the job until it ends, drawing a tqdm bar of its progress; returns the last job seen. JobNotFound when
    it has not appeared after `appear_s` seconds."""
    from tqdm import tqdm

    out = out or sys.stderr
    started = time.monotonic()
    deadline = None if wait_s is None else started + wait_s
    job: dict[str, Any] | None = None
    shown: tuple[float, str] | None = None  # redrawn only when it changes: one line per change in a log file
    with tqdm(total=100, desc=job_id, unit="%", file=out, bar_format="{desc} {bar} {n:.0f}% {postfix}") as bar:
        while True:
            job = fetch_job(job_id, gateway)
            if job is None and time.monotonic() - started > appear_s:
                raise JobNotFound(
                    f"job {job_id} did not appear at {gateway} within {appear_s:.0f} s: the broker it was sent to is "
                    "not the one this gateway's system uses (check REDIS_URL / GATEWAY_URL, or DATA_DIR/run.env)"
                )
            if job is not None:
                now = (round(100 * float(job.get("progress") or 0.0), 1),
                       f"{job['state']}: {job.get('reason') or job.get('detail') or ''}"[:80])  # fmt: skip
                if now != shown:
                    shown = now
                    bar.n = now[0]
                    bar.set_postfix_str(now[1], refresh=False)
                    bar.refresh()
                if job["state"] in TERMINAL:
                    return job
            if deadline is not None and time.monotonic() > deadline:
                return job or {"job_id": job_id, "state": "unknown"}
            time.sleep(poll_s)


def _exit_code(job: dict[str, Any]) -> int:
    return 1 if job.get("state") in ("failed", "cancelled") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.finetune.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="send a fine-tuning job through the queue")
    start.add_argument("--base", help="local Hugging Face model directory (default: FINETUNE_BASE_MODEL)")
    start.add_argument("--method", choices=("sft", "kto", "dpo"), default="sft")
    start.add_argument("--min-examples", type=int, default=None)
    start.add_argument("--recipe", default="{}", help="recipe overrides as JSON, e.g. '{\"max_steps\": 100}'")
    start.add_argument("--job-id", default=None, help="an id for the job (default: a new one)")
    start.add_argument("--follow", action="store_true", help="draw a progress bar until the job ends")
    start.add_argument("--wait", type=float, default=None, help="with --follow: give up after this many seconds")
    start.add_argument(
        "--appear-timeout", type=float, default=30.0, help="with --follow: fail when the job has not appeared by then"
    )
    status = sub.add_parser("status", help="print a job")
    status.add_argument("job_id")
    tiny = sub.add_parser("build-tiny-model", help="build the tiny test model (offline)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "build-tiny-model":
        from services.finetune.tinymodel import build_tiny_model

        print(build_tiny_model(args.out, seed=args.seed))
        return 0

    try:
        found = system()
    except NoSystem as exc:
        if args.command == "start":
            print(str(exc), file=sys.stderr)
            return 2
        found = {"GATEWAY_URL": _gateway()}
    gateway = found["GATEWAY_URL"]
    try:
        if args.command == "status":
            job = fetch_job(args.job_id, gateway)
            if job is None:
                print(f"job {args.job_id} not found", file=sys.stderr)
                return 2
            print(json.dumps(job, indent=2, default=str))
            return _exit_code(job)

        try:
            recipe = json.loads(args.recipe)
        except ValueError:
            print("--recipe is not valid JSON", file=sys.stderr)
            return 2
        if not isinstance(recipe, dict):
            print("--recipe must be a JSON object", file=sys.stderr)
            return 2
        if args.min_examples is not None and args.min_examples < 0:
            print("--min-examples must be >= 0", file=sys.stderr)
            return 2
        job_id = args.job_id or f"job-{uuid.uuid4().hex[:12]}"
        base = args.base
        if base and Path(base).exists():  # a path relative to here means nothing to a worker in another folder
            base = str(Path(base).resolve())
        cmd = StartFineTune(
            job_id=job_id, base_model=base, method=args.method, recipe=recipe, min_examples=args.min_examples
        )
        broker = found["REDIS_URL"]
        try:
            send_start(cmd, broker)
        except Exception as exc:  # kombu's connection errors vary by transport
            print(f"could not send the job to the broker {_redact(broker)}: {exc}", file=sys.stderr)
            return 2
        print(job_id)
        if not args.follow:
            return 0
        try:
            job = follow(job_id, gateway, wait_s=args.wait, appear_s=args.appear_timeout)
        except JobNotFound as exc:
            print(str(exc), file=sys.stderr)
            return 2
        print(json.dumps(job, indent=2, default=str))
        return _exit_code(job)
    except httpx.HTTPError as exc:
        print(f"could not reach {gateway}: {exc}", file=sys.stderr)
        return 2


def _redact(url: str) -> str:
    """A broker URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


if __name__ == "__main__":
    raise SystemExit(main())
