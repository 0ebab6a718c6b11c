"""The GPU profile's serving engine agrees with the code: the vLLM image is pinned, runtime LoRA loading is on,
its max LoRA rank covers every recipe, its serving key is the one the router and the finetune service derive,
and the finetune worker of the profile is a CUDA build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # no stubs installed (types-PyYAML is not a dependency)

from services.finetune.domain import MAX_SERVED_LORA_RANK
from shared.serving import serving_api_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    env = {
        "PATH": "/usr/bin:/bin",
        "ADMIN_TOKEN": "x",
        "SESSION_HASH_KEY": "y",
        "REDIS_PASSWORD": "z",
        "HOME": str(tmp_path_factory.mktemp("h")),
    }
    res = subprocess.run(
        ["docker-compose", "--profile", "gpu", "config"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)["services"]


def test_vllm_is_pinned_with_runtime_lora_loading_and_a_rank_that_covers_every_recipe(gpu_config: dict) -> None:
    vllm = gpu_config["vllm"]
    image, _, tag = vllm["image"].partition(":")
    assert image == "vllm/vllm-openai" and tag.startswith("v") and tag != "latest"
    env = vllm["environment"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert int(env["VLLM_MAX_LORA_RANK"]) == MAX_SERVED_LORA_RANK
    assert any(v.endswith(":/data:ro") for v in vllm["volumes"] if isinstance(v, str)) or any(
        isinstance(v, dict) and v.get("target") == "/data" for v in vllm["volumes"]
    )


def test_the_gpu_finetune_worker_is_a_cuda_build_and_the_api_can_point_at_vllm(gpu_config: dict) -> None:
    worker = gpu_config["finetune-worker-gpu"]
    assert "/whl/cu" in worker["build"]["args"]["TORCH_INDEX"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "FINETUNE_SERVING_BASE_URL" in gpu_config["finetune-api"]["environment"]


def test_the_vllm_entrypoint_derives_the_same_serving_key_as_the_code() -> None:
    out = subprocess.run(
        ["sh", str(ROOT / "deploy" / "vllm-serve.sh"), "--print-key"],
        env={"PATH": "/usr/bin:/bin", "ADMIN_TOKEN": "admin-token-1"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == serving_api_key(None, "admin-token-1")
    explicit = subprocess.run(
        ["sh", str(ROOT / "deploy" / "vllm-serve.sh"), "--print-key"],
        env={"PATH": "/usr/bin:/bin", "ADMIN_TOKEN": "a", "SERVING_API_KEY": "sk-given"}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert explicit.stdout.strip() == "sk-given" == serving_api_key("sk-given", "a")
