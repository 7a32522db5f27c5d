"""The GPU training script's CPU dry run, its data preparation and its weight splitting."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    environment = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),
    }
    completed = subprocess.run(
        ["bash", "scripts/gpu_train.sh", "--dry-run", "--minutes", "5"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = (
        json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    )
    parts = sorted(out.glob("*-of-*.safetensors"))

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert summary["status"] == "finished"
    assert summary["validation_start"]["val_input_psnr"] > 0
    assert summary["validation"]["val_psnr"] > 0
    assert (out / "metrics.csv").is_file()
    assert (out / "train.log").is_file()
    assert len(parts) == 1
    assert not any(key.startswith("encoder.") for key in load_file(str(parts[0])))
    assert "after training  PSNR" in completed.stderr


def test_out_of_memory_retries_half_batch(tmp_path: Path) -> None:
    make_gpu_data = load_script("make_gpu_data")
    make_gpu_data.write_fake(tmp_path / "data")
    config = json.loads((REPO / "configs" / "tiny-dryrun.json").read_text())
    config["data"]["batch_size"] = 4
    (tmp_path / "batch4.json").write_text(json.dumps(config))
    # A python3 stand-in that fails training with exit code 3 (out of GPU memory) above batch 2.
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2 $3" == "-m mbmamba_cli train" && " $* " == *" --batch-size 4 "* ]]; then\n'
        "    exit 3\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    environment = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": str(wrapper),
        "GPU_DATA": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),
    }
    command = ["bash", "scripts/gpu_train.sh", "--config", str(tmp_path / "batch4.json")]
    command += ["--", "--device", "cpu", "--steps", "1"]
    completed = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )
    summary = (
        json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "retrying with batch 2" in completed.stderr
    assert summary["samples_seen"] == 2


def test_dry_run_rejects_unknown_option(tmp_path: Path) -> None:
    completed = subprocess.run(
        ["bash", "scripts/gpu_train.sh", "--dry-runn"],
        cwd=REPO,
        env={**os.environ, "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2
    assert "unknown option --dry-runn" in completed.stderr


def test_weights_split_and_merge(tmp_path: Path) -> None:
    gpu_weights = load_script("gpu_weights")
    tensors = {f"decoders.0.w{i}": torch.randn(64, 1024) for i in range(5)}
    tensors["encoder.w"] = torch.randn(8)
    metadata = {
        "display_name": "mbmamba-s",
        "config": json.dumps({"train": {"freeze_encoder": True}}),
    }
    save_file(tensors, str(tmp_path / "final.safetensors"), metadata=metadata)

    parts = gpu_weights.export(tmp_path / "final.safetensors", tmp_path / "parts", max_mb=0.5)
    gpu_weights.merge(tmp_path / "parts", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))

    assert len(parts) == 3
    assert parts[0].name == "mbmamba-s.decoders-00001-of-00003.safetensors"
    assert set(merged) == {k for k in tensors if k.startswith("decoders.")}
    assert all(torch.equal(merged[k], tensors[k]) for k in merged)


def test_merge_reports_missing_part(tmp_path: Path) -> None:
    gpu_weights = load_script("gpu_weights")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "m-00001-of-00002.safetensors"))

    try:
        gpu_weights.merge(tmp_path, tmp_path / "merged.safetensors")
    except SystemExit as error:
        message = str(error)

    assert "1 of 2 parts" in message


def test_sharp_crops_round_robin_budget(tmp_path: Path) -> None:
    make_gpu_data = load_script("make_gpu_data")
    source = tmp_path / "sharp"
    (source / "set").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        cv2.imwrite(
            str(source / "set" / f"p{index}.png"),
            rng.integers(0, 255, (200, 300, 3), dtype=np.uint8),
        )

    everything = make_gpu_data.write_sharp_crops(source, tmp_path / "all", 100, 95, max_mb=100)
    half_budget = everything["bytes"] / 2 / 2**20
    half = make_gpu_data.write_sharp_crops(source, tmp_path / "half", 100, 95, max_mb=half_budget)
    names = {p.name for p in (tmp_path / "half").iterdir()}

    assert everything["crops"] == 12
    assert half["stopped_by_budget"]
    assert half["crops"] < 12
    assert {"set_p0_0.jpg", "set_p1_0.jpg", "set_p2_0.jpg"} <= names


def test_held_out_kernels_not_copied(tmp_path: Path) -> None:
    make_gpu_data = load_script("make_gpu_data")
    kernel = np.zeros((5, 5), np.uint8)
    kernel[2] = 255
    for folder in ("levin09_png", "lai2016_uniform"):
        (tmp_path / "kernels" / folder).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "kernels" / folder / "k.png"), kernel)

    copied = make_gpu_data.copy_kernels(tmp_path / "kernels", tmp_path / "out")

    assert copied == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lai2016_uniform_k.png"]
