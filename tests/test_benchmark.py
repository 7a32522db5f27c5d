"""`mbmamba benchmark`: size parsing, MACs by hand, ratios, peak memory and the JSON schema."""

import json
import math
import shlex

import numpy as np
import pytest
import torch
import typer
from conftest import tiny_mbmamba
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from mbmamba_cli.cli import app
from mbmamba_cli.cli import benchmark as _register_benchmark  # noqa: F401  registers the command
from mbmamba_cli.inference import benchmark
from mbmamba_cli.inference.benchmark import (
    BenchmarkError,
    BenchmarkRequest,
    BenchmarkRow,
    PeakMemoryMeter,
    add_baseline_ratios,
    parse_models,
    parse_size,
)
from mbmamba_cli.models import VARIANTS
from mbmamba_cli.models.complexity import count_macs
from mbmamba_cli.models.mamba import Mamba

JSON_KEYS = {
    "model",
    "params",
    "macs",
    "flops",
    "height",
    "width",
    "batch",
    "latency_ms_median",
    "latency_ms_p90",
    "peak_memory_mb",
    "device",
    "dtype",
    "backend",
    "torch_version",
    "cuda_version",
    "device_name",
    "threads",
}


def tiny_model(variant: str) -> nn.Module:
    """A width-16 stand-in for a variant: the same block types at a fraction of the cost."""
    from mbmamba_cli.models.mbmamba import RestorationNet, naf_block

    spec = VARIANTS[variant]
    if spec.block == "naf":
        model = RestorationNet(16, (1, 1, 1, 1), 1, (1, 1, 1, 1), spec.sub_decoders, naf_block())
    else:
        model = tiny_mbmamba(spec.sub_decoders)
    model.spec = spec
    return model


@pytest.fixture
def tiny_models(monkeypatch):
    monkeypatch.setattr(benchmark, "build_model", tiny_model)


def invoke(command: str, *extra: str):
    """Run `mbmamba benchmark COMMAND EXTRA` in-process; the callback keeps it a sub-command."""
    group = typer.Typer()

    @group.callback()
    def _root() -> None:
        """mbmamba"""

    registered = next(info for info in app.registered_commands if info.name == "benchmark")
    group.registered_commands.append(registered)
    args = ["benchmark", *shlex.split(command), *extra]
    return CliRunner().invoke(group, args, env={"COLUMNS": "1000"})


def json_rows(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# --size parsing


def test_parse_size_square():
    assert parse_size("256") == (256, 256)


def test_parse_size_width_first():
    assert parse_size("1280x720") == (720, 1280)


def test_parse_size_portrait():
    assert parse_size("720x1280") == (1280, 720)


def test_parse_size_accepts_capital_x_and_spaces():
    assert parse_size(" 640 X 480 ") == (480, 640)


@pytest.mark.parametrize("text", ["", "abc", "256x", "x256", "1280x720x3", "-5", "12.5", "256,256"])
def test_parse_size_rejects_malformed(text):
    with pytest.raises(BenchmarkError, match="WIDTHxHEIGHT"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "0x16", "16x0"])
def test_parse_size_rejects_zero(text):
    with pytest.raises(BenchmarkError, match="at least 1 pixel"):
        parse_size(text)


# --models and request validation


def test_parse_models_keeps_order_and_aliases():
    assert parse_models("unet, mbmamba-S,l") == ("unet", "s", "l")


def test_parse_models_drops_repeats():
    assert parse_models("s,s,unet") == ("s", "unet")


def test_parse_models_rejects_unknown():
    with pytest.raises(BenchmarkError, match="valid variants"):
        parse_models("s,xl")


def test_parse_models_rejects_empty():
    with pytest.raises(BenchmarkError, match="at least one"):
        parse_models(" , ")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch", 0, "--batch"),
        ("runs", 0, "--runs"),
        ("warmup", -1, "--warmup"),
        ("threads", 0, "--threads"),
        ("chunk_batching", "maybe", "--chunk-batching"),
    ],
)
def test_request_rejects_invalid_option(field, value, message):
    with pytest.raises(BenchmarkError, match=message):
        BenchmarkRequest(**{field: value})


