"""Tests of `mbmamba deblur` through the command line, with a fake model in place of the weights."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import mbmamba_cli.cli.deblur  # noqa: F401  registers the command
from mbmamba_cli.cli import app
from mbmamba_cli.io.images import read_image

FILE_KEYS = {"input", "output", "status", "seconds", "error"}
SUMMARY_KEYS = {"done", "skipped", "failed", "seconds"}


class InvertNet(torch.nn.Module):
    """Returns 1 - x: every output value differs from the input, so a copied input is caught."""

    def __init__(self) -> None:
        super().__init__()
        from mbmamba_cli.models import get_variant

        self.spec = get_variant("s")
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - x + self.anchor


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make `load_model` return InvertNet with WeightsInfo that the test can change."""
    from mbmamba_cli.models import weights

    state: dict = {"manifest": None, "beats_input": None, "calls": 0}

    def load_model(variant, weights_path=None, device="cpu"):
        state["calls"] += 1
        info = weights.WeightsInfo(variant, "test weights", state["manifest"], state["beats_input"])
        return InvertNet().to(device), info

    monkeypatch.setattr(weights, "load_model", load_model)
    return state


def invoke(*args: object, stdin: str | None = None):
    """Run `mbmamba deblur ARGS` in-process; the callback keeps `deblur` a sub-command."""
    group = typer.Typer()

    @group.callback()
    def _root() -> None:
        """mbmamba"""

    command = next(info for info in app.registered_commands if info.name == "deblur")
    group.registered_commands.append(command)
    return CliRunner().invoke(group, ["deblur", *map(str, args)], input=stdin, env={"COLUMNS": "1000"})


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def write_rgb(path: Path, height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """Write an 8-bit RGB PNG (or any format by extension) and return its pixels in [0, 1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels.astype(np.float32) / 255


def test_folder_deblurred(tmp_path: Path, fake_model: dict) -> None:
    source = write_rgb(tmp_path / "in" / "a.png")
    write_rgb(tmp_path / "in" / "b.png", seed=1)

    result = invoke(tmp_path / "in", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    output = read_image(tmp_path / "out" / "a.png").pixels
    assert np.abs(output - (1.0 - source)).max() < 1 / 255 + 1e-6


def test_first_log_line_names_setup(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")

    result = invoke(tmp_path / "in", tmp_path / "out", "--device", "cpu")

    first_line = result.stderr.strip().splitlines()[0]
    assert "device cpu" in first_line
    assert "dtype float32" in first_line
    assert "backend torch" in first_line
    assert "weights mbmamba-s from test weights" in first_line


def test_weights_not_beating_input_warned_once(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    write_rgb(tmp_path / "in" / "b.png")
    fake_model["beats_input"] = False
    fake_model["manifest"] = {"metrics": {"gopro": {"psnr": 25.1, "input_psnr": 25.9}}}

    result = invoke(tmp_path / "in", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert result.stderr.count("do not yet beat the blurred input") == 1
    assert "25.10 dB vs input 25.90 dB" in result.stderr


def test_recursive_keeps_relative_paths(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "top.png")
    write_rgb(tmp_path / "in" / "sub" / "deep.png")

    flat = invoke(tmp_path / "in", tmp_path / "flat")
    deep = invoke(tmp_path / "in", tmp_path / "deep", "--recursive")

    assert flat.exit_code == 0, flat.output
    assert not (tmp_path / "flat" / "sub").exists()
    assert deep.exit_code == 0, deep.output
    assert (tmp_path / "deep" / "top.png").is_file()
    assert (tmp_path / "deep" / "sub" / "deep.png").is_file()


def test_stdin_list(tmp_path: Path, fake_model: dict) -> None:
    first, second = tmp_path / "x" / "one.png", tmp_path / "y" / "two.png"
    write_rgb(first)
    write_rgb(second)

    result = invoke("-", tmp_path / "out", "--json", stdin=f"{first}\n\n{second}\n")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "one.png").is_file()
    assert (tmp_path / "out" / "two.png").is_file()
    assert json_lines(result.stdout)[-1]["done"] == 2


def test_json_schema(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")

    result = invoke(tmp_path / "in", tmp_path / "out", "--json")
    objects = json_lines(result.stdout)
    files, summary = objects[:-1], objects[-1]
    by_name = {Path(item["input"]).name: item for item in files}

    assert all(set(item) == FILE_KEYS for item in files)
    assert set(summary) == SUMMARY_KEYS
    assert by_name["a.png"]["status"] == "done"
    assert by_name["a.png"]["error"] is None
    assert by_name["a.png"]["output"] == str(tmp_path / "out" / "a.png")
    assert by_name["broken.png"]["status"] == "failed"
    assert "broken.png" in by_name["broken.png"]["error"]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 0, 1)


def test_broken_file_exit_one_others_written(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(b"")
    write_rgb(tmp_path / "in" / "c.png")

    result = invoke(tmp_path / "in", tmp_path / "out")

    assert result.exit_code == 1
    assert (tmp_path / "out" / "a.png").is_file()
    assert (tmp_path / "out" / "c.png").is_file()
    assert not (tmp_path / "out" / "b.png").exists()
    assert "b.png" in result.stdout  # the failure table names the file


def test_skip_existing_resumes(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    write_rgb(tmp_path / "in" / "b.png")
    first = invoke(tmp_path / "in", tmp_path / "out")
    (tmp_path / "out" / "b.png").unlink()
    before = (tmp_path / "out" / "a.png").stat().st_mtime_ns

    second = invoke(tmp_path / "in", tmp_path / "out", "--skip-existing", "--json")
    statuses = {Path(item["input"]).name: item["status"] for item in json_lines(second.stdout)[:-1]}

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert statuses == {"a.png": "skipped", "b.png": "done"}
    assert (tmp_path / "out" / "a.png").stat().st_mtime_ns == before
    assert (tmp_path / "out" / "b.png").is_file()


def test_skip_existing_all_done_loads_no_model(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    invoke(tmp_path / "in", tmp_path / "out")

    result = invoke(tmp_path / "in", tmp_path / "out", "--skip-existing")

    assert result.exit_code == 0, result.output
    assert fake_model["calls"] == 1


def test_existing_output_overwritten(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    write_rgb(tmp_path / "out" / "a.png", seed=5)
    stale = read_image(tmp_path / "out" / "a.png").pixels

    result = invoke(tmp_path / "in", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert not np.array_equal(read_image(tmp_path / "out" / "a.png").pixels, stale)


def test_suffix_and_ext(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")

    result = invoke(tmp_path / "in", tmp_path / "out", "--suffix", "_sharp", "--ext", "jpg")

    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_sharp.jpg"]
    assert read_image(tmp_path / "out" / "a_sharp.jpg").format == "JPEG"


def test_output_same_as_input_refused(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    original = (tmp_path / "in" / "a.png").read_bytes()

    result = invoke(tmp_path / "in", tmp_path / "in")

    assert result.exit_code == 2
    assert "a.png" in result.stderr
    assert (tmp_path / "in" / "a.png").read_bytes() == original


def test_output_beside_input_with_suffix(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")
    original = (tmp_path / "in" / "a.png").read_bytes()

    result = invoke(tmp_path / "in", tmp_path / "in", "--suffix", "_sharp")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "in" / "a_sharp.png").is_file()
    assert (tmp_path / "in" / "a.png").read_bytes() == original


def test_paths_spaces_non_ascii(tmp_path: Path, fake_model: dict) -> None:
    folder = tmp_path / "in put" / "fotos ñandú"
    write_rgb(folder / "straße ü 1.png")

    result = invoke(tmp_path / "in put", tmp_path / "out dir é", "--recursive")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "out dir é" / "fotos ñandú" / "straße ü 1.png").is_file()


def test_modes_kept(tmp_path: Path, fake_model: dict) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    rgb16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "in" / "rgb16.png"), rgb16)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "rgba.png")
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "in" / "gray.png")

    result = invoke(tmp_path / "in", tmp_path / "out")
    out16 = read_image(tmp_path / "out" / "rgb16.png")
    out_rgba = read_image(tmp_path / "out" / "rgba.png")
    out_gray = read_image(tmp_path / "out" / "gray.png")

    assert result.exit_code == 0, result.output
    assert out16.bit_depth == 16
    assert np.abs(out16.pixels - (1.0 - read_image(tmp_path / "in" / "rgb16.png").pixels)).max() < 2 / 65535
    assert out_rgba.mode == "RGBA"
    assert np.array_equal(np.round(out_rgba.alpha * 255).astype(np.uint8), rgba[:, :, 3])
    assert out_gray.mode == "L"


def test_missing_input_exit_two(tmp_path: Path, fake_model: dict) -> None:
    result = invoke(tmp_path / "nowhere", tmp_path / "out")

    assert result.exit_code == 2
    assert "nowhere" in result.stderr


def test_empty_folder_exit_two(tmp_path: Path, fake_model: dict) -> None:
    (tmp_path / "in").mkdir()

    result = invoke(tmp_path / "in", tmp_path / "out")

    assert result.exit_code == 2
    assert "no images found" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--tile", "huge", "invalid tile"),
        ("--max-memory", "lots", "invalid memory size"),
        ("--tile-overlap", "-3", "invalid --tile-overlap"),
        ("--variant", "xl", "unknown variant"),
        ("--precision", "int8", "unknown precision"),
        ("--device", "tpu", "invalid device"),
    ],
)
def test_invalid_option_exit_two(
    tmp_path: Path, fake_model: dict, option: str, value: str, message: str
) -> None:
    write_rgb(tmp_path / "in" / "a.png")

    result = invoke(tmp_path / "in", tmp_path / "out", option, value)

    assert result.exit_code == 2
    assert message in result.stderr


def test_missing_weights_file_exit_two(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")

    result = invoke(tmp_path / "in", tmp_path / "out", "--weights", tmp_path / "none.safetensors")

    assert result.exit_code == 2
    assert "none.safetensors" in result.stderr


def test_quiet_prints_no_table(tmp_path: Path, fake_model: dict) -> None:
    write_rgb(tmp_path / "in" / "a.png")

    result = invoke(tmp_path / "in", tmp_path / "out", "--quiet")

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == ""


def test_help_lists_overwrite_rule() -> None:
    result = invoke("--help")

    assert result.exit_code == 0
    assert "never overwritten" in " ".join(result.stdout.split())


@pytest.mark.slow
def test_real_small_model(tmp_path: Path) -> None:
    from mbmamba_cli.models.weights import shipped_variants

    if "s" not in shipped_variants():
        pytest.skip("no shipped mbmamba-s weights in weights/; train or add them to run this test")
    write_rgb(tmp_path / "in" / "a.png", height=48, width=64)

    result = invoke(tmp_path / "in", tmp_path / "out", "--variant", "s", "--device", "cpu", "--json")

    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "out" / "a.png").pixels.shape == (48, 64, 3)
    assert os.path.getsize(tmp_path / "out" / "a.png") > 0
