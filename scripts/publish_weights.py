"""Measure a trained MBMamba checkpoint and publish it into weights/ with its manifest entry.

    .venv/bin/python scripts/publish_weights.py --variant s --run runs/cpu-s [--data ../shared/data]

`--run` takes a run folder (its final.safetensors, else the EMA weights of its newest checkpoint) or a
weights file. The script scores the float32 weights on the Levin pairs, rounds them to float16 and keeps
float16 only when that costs under 0.05 dB there, then scores the weights it ships on every evaluation set
next to the blurred input, measures the regression crop, and writes the files and the manifest entry.
Nothing is written when `--dry-run` is given.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from mbmamba_cli.inference.engine import Deblurrer
from mbmamba_cli.log import setup_logging
from mbmamba_cli.models import build_model
from mbmamba_cli.models.weights import canonicalize_state_dict, load_into, load_state_dict_file, weights_dir
from mbmamba_cli.training.publish import (
    EVALUATION_SETS,
    HALF_PRECISION_BUDGET_DB,
    REAL_SETS,
    beats_blurred_input,
    half_precision_state,
    hardware_description,
    measure_crop,
    measure_sets,
    write_shipped,
)


def read_run(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and lineage of a run folder or a weights file."""
    if run.is_file():
        with safe_open(str(run), "pt") as handle:
            metadata = handle.metadata() or {}
        return canonicalize_state_dict(load_state_dict_file(run)), metadata

    final = run / "final.safetensors"
    if final.is_file():
        state, metadata = read_run(final)
        summary = run / "summary.json"
        if summary.is_file():
            metadata = {**metadata, **{k: str(v) for k, v in json.loads(summary.read_text()).items()}}
        return state, metadata

    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    if not checkpoints:
        raise SystemExit(f"{run} has neither final.safetensors nor checkpoints/step_*; pass a run folder")
    newest = checkpoints[-1]
    tensors = load_state_dict_file(newest / "state.safetensors")
    state = {key[len("ema.") :]: value for key, value in tensors.items() if key.startswith("ema.")}
    meta = json.loads((newest / "state.json").read_text())
    metadata = {
        "steps": str(meta["step"]),
        "samples_seen": str(meta["samples_seen"]),
        "wall_time_s": str(meta["wall_time_s"]),
        "config": json.dumps(meta["config"]),
        "weights": "ema",
    }
    return state, metadata


def model_from_state(variant: str, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    model = build_model(variant)
    load_into(model, {key: value.float() for key, value in state.items()}, source)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, choices=["s", "b", "l"])
    parser.add_argument("--run", required=True, type=Path, help="run folder or weights file")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="shared data folder")
    parser.add_argument("--out", type=Path, default=None, help="weights folder (default: the shipped one)")
    parser.add_argument("--hardware", default=None, help="what trained it (default: this machine)")
    parser.add_argument("--notes", default="", help="free text stored in the manifest entry")
    parser.add_argument("--dry-run", action="store_true", help="measure only, write nothing")
    args = parser.parse_args()
    setup_logging()

    state, metadata = read_run(args.run)
    model = model_from_state(args.variant, state, str(args.run))
    started = time.perf_counter()

    full = measure_sets(Deblurrer(model, "cpu", "fp32"), args.data, ("levin09",))
    half_model = model_from_state(args.variant, half_precision_state(model), "float16 copy")
    half_levin = measure_sets(Deblurrer(half_model, "cpu", "fp32"), args.data, ("levin09",))
    half_cost = full["levin09"]["psnr"] - half_levin["levin09"]["psnr"]
    use_half = abs(half_cost) < HALF_PRECISION_BUDGET_DB
    shipped_model = half_model if use_half else model

    metrics = dict(half_levin if use_half else full)
    others = tuple(name for name in EVALUATION_SETS if name != "levin09")
    metrics.update(measure_sets(Deblurrer(shipped_model, "cpu", "fp32"), args.data, others))
    beats_input = all(beats_blurred_input(metrics[name]) for name in REAL_SETS)

    config = json.loads(metadata.get("config", "{}"))
    entry = {
        "variant": args.variant,
        "steps": int(metadata.get("steps", 0)),
        "samples_seen": int(metadata.get("samples_seen", 0)),
        "patch_size": config.get("data", {}).get("patch_size"),
        "batch_size": config.get("data", {}).get("batch_size"),
        "data": config.get("data", {}),
        "freeze_encoder": config.get("train", {}).get("freeze_encoder"),
        "hardware": args.hardware or hardware_description(),
        "wall_time_s": round(float(metadata.get("wall_time_s", 0.0)), 1),
        "weights": metadata.get("weights", "ema"),
        "half_precision_cost_db": round(half_cost, 4),
        "metrics": metrics,
        "metrics_protocol": "gopro (RGB, full frame, no crop), float64 PSNR and 11x11 Gaussian SSIM; "
        "inference with mbmamba deblur defaults on CPU (fp32, tile auto)",
        "beats_input": beats_input,
        "crop_check": measure_crop(shipped_model, args.data),
        "published": time.strftime("%Y-%m-%d"),
        "command": " ".join(["scripts/publish_weights.py", *sys.argv[1:]]),
        "notes": args.notes,
    }
    print(json.dumps(entry, indent=2))
    print(f"measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not args.dry_run:
        write_shipped(shipped_model, args.variant, args.out or weights_dir(), entry, use_half)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