def test_request_rejects_missing_quality_dir(tmp_path):
    with pytest.raises(BenchmarkError, match="not found"):
        BenchmarkRequest(quality_dir=tmp_path / "absent")


# MAC counts against hand formulas


def test_conv_macs_equal_hand_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    batch, height, width = 2, 20, 12

    report = count_macs(conv, (batch, 3, height, width))

    assert report.macs == batch * height * width * 8 * 3 * 3 * 3
    assert report.flops == 2 * report.macs
    assert report.params == 8 * 3 * 3 * 3 + 8


def test_mamba_macs_equal_hand_formula_batch_two():
    d_model, length, batch = 16, 40, 2
    block = Mamba(d_model)
    d_inner, rank, states = block.d_inner, block.dt_rank, block.d_state

    report = count_macs(block, (batch, length, d_model))

    projections = d_model * 2 * d_inner + d_inner * (rank + 2 * states) + rank * d_inner
    projections += d_inner * d_model
    conv = d_inner * 4
    scan = 4.5 * d_inner * states
    assert report.scan_macs == batch * length * scan
    assert report.macs == batch * length * (projections + conv + scan)


# Baseline ratios


def make_row(model: str, macs: int, latencies: list[float]) -> BenchmarkRow:
    return BenchmarkRow(
        model=model,
        params=1,
        macs=macs,
        scan_macs=0,
        height=8,
        width=8,
        batch=1,
        device="cpu",
        device_name="cpu",
        dtype="float32",
        backend=None,
        chunk_batching=None,
        threads=1,
        torch_version=torch.__version__,
        cuda_version=None,
        warmup=0,
        runs=len(latencies),
        latencies_ms=latencies,
    )


def test_ratio_divides_latency_per_mac():
    rows = [make_row("mbmamba-s", 200, [30.0, 40.0, 50.0]), make_row("unet-baseline", 100, [10.0])]

    add_baseline_ratios(rows)

    assert rows[0].latency_per_mac_vs_baseline == pytest.approx(2.0)
    assert rows[1].latency_per_mac_vs_baseline is None


def test_ratio_of_cpu_time_per_mac():
    rows = [make_row("mbmamba-s", 300, [90.0]), make_row("unet-baseline", 100, [10.0])]
    rows[0].cpu_times_ms = [60.0]
    rows[1].cpu_times_ms = [10.0]

    add_baseline_ratios(rows)

    assert rows[0].latency_per_mac_vs_baseline == pytest.approx(3.0)
    assert rows[0].cpu_time_per_mac_vs_baseline == pytest.approx(2.0)


def test_ratio_absent_without_baseline():
    rows = [make_row("mbmamba-s", 200, [40.0])]

    add_baseline_ratios(rows)

    assert rows[0].latency_per_mac_vs_baseline is None


def test_ratio_absent_for_failed_row():
    rows = [make_row("mbmamba-s", 200, []), make_row("unet-baseline", 100, [10.0])]

    add_baseline_ratios(rows)

    assert rows[0].latency_per_mac_vs_baseline is None


def test_row_median_and_p90():
    row = make_row("unet-baseline", 1, [float(v) for v in range(1, 11)])

    assert row.latency_ms_median == pytest.approx(5.5)
    assert row.latency_ms_p90 == pytest.approx(9.1)


# Peak memory


def test_cpu_meter_sees_allocation():
    meter = PeakMemoryMeter(torch.device("cpu"))

    meter.start()
    if "clear_refs" not in meter.method:
        pytest.skip(f"peak RSS cannot be reset here: {meter.method}")
    block = torch.ones(16 * 1024 * 1024)  # 64 MiB, written so the pages are resident
    peak = meter.stop()
    del block

    assert peak is not None
    assert peak >= 60.0


# The command


