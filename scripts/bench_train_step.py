"""Time training steps of a variant and report seconds per step and peak memory, as JSON.

    python scripts/bench_train_step.py --variant s --patch 128 --batch 1 --steps 5

Runs the real `Trainer.train_step` (forward in training mode, multi-scale loss, backward, gradient
clipping, Adam, EMA) on random (blurred, sharp) batches from a generated sharp folder, with the
encoder frozen unless `--train-encoder`. The first `--warmup` steps are not timed. CPU seconds
(all threads of the process) are reported beside wall seconds, because on a shared machine the
wall time also counts other processes' turns. Peak memory is
the CUDA allocator's peak on a GPU, else the process's peak resident set size (which includes the
Python interpreter and the model).
"""

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mbmamba_cli.log import setup_logging
from mbmamba_cli.training.config import apply_overrides, load_config
from mbmamba_cli.training.distributed import setup_placement
from mbmamba_cli.training.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="s")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--train-encoder", action="store_true")
    args = parser.parse_args()
    setup_logging(quiet=True)

    with tempfile.TemporaryDirectory() as folder:
        sharp = Path(folder) / "sharp"
        sharp.mkdir()
        rng = np.random.default_rng(0)
        for index in range(2):
            image = rng.integers(0, 255, (args.patch * 2, args.patch * 2, 3), dtype=np.uint8)
            cv2.imwrite(str(sharp / f"{index}.png"), cv2.GaussianBlur(image, (0, 0), 2))

        overrides = {
            "model.variant": args.variant,
            "data.synthetic": str(sharp),
            "data.patch_size": args.patch,
            "data.batch_size": args.batch,
            "data.workers": 0,
            "train.freeze_encoder": not args.train_encoder,
            "train.device": args.device,
            "train.precision": args.precision,
            "output.dir": str(Path(folder) / "run"),
        }
        config = apply_overrides(
            load_config(REPO / "configs" / "stage2-s.json"),
            [
                "model.encoder_init=null",
                "data.paired=null",
                "val.paired=null",
                *[f"{k}={json.dumps(v)}" for k, v in overrides.items()],
            ],
        )
        trainer = Trainer(config, setup_placement(args.device), None)
        batches = trainer.batches()

        seconds, cpu_seconds = [], []
        for index in range(args.warmup + args.steps):
            blurred, sharp_batch = next(batches)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.train_step(blurred, sharp_batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if index >= args.warmup:
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu_start)

    if trainer.device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    report = {
        "variant": args.variant,
        "patch": args.patch,
        "batch": args.batch,
        "device": str(trainer.device),
        "precision": "bf16" if trainer.autocast_dtype else "fp32",
        "encoder": "trained" if args.train_encoder else "frozen",
        "threads": torch.get_num_threads(),
        "seconds_per_step_median": round(statistics.median(seconds), 3),
        "seconds_per_step_min": round(min(seconds), 3),
        "cpu_seconds_per_step_median": round(statistics.median(cpu_seconds), 3),
        "steps_timed": len(seconds),
        "peak_memory_gb": round(peak_gb, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
