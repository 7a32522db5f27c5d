"""Tests for `mbmamba eval`: JSON and CSV output, the table, exit codes and the model path."""

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import mbmamba_cli.cli.evaluate  # noqa: F401  registers the command
from mbmamba_cli.cli import app


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB image in [0, 1] (blurred noise), float64 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((height, width, 3)), (0, 0), 2.0)
    return (image - image.min()) / (image.max() - image.min())


def _write(path: Path, pixels: np.ndarray) -> Path:
    """Write (h, w, 3) RGB in [0, 1] as an 8-bit image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    assert cv2.imwrite(str(path), np.ascontiguousarray(data[:, :, ::-1]))
    return path


def _folders(tmp_path: Path, count: int = 3, size: tuple[int, int] = (24, 40)) -> tuple[Path, Path, Path]:
    """gt/, blur/ and pred/ folders with `count` matching images each."""
    rng = np.random.default_rng(7)
    for index in range(count):
        sharp = _smooth_image(*size, seed=index)
        _write(tmp_path / "gt" / f"img{index}.png", sharp)
        _write(tmp_path / "blur" / f"img{index}.png", cv2.GaussianBlur(sharp, (0, 0), 1.5))
        _write(tmp_path / "pred" / f"img{index}.png", sharp + 0.03 * rng.standard_normal(sharp.shape))
    return tmp_path / "gt", tmp_path / "blur", tmp_path / "pred"


def _invoke(*args: str):
    """Run `mbmamba eval ARGS` in-process; the group callback keeps `eval` a sub-command."""
    group = typer.Typer()

    @group.callback()
    def _root() -> None:
        """mbmamba"""

    command = next(info for info in app.registered_commands if info.name == "eval")
    group.registered_commands.append(command)
    # A wide terminal keeps Rich from wrapping long file names in the log lines.
    return CliRunner().invoke(group, ["eval", *map(str, args)], env={"COLUMNS": "1000"})


def _json_objects(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


class _GlobalMeanModel(torch.nn.Module):
    """Adds a tenth of the input's mean minus 0.5: the output depends on the whole input, so
    tiled and whole-image results differ, as they do for MBMamba's scans."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * (x.mean() - 0.5)


@pytest.fixture
def fake_engine(monkeypatch):
    """Replace `create_deblurrer` with the real engine around `_GlobalMeanModel`; record the options."""
    from mbmamba_cli.inference import engine

    calls: list[dict] = []

    def create(variant, weights=None, **options):
        calls.append({"variant": variant, "weights": weights, **options})
        return engine.Deblurrer(
            _GlobalMeanModel(), "cpu", "fp32", options["tile"], options["tile_overlap"], options["max_memory"]
        )

    monkeypatch.setattr(engine, "create_deblurrer", create)
    return calls


def test_eval_registered():
    assert "eval" in [info.name for info in app.registered_commands]


def test_pred_json_schema(tmp_path):
    gt, _, pred = _folders(tmp_path)

    result = _invoke("--pred", pred, "--gt", gt, "--json")

    assert result.exit_code == 0, result.output
    objects = _json_objects(result.stdout)
    pairs, summary = objects[:-1], objects[-1]
    assert [pair["name"] for pair in pairs] == ["img0", "img1", "img2"]
    for pair in pairs:
        assert isinstance(pair["psnr"], float)
        assert 0.0 < pair["ssim"] <= 1.0
    assert summary["protocol"] == "gopro"
    assert summary["count"] == 3
    assert summary["psnr"] == pytest.approx(np.mean([pair["psnr"] for pair in pairs]))
    assert summary["ssim"] == pytest.approx(np.mean([pair["ssim"] for pair in pairs]))
    assert "scikit-image" in summary["implementation"]
    assert summary["failures"] == []


def test_csv_rows_match_json(tmp_path):
    gt, _, pred = _folders(tmp_path)
    csv_path = tmp_path / "scores" / "per_image.csv"

    result = _invoke("--pred", pred, "--gt", gt, "--json", "--csv", csv_path)

    assert result.exit_code == 0, result.output
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = _json_objects(result.stdout)[:-1]
    assert [row["name"] for row in rows] == [pair["name"] for pair in pairs]
    assert all(row["protocol"] == "gopro" for row in rows)
    for row, pair in zip(rows, pairs, strict=True):
        assert float(row["psnr"]) == pytest.approx(pair["psnr"])
        assert float(row["ssim"]) == pytest.approx(pair["ssim"])
        assert row["width"] == "40"


def test_table_names_protocol(tmp_path):
    gt, _, pred = _folders(tmp_path)

    result = _invoke("--pred", pred, "--gt", gt)

    assert result.exit_code == 0, result.output
    assert "protocol gopro" in result.stdout
    assert "gt" in result.stdout
    assert "scikit-image" in result.stdout


