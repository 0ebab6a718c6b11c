"""The data team's path in the README, run as written against a running system (the processes `make run`
starts): the CLI finds that system's broker, gateway and token in the data folder, the job appears and ends with
its reason; without a system it refuses to guess a broker; a job sent to a broker the gateway does not use makes
`--follow` fail fast with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.redis_server import RedisServer
from gateway.run import ROOT
from tests.conftest import start_stack

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_URL", "ADMIN_TOKEN", "DATA_DIR")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "services.finetune.cli", *args],
        cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_the_readme_commands_reach_the_running_system(tmp_path: Path, redis_server: RedisServer) -> None:
    # without a running system (no REDIS_URL, no data/run.env) the CLI refuses to guess a broker
    (tmp_path / "data").mkdir()
    refused = _cli("start", "--base", "data/models/tiny", "--method", "sft", cwd=tmp_path)
    assert refused.returncode == 2 and "no broker" in refused.stderr and "make run" in refused.stderr

    stack = start_stack(tmp_path / "data", FINETUNE_TORCH_THREADS="1")
    try:
        run_env = (tmp_path / "data" / "run.env").read_text()
        assert (
            f"REDIS_URL={stack.env['REDIS_URL']}" in run_env
            and oct((tmp_path / "data" / "run.env").stat().st_mode)[-3:] == "600"
        )
        # the README's two commands, from the folder holding data/, with nothing else set
        built = _cli("build-tiny-model", "data/models/tiny", cwd=tmp_path)
        assert built.returncode == 0, built.stderr
        started = _cli("start", "--base", "data/models/tiny", "--method", "sft", "--follow", cwd=tmp_path)
        job_id = started.stdout.split("\n", 1)[0].strip()
        final = json.loads(started.stdout.split("\n", 1)[1])
        # a fresh system has no rated explanations yet: the job reached the system and failed with that reason
        assert final["job_id"] == job_id and final["state"] == "failed", started.stdout + started.stderr
        assert "empty export" in final["reason"]
        assert started.returncode == 1 and job_id in started.stderr  # the progress bar drew the job

        # sent to another broker (a Redis the system does not use): --follow says so instead of waiting forever
        lost = _cli(
            "start", "--base", "data/models/tiny", "--follow", "--appear-timeout", "3", cwd=tmp_path,
            REDIS_URL=redis_server.url,
        )  # fmt: skip
        assert lost.returncode == 2 and "did not appear" in lost.stderr, lost.stderr
    finally:
        stack.stop()
    assert not (tmp_path / "data" / "run.env").exists()
