"""A finetune worker trains on one GPU: importing its tasks makes only the first visible, unless
CUDA_VISIBLE_DEVICES already names the ones to use (trl's trainers refuse the nn.DataParallel that transformers
wraps a model in when it sees several)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import os, services.finetune.tasks; print(os.environ['CUDA_VISIBLE_DEVICES'])"


def _visible_after_import(tmp_path: Path, given: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env |= {"DATA_DIR": str(tmp_path), "FINETUNE_DATABASE_URL": f"sqlite:///{tmp_path}/finetune.db"}
    if given is not None:
        env["CUDA_VISIBLE_DEVICES"] = given
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_worker_sees_one_gpu_unless_told_which(tmp_path: Path) -> None:
    assert _visible_after_import(tmp_path, None) == "0"
    assert _visible_after_import(tmp_path, "2,3") == "2,3"