def test_prediction_other_extension(tmp_path):
    gt, _, pred = _folders(tmp_path, count=1)
    image = cv2.imread(str(pred / "img0.png"))
    (pred / "img0.png").unlink()
    cv2.imwrite(str(pred / "img0.bmp"), image)

    result = _invoke("--pred", pred, "--gt", gt, "--json")

    assert result.exit_code == 0, result.output
    assert _json_objects(result.stdout)[-1]["count"] == 1


def test_missing_prediction_exit_1(tmp_path):
    gt, _, pred = _folders(tmp_path)
    (pred / "img1.png").unlink()

    result = _invoke("--pred", pred, "--gt", gt, "--json")

    assert result.exit_code == 1
    assert "img1.png" in result.stderr
    assert result.stdout == ""


def test_extra_prediction_exit_1(tmp_path):
    gt, _, pred = _folders(tmp_path)
    _write(pred / "stray.png", np.zeros((24, 40, 3)))

    result = _invoke("--pred", pred, "--gt", gt)

    assert result.exit_code == 1
    assert "stray.png" in result.stderr


def test_unreadable_prediction_exit_1(tmp_path):
    gt, _, pred = _folders(tmp_path)
    (pred / "img2.png").write_bytes(b"\x89PNG truncated")

    result = _invoke("--pred", pred, "--gt", gt, "--json")

    assert result.exit_code == 1
    summary = _json_objects(result.stdout)[-1]
    assert summary["count"] == 2
    assert summary["failures"][0]["path"] == str(pred / "img2.png")
    assert "img2.png" in result.stderr


def test_size_mismatch_exit_1(tmp_path):
    gt, _, pred = _folders(tmp_path, count=1)
    _write(pred / "img0.png", np.zeros((20, 40, 3)))

    result = _invoke("--pred", pred, "--gt", gt)

    assert result.exit_code == 1
    assert "40x20" in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ["--pred", "PRED", "--blur", "BLUR", "--gt", "GT"],
        ["--gt", "GT"],
        [],
        ["--pred", "PRED", "--gt", "GT", "--compare-untiled"],
        ["--pred", "PRED", "--gt", "GT", "--protocol", "kohler"],
        ["--blur", "BLUR", "--dataset", "GT"],
        ["--pred", "PRED", "--gt", "GT", "--root", "GT"],
    ],
    ids=[
        "pred-and-blur",
        "gt-alone",
        "nothing",
        "compare-with-pred",
        "bad-protocol",
        "blur-with-dataset",
        "root-without-list",
    ],
)
def test_invalid_options_exit_2(tmp_path, arguments):
    gt, blur, pred = _folders(tmp_path, count=1)
    folders = {"GT": gt, "BLUR": blur, "PRED": pred}

    result = _invoke(*[folders.get(argument, argument) for argument in arguments])

    assert result.exit_code == 2


def test_blur_runs_model(tmp_path, fake_engine):
    gt, blur, _ = _folders(tmp_path, count=2)

    result = _invoke(
        "--blur",
        blur,
        "--gt",
        gt,
        "--variant",
        "s",
        "--tile",
        "16",
        "--tile-overlap",
        "8",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--max-memory",
        "1GB",
        "--json",
    )

    assert result.exit_code == 0, result.output
    assert fake_engine[0]["variant"] == "s"
    assert fake_engine[0]["tile"] == "16"
    assert fake_engine[0]["tile_overlap"] == 8
    assert fake_engine[0]["max_memory"] == "1GB"
    assert fake_engine[0]["device"] == "cpu"
    assert _json_objects(result.stdout)[-1]["count"] == 2


def test_compare_untiled_reports_gap(tmp_path, fake_engine):
    gt, blur, _ = _folders(tmp_path, count=2, size=(48, 64))

    result = _invoke(
        "--blur", blur, "--gt", gt, "--tile", "16", "--tile-overlap", "8", "--compare-untiled", "--json"
    )

    assert result.exit_code == 0, result.output
    objects = _json_objects(result.stdout)
    pairs, summary = objects[:-1], objects[-1]
    for pair in pairs:
        assert pair["psnr_gap_db"] == pytest.approx(pair["psnr"] - pair["psnr_untiled"])
        assert pair["max_abs_difference"] > 0.0
    assert summary["psnr_gap_db"] == pytest.approx(np.mean([pair["psnr_gap_db"] for pair in pairs]))
    assert len(fake_engine) == 1


def test_compare_untiled_table(tmp_path, fake_engine):
    gt, blur, _ = _folders(tmp_path, count=1, size=(48, 64))

    result = _invoke("--blur", blur, "--gt", gt, "--tile", "16", "--tile-overlap", "8", "--compare-untiled")

    assert result.exit_code == 0, result.output
    assert "tiled - whole" in result.stdout
    assert "img0" in result.stdout


