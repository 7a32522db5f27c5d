"""DDP training on the CPU: two gloo ranks see different data and end with identical weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from test_train_loop import CONFIGS, REPO, tiny_config, write_sharp_images

from mbmamba_cli.training.model_setup import build_from_config

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, tmp_path: Path) -> None:
    """One rank: take the ranks from the environment, as torchrun would set them, and train."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from mbmamba_cli.training.loop import run_training

    config = tiny_config(
        tmp_path, **{"train.steps": STEPS, "data.batch_size": 2, "train.freeze_encoder": False}
    )

    def record(trainer) -> None:
        if trainer.step == STEPS:
            state = {
                "model": trainer.model.state_dict(),
                "ema": trainer.ema.state_dict(),
                "order": trainer.sampler.epoch_order(0),
            }
            torch.save(state, tmp_path / f"rank{rank}.pt")

    run_training(config, on_step=record)


def test_ddp_ranks_end_identical(tmp_path: Path) -> None:
    write_sharp_images(tmp_path / "sharp")
    mp.start_processes(_rank_main, args=(2, free_port(), tmp_path), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.manual_seed(0)
    initial = build_from_config(tiny_config(tmp_path).model).state_dict()
    trained = [k for k in initial if not torch.equal(initial[k], ranks[0]["model"][k])]

    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])
    assert all(torch.equal(ranks[0]["ema"][k], ranks[1]["ema"][k]) for k in ranks[0]["ema"])
    assert not set(ranks[0]["order"]) & set(ranks[1]["order"])
    assert trained
    assert (tmp_path / "run" / "final.safetensors").is_file()


def test_torchrun_cli_two_ranks(tmp_path: Path) -> None:
    sharp = write_sharp_images(tmp_path / "sharp")
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port", str(free_port()),
        "-m", "mbmamba_cli", "train", "--config", str(CONFIGS / "tiny-dryrun.json"),
        "--synthetic", str(sharp), "--steps", "2", "--out", str(out), "--quiet", "--json",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )
    summary = json.loads((out / "summary.json").read_text())

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert summary["world_size"] == 2
    assert summary["samples_seen"] == 4
    assert json.loads(completed.stdout)["step"] == 2
    assert (out / "final.safetensors").is_file()