def test_json_schema_tiny_models(tiny_models):
    result = invoke(
        "--size 32x24 --models s,unet --runs 2 --warmup 0 --device cpu --backend torch --threads 1 --json"
    )

    assert result.exit_code == 0, result.output
    rows = json_rows(result.stdout)
    assert [row["model"] for row in rows] == ["mbmamba-s", "unet-baseline"]
    for row in rows:
        assert JSON_KEYS <= set(row)
        assert row["flops"] == 2 * row["macs"]
        assert (row["height"], row["width"], row["batch"]) == (24, 32, 1)
        assert row["latency_ms_median"] > 0
        assert row["latency_ms_p90"] >= row["latency_ms_median"]
        assert row["cpu_time_ms_median"] > 0
        assert row["device"] == "cpu"
        assert row["dtype"] == "float32"
        assert row["threads"] == 1
        assert row["torch_version"] == torch.__version__
        assert row["error"] is None


def test_json_backend_and_ratio_per_row(tiny_models):
    result = invoke("--size 16 --models s,unet --runs 1 --warmup 0 --device cpu --backend torch --json")

    assert result.exit_code == 0, result.output
    mbmamba_row, baseline_row = json_rows(result.stdout)
    assert mbmamba_row["backend"] == "torch"
    assert baseline_row["backend"] is None
    assert mbmamba_row["chunk_batching"] is False
    assert mbmamba_row["latency_per_mac_vs_baseline"] > 0
    assert baseline_row["latency_per_mac_vs_baseline"] is None
    assert mbmamba_row["cpu_time_per_mac_vs_baseline"] > 0
    assert mbmamba_row["scan_macs"] > 0


def test_chunk_batching_on_is_reported(tiny_models):
    result = invoke("--size 16 --models s --runs 1 --warmup 0 --device cpu --chunk-batching on --json")

    assert result.exit_code == 0, result.output
    assert json_rows(result.stdout)[0]["chunk_batching"] is True


def test_json_real_baseline_matches_variant_table():
    result = invoke("--size 32x32 --models unet --runs 1 --warmup 0 --device cpu --json")

    assert result.exit_code == 0, result.output
    (row,) = json_rows(result.stdout)
    assert row["model"] == "unet-baseline"
    assert row["params"] == VARIANTS["unet"].params
    assert row["macs"] > 0


def test_table_names_unit_and_convention(tiny_models):
    result = invoke("--size 16 --models s,unet --runs 1 --warmup 0 --device cpu")

    assert result.exit_code == 0, result.output
    assert "MACs (G)" in result.stdout
    assert "FLOPs (G) = 2 x MACs" in result.stdout
    assert "multiply-accumulates" in result.stdout
    assert "latency per MAC" in result.stdout
    assert "Peak memory:" in result.stdout


def test_interleave_times_every_model(tiny_models):
    result = invoke("--size 16 --models s,unet --runs 3 --warmup 1 --device cpu --interleave --json")

    assert result.exit_code == 0, result.output
    mbmamba_row, baseline_row = json_rows(result.stdout)
    assert mbmamba_row["latency_ms_median"] > 0
    assert baseline_row["latency_ms_median"] > 0
    assert mbmamba_row["latency_per_mac_vs_baseline"] > 0
    assert "interleaved" in mbmamba_row["memory_method"]