def test_gopro_dataset_with_mirrored_predictions(tmp_path):
    root = tmp_path / "GOPRO_Large"
    for scene in ("GOPR0384_11_00", "GOPR0410_11_00"):
        sharp = _smooth_image(24, 24, seed=len(scene))
        for role in ("blur", "sharp"):
            _write(root / "test" / scene / role / "000001.png", sharp)
        _write(tmp_path / "out" / scene / "blur" / "000001.png", sharp)

    result = _invoke("--dataset", root, "--pred", tmp_path / "out", "--json")

    assert result.exit_code == 0, result.output
    objects = _json_objects(result.stdout)
    assert [pair["name"] for pair in objects[:-1]] == ["GOPR0384_11_00/000001", "GOPR0410_11_00/000001"]
    assert objects[0]["psnr"] is None
    assert objects[-1]["datasets"][0]["dataset"] == "GOPRO_Large"


def test_list_file_realblur(tmp_path, fake_engine):
    root = tmp_path / "RealBlur"
    lines = []
    for scene in ("scene001", "scene002"):
        sharp = _smooth_image(48, 48, seed=len(lines))
        _write(root / scene / "gt" / "gt_1.png", sharp)
        _write(root / scene / "blur" / "blur_1.png", cv2.GaussianBlur(sharp, (0, 0), 1.0))
        lines.append(f"{scene}/gt/gt_1.png {scene}/blur/blur_1.png")
    (root / "RealBlur_J_test_list.txt").write_text("\n".join(lines) + "\n")

    result = _invoke(
        "--list", root / "RealBlur_J_test_list.txt", "--protocol", "realblur", "--tile", "0", "--json"
    )

    assert result.exit_code == 0, result.output
    objects = _json_objects(result.stdout)
    assert objects[-1]["protocol"] == "realblur"
    assert objects[-1]["count"] == 2
    assert all("intensity_scale" in pair for pair in objects[:-1])


def _blur_sharp_dataset(root: Path, seed: int) -> None:
    sharp = _smooth_image(24, 24, seed=seed)
    _write(root / "blur" / "a.png", cv2.GaussianBlur(sharp, (0, 0), 1.0))
    _write(root / "sharp" / "a.png", sharp)


def test_two_datasets_rows(tmp_path, fake_engine):
    _blur_sharp_dataset(tmp_path / "levin", seed=1)
    _blur_sharp_dataset(tmp_path / "lai", seed=2)

    result = _invoke("--dataset", tmp_path / "levin", "--dataset", tmp_path / "lai", "--tile", "0")

    assert result.exit_code == 0, result.output
    assert "levin" in result.stdout
    assert "lai" in result.stdout
    assert "all" in result.stdout


def test_two_datasets_json_summaries(tmp_path, fake_engine):
    _blur_sharp_dataset(tmp_path / "levin", seed=1)
    _blur_sharp_dataset(tmp_path / "lai", seed=2)

    result = _invoke("--dataset", tmp_path / "levin", "--dataset", tmp_path / "lai", "--tile", "0", "--json")

    summary = _json_objects(result.stdout)[-1]
    assert [entry["dataset"] for entry in summary["datasets"]] == ["lai", "levin"]
    assert [entry["count"] for entry in summary["datasets"]] == [1, 1]
    assert summary["count"] == 2


def test_pred_with_two_datasets_exit_2(tmp_path):
    _blur_sharp_dataset(tmp_path / "levin", seed=1)
    _blur_sharp_dataset(tmp_path / "lai", seed=2)

    result = _invoke("--dataset", tmp_path / "levin", "--dataset", tmp_path / "lai", "--pred", tmp_path)

    assert result.exit_code == 2


@pytest.mark.slow
def test_blur_with_real_engine(tmp_path):
    try:
        from mbmamba_cli.inference.engine import create_deblurrer  # noqa: F401
        from mbmamba_cli.models import build_model
        from mbmamba_cli.models.weights import save_safetensors
    except ImportError as error:
        pytest.skip(f"the inference engine or models do not import: {error}")
    gt, blur, _ = _folders(tmp_path, count=1, size=(32, 32))
    weights = tmp_path / "random_s.safetensors"
    model = build_model("s")
    save_safetensors(model.state_dict(), weights, {"variant": "s"})

    result = _invoke(
        "--blur",
        blur,
        "--gt",
        gt,
        "--variant",
        "s",
        "--weights",
        weights,
        "--device",
        "cpu",
        "--tile",
        "0",
        "--json",
    )

    assert result.exit_code == 0, result.output
    summary = _json_objects(result.stdout)[-1]
    assert summary["count"] == 1
    assert math.isfinite(summary["psnr"])


def test_missing_weights_exit_two(tmp_path: Path) -> None:
    gt, blur, _ = _folders(tmp_path)
    missing = tmp_path / "none.safetensors"

    result = _invoke("--blur", blur, "--gt", gt, "--weights", missing, "--device", "cpu")

    assert result.exit_code == 2
    assert "none.safetensors" in result.output
