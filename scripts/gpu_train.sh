#!/usr/bin/env bash
# Fine-tune MBMamba on a GPU machine in one command, run from anywhere inside the repository.
#
#   scripts/gpu_train.sh [--dry-run] [--minutes M] [--config FILE] [-- EXTRA `mbmamba train` OPTIONS]
#
# The GPU machine has PyTorch but no network and no ../shared folder, so the data comes from
# gpu_data/ and missing Python packages from gpu_wheels/ (both filled by `make gpu-data` and carried
# along). The package runs from the source tree through PYTHONPATH, so nothing is built there.
# Steps: check the packages. Train from the shipped weights with bfloat16 autocast for M minutes
# (default 6, or GPU_TRAIN_MINUTES), scoring the EMA weights on gpu_data/real before and after.
# Copy train.log, metrics.csv, summary.json, config.json and the trained tensors into $OUT
# (default runs/gpu-train); scripts/gpu_weights.py splits the tensors into files of at most 15 MiB.
# GPU_DATA replaces the gpu_data folder, PYTHON the python3 interpreter.
# A CUDA out-of-memory error at the start retries with half the batch, down to 2.
#
# --dry-run does the same on the CPU with configs/tiny-dryrun.json and tiny generated data in a few
# seconds, so that a typo fails here rather than on the GPU machine; `make test` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
minutes="${GPU_TRAIN_MINUTES:-6}"
config=configs/gpu-s.json
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --minutes) minutes="$2"; shift ;;
        --config) config="$2"; shift ;;
        --) shift; extra=("$@"); break ;;
        *) echo "gpu_train.sh: unknown option $1 (valid: --dry-run, --minutes M, --config FILE, -- OPTIONS)" >&2; exit 2 ;;
    esac
    shift
done

python="${PYTHON:-python3}"
out="${OUT:-runs/gpu-train}"
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/mbmamba-gpu.XXXXXX")"
log() { echo "[gpu_train] $*" >&2; }

# 1. Python packages: use the machine's own, else the carried wheels.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -m mbmamba_cli --help >/dev/null 2>&1; then
    if ! compgen -G "gpu_wheels/*.whl" >/dev/null; then
        "$python" -m mbmamba_cli --help || true
        log "the mbmamba command does not start here and gpu_wheels/ is empty; run 'make gpu-data' and carry gpu_wheels"
        exit 1
    fi
    log "installing the carried wheels from gpu_wheels/ into $work/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" gpu_wheels/*.whl
    export PYTHONPATH="$PWD:$work/site${PYTHONPATH#"$PWD"}"
    "$python" -m mbmamba_cli --help >/dev/null
fi

# 2. Data, config and starting weights.
options=(--minutes "$minutes" --set val.at_start=true)
if [[ $dry_run -eq 1 ]]; then
    data="$work/data"
    "$python" scripts/make_gpu_data.py --fake "$data"
    config=configs/tiny-dryrun.json
    options+=(--synthetic "$data/sharp" --kernels "$data/kernels" --val "$data/real" --steps 3 --device cpu)
    batch=2
else
    data="${GPU_DATA:-gpu_data}"
    for needed in sharp kernels real; do
        if [[ ! -d "$data/$needed" ]]; then
            log "$data/$needed is missing; run 'make gpu-data' on the development machine and carry gpu_data"
            exit 1
        fi
    done
    options+=(--synthetic "$data/sharp" --kernels "$data/kernels" --val "$data/real")
    if [[ ! -f weights/encoder.safetensors ]]; then
        log "WARNING: no shipped weights in weights/; training the whole network from random weights instead"
        options+=(--set model.init=null --set train.freeze_encoder=false)
    fi
    batch="$("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['data']['batch_size'])" "$config")"
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || true
fi

# 3. Train; on CUDA out-of-memory (exit code 3) retry with half the batch.
while true; do
    run="$work/run-batch$batch"
    log "training with $config, batch $batch, budget $minutes minutes, run folder $run"
    status=0
    "$python" -m mbmamba_cli train --config "$config" --out "$run" --batch-size "$batch" \
        "${options[@]}" "${extra[@]}" || status=$?
    if [[ $status -eq 3 && $batch -gt 2 ]]; then
        batch=$((batch / 2))
        log "out of GPU memory; retrying with batch $batch"
        continue
    fi
    break
done
if [[ $status -ne 0 ]]; then
    log "training failed with exit code $status; its log is copied to $out/train.log"
    cp "$run/train.log" "$out/" 2>/dev/null || true
    exit "$status"
fi

# 4. Results: logs, metrics and the trained tensors in returnable sizes.
cp "$run/train.log" "$run/metrics.csv" "$run/summary.json" "$run/config.json" "$out/"
"$python" scripts/gpu_weights.py export "$run/final.safetensors" "$out" >&2
"$python" - "$out/summary.json" <<'EOF' >&2
import json
import sys

summary = json.load(open(sys.argv[1]))
before, after = summary["validation_start"] or {}, summary["validation"] or {}
print(f"[gpu_train] {summary['status']} after {summary['step']} steps, {summary['wall_time_s']:.0f} s, "
      f"{summary['seconds_per_step']:.3f} s/step, peak memory {summary['peak_memory_gb']:.1f} GB")
if before and after:
    print(f"[gpu_train] blurred input   PSNR {after['val_input_psnr']:.3f} dB  SSIM {after['val_input_ssim']:.4f}")
    print(f"[gpu_train] before training PSNR {before['val_psnr']:.3f} dB  SSIM {before['val_ssim']:.4f}")
    print(f"[gpu_train] after training  PSNR {after['val_psnr']:.3f} dB  SSIM {after['val_ssim']:.4f}")
    for name, group in after["groups"].items():
        start = before["groups"][name]
        print(f"[gpu_train]   {name} ({group['pairs']:.0f} pairs): input {group['input_psnr']:.3f} dB, "
              f"before {start['psnr']:.3f} dB, after {group['psnr']:.3f} dB")
EOF
rm -rf "$work"
log "results in $out"