class OutOfMemoryNet(nn.Module):
    """Counts like the wrapped model on the meta device and runs out of memory anywhere else."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.spec = inner.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB")
        return self.inner(x)


@pytest.mark.parametrize("mode", [[], ["--interleave"]])
def test_out_of_memory_fails_one_row(monkeypatch, mode):
    def build(variant):
        model = tiny_model(variant)
        return OutOfMemoryNet(model) if variant == "s" else model

    monkeypatch.setattr(benchmark, "build_model", build)

    result = invoke("--size 16 --models s,unet --runs 2 --warmup 1 --device cpu --json", *mode)

    assert result.exit_code == 1
    failed, baseline_row = json_rows(result.stdout)
    assert "out of memory" in failed["error"]
    assert "lower --batch or --size" in failed["error"]
    assert failed["latency_ms_median"] is None
    assert failed["latency_per_mac_vs_baseline"] is None
    assert baseline_row["error"] is None
    assert baseline_row["latency_ms_median"] > 0


def test_count_only_skips_timing():
    result = invoke("--size 64x48 --models s --device cpu --count-only --json")

    assert result.exit_code == 0, result.output
    (row,) = json_rows(result.stdout)
    assert row["params"] == VARIANTS["s"].params
    assert row["macs"] > row["scan_macs"] > 0
    assert row["latency_ms_median"] is None
    assert row["peak_memory_mb"] is None
    assert row["runs"] == 0


def test_bad_size_exits_with_message():
    result = invoke("--size 1280x --models unet")

    assert result.exit_code == 2
    assert "WIDTHxHEIGHT" in result.output


def test_fp16_request_on_cpu_runs_float32(tiny_models):
    result = invoke("--size 16 --models unet --runs 1 --warmup 0 --device cpu --precision fp16 --json")

    assert result.exit_code == 0, result.output
    assert json_rows(result.stdout)[0]["dtype"] == "float32"


# --with-psnr


def write_pairs(root, count=2, size=16):
    """Write `count` 8-bit RGB pairs to root/blur and root/sharp; return them as float arrays."""
    rng = np.random.default_rng(0)
    (root / "blur").mkdir(parents=True)
    (root / "sharp").mkdir(parents=True)
    pairs = []
    for index in range(count):
        sharp = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        noise = rng.integers(-20, 21, sharp.shape)
        blur = np.clip(sharp.astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(sharp).save(root / "sharp" / f"{index:03d}.png")
        Image.fromarray(blur).save(root / "blur" / f"{index:03d}.png")
        pairs.append((blur / 255.0, sharp / 255.0))
    return pairs


class IdentityDeblurrer:
    def deblur(self, pixels):
        return pixels


def test_with_psnr_without_weights(tiny_models, tmp_path, monkeypatch):
    write_pairs(tmp_path / "pairs")
    monkeypatch.setenv("MBMAMBA_WEIGHTS_DIR", str(tmp_path / "no-weights"))

    result = invoke(
        "--size 16 --models s --runs 1 --warmup 0 --device cpu --json", "--with-psnr", str(tmp_path / "pairs")
    )

    assert result.exit_code == 0, result.output
    (row,) = json_rows(result.stdout)
    assert row["psnr"] is None
    assert row["ssim"] is None
    assert row["quality_note"] == "n/a (no weights)"


def test_with_psnr_scores_pairs(tiny_models, tmp_path, monkeypatch):
    from mbmamba_cli.inference import engine

    pairs = write_pairs(tmp_path / "pairs")
    monkeypatch.setattr(engine, "create_deblurrer", lambda *args, **kwargs: IdentityDeblurrer())
    expected = np.mean([10 * math.log10(1 / np.mean((b - s) ** 2)) for b, s in pairs])

    result = invoke(
        "--size 16 --models unet --runs 1 --warmup 0 --device cpu --json",
        "--with-psnr",
        str(tmp_path / "pairs"),
    )

    assert result.exit_code == 0, result.output
    (row,) = json_rows(result.stdout)
    assert row["psnr"] == pytest.approx(expected, abs=1e-6)
    assert 0 < row["ssim"] < 1
    assert row["quality_note"] == "2 pairs"


def test_with_psnr_rejects_unpaired_folder(tiny_models, tmp_path):
    (tmp_path / "photos").mkdir()

    result = invoke(
        "--size 16 --models s --runs 1 --warmup 0 --device cpu", "--with-psnr", str(tmp_path / "photos")
    )

    assert result.exit_code == 2
    assert "no known dataset layout" in result.output


def test_threads_restored_after_run(tiny_models):
    before = torch.get_num_threads()

    result = invoke("--size 16 --models unet --runs 1 --warmup 0 --device cpu --threads 1 --json")

    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == before
