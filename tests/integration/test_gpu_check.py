"""bench/gpu_check.py: its CPU path runs the tiny shape end to end and writes the figures as JSON; the wheel
picker installs only what is missing or does not satisfy what is being installed."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\n")
    return path


def test_the_wheel_picker_installs_what_is_missing_or_too_old_and_nothing_else(tmp_path: Path) -> None:
    trl = _wheel(tmp_path, "trl", "1.16.0", ["datasets>=4.7.0", "pandas>=2.1.1", "psutil>=5.9.4", "numpy>=1.26"])
    datasets = _wheel(tmp_path, "datasets", "5.2.0", ["dill<0.4.2,>=0.3.0", "huggingface-hub<3.0,>=1.31.0"])
    pandas = _wheel(tmp_path, "pandas", "3.1.1", ["numpy>=2.0.2"])
    psutil = _wheel(tmp_path, "psutil", "7.2.2", [])
    numpy = _wheel(tmp_path, "numpy", "2.4.6", [])
    dill = _wheel(tmp_path, "dill", "0.4.1", [])
    hub = _wheel(tmp_path, "huggingface_hub", "2.4.0", [])
    installed = {"numpy": "2.1.0", "psutil": "5.9.0", "huggingface-hub": "0.30.0", "torch": "2.6.0"}
    chosen = gpu_check.wheels_to_install([trl, datasets, pandas, psutil, numpy, dill, hub], installed)
    # numpy 2.1 satisfies every requirement: kept; psutil 5.9.0 < 5.9.4 and hub 0.30 < 1.31: replaced
    assert set(chosen) == {trl, datasets, pandas, psutil, dill, hub}


@pytest.mark.slow
def test_the_cpu_path_runs_the_tiny_shape_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--tiny", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["device"] == "cpu"
    assert result["sft_trl"]["tokens_per_s"] > 0 and result["sft_trl"]["eval_seconds"] >= 0
    assert result["plain_loop"]["tokens_per_s"] > 0 and result["trl_vs_plain"] > 0
    assert result["sft_trl"]["steady_tokens_per_s"] > 0 and result["plain_loop"]["steady_tokens_per_s"] > 0
    assert result["trl_vs_plain_steady"] > 0 and result["sft_trl"]["activation_checkpointing"] is False
    variants = result["plain_loop_variants"]
    assert set(variants) == {"no_dropout", "batch_x2", "bf16_adapters", "autocast_no_input_casts"}
    assert {v["batch"] for v in variants.values()} == {4, 8}
    assert [(v["float32_adapters"], v["cast_inputs"]) for v in variants.values()] == [
        (True, True), (True, True), (False, True), (True, False)
    ]  # fmt: skip
    assert all(v["steady_tokens_per_s"] > 0 and v["tokens"] == variants["no_dropout"]["tokens"] for v in (
        variants["bf16_adapters"], variants["autocast_no_input_casts"]
    ))  # fmt: skip
    # a float32 model on the CPU: peft's adapters are float32 either way (on a bf16 model the last is bf16)
    assert result["plain_loop"]["adapter_dtype"] == variants["bf16_adapters"]["adapter_dtype"] == "float32"
    for method in ("kto", "dpo"):
        assert result[method]["steps"] >= 1 and result[method]["seconds_per_step"] > 0
    assert result["serving"]["sequential"]["tokens"] > 0 and result["serving"]["concurrent"]["tokens"] > 0
    assert result["serving"]["requests"] == 8
    assert set(result["targets"]) == {"trl_vs_plain_at_least_0.9", "sft_mfu_at_least_0.30"}
