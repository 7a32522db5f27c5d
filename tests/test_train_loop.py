"""Tests of `mbmamba train`: config parsing, schedule, sampling, checkpoints, resume and signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mbmamba_cli.training.config import (
    ConfigError,
    TrainingConfig,
    apply_override,
    apply_overrides,
    load_config,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Run the tiny models on one thread: extra threads only add overhead at these sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sharp_images(folder: Path, count: int = 3, size: int = 64) -> Path:
    """Write smooth random colour images with edges, so blur changes them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        low = rng.random((8, 8, 3)).astype(np.float32)
        image = cv2.resize(low, (size, size), interpolation=cv2.INTER_NEAREST)
        image += 0.1 * rng.random((size, size, 3)).astype(np.float32)
        cv2.imwrite(str(folder / f"img{index}.png"), np.clip(image * 230, 0, 255).astype(np.uint8))
    return folder


def write_pairs(root: Path, count: int = 2, size: int = 40) -> Path:
    """Write blur/ and sharp/ folders of matching images (blur = box-filtered sharp)."""
    sharp_dir = write_sharp_images(root / "sharp", count, size)
    (root / "blur").mkdir(parents=True, exist_ok=True)
    for path in sharp_dir.iterdir():
        image = cv2.imread(str(path))
        cv2.imwrite(str(root / "blur" / path.name), cv2.blur(image, (5, 5)))
    return root


def cli_app():
    """Return the Typer app with every command registered, as `mbmamba` has them."""
    from mbmamba_cli.cli import app, benchmark, deblur, evaluate, info, train  # noqa: F401

    return app


def tiny_config(tmp_path: Path, name: str = "run", **overrides: object) -> TrainingConfig:
    """The tiny dry-run config on synthetic data under tmp_path."""
    sharp = tmp_path / "sharp"
    if not sharp.is_dir():
        write_sharp_images(sharp)
    config = load_config(CONFIGS / "tiny-dryrun.json")
    settings = {"data.synthetic": str(sharp), "output.dir": str(tmp_path / name), **overrides}
    return apply_overrides(
        config, [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    )


# ---------------------------------------------------------------------------------------------
# Config


def test_override_parses_types() -> None:
    config = apply_overrides(
        TrainingConfig(), ["optim.lr=2e-4", "data.patch_size=128", "data.augment=false"]
    )

    assert config.optim.lr == 2e-4
    assert config.data.patch_size == 128
    assert config.data.augment is False


def test_override_nested_architecture() -> None:
    config = apply_override(TrainingConfig(), "model.architecture.width=8")

    assert config.model.architecture is not None
    assert config.model.architecture.width == 8
    assert config.model.architecture.encoder_blocks == (1, 1, 1, 1)


def test_override_string_and_null() -> None:
    config = apply_overrides(
        TrainingConfig(), ["data.paired=some/folder", "val.crop=64", "val.crop=null"]
    )

    assert config.data.paired == "some/folder"
    assert config.val.crop is None


def test_override_unknown_key_lists_valid() -> None:
    with pytest.raises(ConfigError) as raised:
        apply_override(TrainingConfig(), "optim.learning_rate=1e-3")

    assert "optim.learning_rate" in str(raised.value)
    assert "lr, min_lr, betas" in str(raised.value)


def test_override_unknown_section_lists_valid() -> None:
    with pytest.raises(ConfigError) as raised:
        apply_override(TrainingConfig(), "optimizer.lr=1e-3")

    assert "model, data, optim, loss, train, val, output" in str(raised.value)


def test_override_wrong_type_rejected() -> None:
    with pytest.raises(ConfigError, match="data.patch_size must be an integer"):
        apply_override(TrainingConfig(), "data.patch_size=big")


def test_override_without_equals_rejected() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override(TrainingConfig(), "optim.lr")


def test_override_out_of_range_rejected() -> None:
    with pytest.raises(ConfigError, match="train.ema_decay"):
        apply_override(TrainingConfig(), "train.ema_decay=1.5")


def test_config_file_unknown_key_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"stepz": 10}}))

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(path) in str(raised.value)
    assert "train.stepz" in str(raised.value)


def test_config_file_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")

    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)

    assert config.description


def test_paper_recipe_defaults() -> None:
    config = load_config(CONFIGS / "stage2-s.json")

    assert (config.data.patch_size, config.data.batch_size, config.train.steps) == (
        256,
        32,
        300_000,
    )
    assert (config.optim.lr, config.optim.min_lr, config.optim.betas) == (1e-3, 1e-7, (0.9, 0.999))
    assert config.train.freeze_encoder is True


def test_resolve_config_rejects_config_with_resume(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--set"):
        resolve_config(CONFIGS / "tiny-dryrun.json", [], tmp_path)


# ---------------------------------------------------------------------------------------------
# Schedule, sampler, EMA, optimiser flattening


def test_cosine_schedule_endpoints() -> None:
    from mbmamba_cli.training.loop import learning_rate

    optim = TrainingConfig().optim

    assert learning_rate(0, optim, 1000) == pytest.approx(1e-3)
    assert learning_rate(500, optim, 1000) == pytest.approx(0.5 * (1e-3 + 1e-7))
    assert learning_rate(1000, optim, 1000) == pytest.approx(1e-7)


def test_warmup_schedule_ramps() -> None:
    from mbmamba_cli.training.loop import learning_rate

    optim = apply_override(TrainingConfig(), "optim.warmup_steps=10").optim

    assert learning_rate(0, optim, 100) == pytest.approx(1e-4)
    assert learning_rate(9, optim, 100) == pytest.approx(1e-3)


def test_sampler_shards_disjoint() -> None:
    from mbmamba_cli.training.distributed import ResumableShardedSampler

    shards = [list(ResumableShardedSampler(11, rank, 2, seed=3)) for rank in range(2)]

    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])


def test_sampler_skip_continues_order() -> None:
    from mbmamba_cli.training.distributed import ResumableShardedSampler

    sampler = ResumableShardedSampler(20, 0, 1, seed=5)
    sampler.set_position(2)
    whole = list(sampler)
    sampler.set_position(2, skip=6)

    assert list(sampler) == whole[6:]


def test_sampler_epochs_differ() -> None:
    from mbmamba_cli.training.distributed import ResumableShardedSampler

    sampler = ResumableShardedSampler(20, 0, 1, seed=5)

    assert sampler.epoch_order(0) != sampler.epoch_order(1)


def test_split_batch_rejects_uneven() -> None:
    from mbmamba_cli.training.distributed import split_batch

    with pytest.raises(ValueError, match="divisible"):
        split_batch(5, 2)


def test_ema_tracks_constant_model() -> None:
    from mbmamba_cli.training.ema import ModelEma

    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)

    assert torch.allclose(ema.module.weight, torch.ones(2, 3), atol=1e-6)
    assert ema.updates == 200


def test_ema_first_update_warms_up() -> None:
    from mbmamba_cli.training.ema import ModelEma

    ema = ModelEma(torch.nn.Linear(1, 1), decay=0.999)

    assert ema.current_decay() == pytest.approx(0.1)


def test_optimizer_state_roundtrip() -> None:
    from mbmamba_cli.training.checkpoint import flatten_optimizer, unflatten_optimizer

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    tensors, groups = flatten_optimizer(optimizer.state_dict())

    restored = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=5.0)
    restored.load_state_dict(unflatten_optimizer(tensors, json.loads(json.dumps(groups))))

    assert restored.param_groups[0]["lr"] == 1e-3
    assert restored.param_groups[0]["betas"] == (0.9, 0.999)
    assert torch.equal(
        restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert set(tensors) == {
        f"optim.state.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")
    }


def test_rng_state_roundtrip() -> None:
    import random

    from mbmamba_cli.training.checkpoint import capture_rng_state, restore_rng_state

    state = json.loads(
        json.dumps({k: v for k, v in capture_rng_state().items() if k in ("python", "numpy")})
    )
    torch_state = torch.get_rng_state()
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    restore_rng_state(state["python"], state["numpy"], torch_state, [])

    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_resolve_checkpoint_missing(tmp_path: Path) -> None:
    from mbmamba_cli.training.checkpoint import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# Model set-up


def test_build_custom_architecture() -> None:
    from mbmamba_cli.training.model_setup import build_from_config

    config = load_config(CONFIGS / "tiny-dryrun.json")
    model = build_from_config(config.model)

    assert model.spec.name == "custom"
    assert len(model.decoders) == 1


def test_encoder_and_decoder_init(tmp_path: Path) -> None:
    from mbmamba_cli.models.weights import save_safetensors
    from mbmamba_cli.training.model_setup import build_from_config, load_initial_weights

    base = load_config(CONFIGS / "tiny-dryrun.json")
    source = build_from_config(base.model)
    save_safetensors(source.state_dict(), tmp_path / "source.safetensors", {})
    two = apply_overrides(
        base,
        [
            "model.architecture.sub_decoders=2",
            f"model.encoder_init={json.dumps(str(tmp_path / 'source.safetensors'))}",
            f"model.decoder_init={json.dumps(str(tmp_path / 'source.safetensors'))}",
        ],
    )
    target = build_from_config(two.model)
    load_initial_weights(target, two.model)
    source_state, target_state = source.state_dict(), target.state_dict()

    assert all(
        torch.equal(source_state[k], target_state[k])
        for k in source_state
        if k.startswith("encoder.")
    )
    assert all(
        torch.equal(source_state[k], target_state[k])
        for k in source_state
        if k.startswith("decoders.0.")
    )
    key = next(k for k in source_state if k.startswith("decoders.0.") and k.endswith("weight"))
    assert not torch.equal(
        source_state[key], target_state[key.replace("decoders.0.", "decoders.1.")]
    )


def test_decoder_init_mismatch_rejected(tmp_path: Path) -> None:
    from mbmamba_cli.models.weights import WeightsError, save_safetensors
    from mbmamba_cli.training.model_setup import build_from_config, load_initial_weights

    base = load_config(CONFIGS / "tiny-dryrun.json")
    naf = apply_override(base, "model.architecture.block=naf")
    save_safetensors(build_from_config(naf.model).state_dict(), tmp_path / "naf.safetensors", {})
    config = apply_override(
        base, f"model.decoder_init={json.dumps(str(tmp_path / 'naf.safetensors'))}"
    )

    with pytest.raises(WeightsError, match="does not fit"):
        load_initial_weights(build_from_config(config.model), config.model)


def test_missing_init_file_rejected(tmp_path: Path) -> None:
    from mbmamba_cli.training.model_setup import build_from_config, load_initial_weights

    config = apply_override(
        load_config(CONFIGS / "tiny-dryrun.json"),
        f"model.encoder_init={json.dumps(str(tmp_path / 'x.safetensors'))}",
    )

    with pytest.raises(ConfigError, match="not found"):
        load_initial_weights(build_from_config(config.model), config.model)


# ---------------------------------------------------------------------------------------------
# Training


def test_steps_lower_loss_on_fixed_batch(tmp_path: Path) -> None:
    from mbmamba_cli.training.distributed import setup_placement
    from mbmamba_cli.training.loop import Trainer

    settings = {
        "optim.lr": 3e-3,
        "optim.schedule": "constant",
        "optim.grad_clip": 0,
        "train.freeze_encoder": False,
    }
    trainer = Trainer(tiny_config(tmp_path, **settings), setup_placement("cpu"), None)
    blurred, sharp = next(trainer.batches())
    parts = [trainer.train_step(blurred, sharp) for _ in range(15)]

    assert parts[-1]["total"] < 0.9 * parts[0]["total"]
    assert parts[-1]["charbonnier"] < parts[0]["charbonnier"]
    assert trainer.step == 15


def test_frozen_encoder_unchanged(tmp_path: Path) -> None:
    from mbmamba_cli.training.distributed import setup_placement
    from mbmamba_cli.training.loop import Trainer

    trainer = Trainer(tiny_config(tmp_path), setup_placement("cpu"), None)
    before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    blurred, sharp = next(trainer.batches())
    trainer.train_step(blurred, sharp)
    after = trainer.model.encoder.state_dict()

    assert all(torch.equal(before[k], after[k]) for k in before)


def test_run_writes_outputs(tmp_path: Path) -> None:
    from mbmamba_cli.models.weights import canonicalize_state_dict, load_into, load_state_dict_file
    from mbmamba_cli.training.loop import run_training
    from mbmamba_cli.training.model_setup import build_from_config

    pairs = write_pairs(tmp_path / "val")
    config = tiny_config(tmp_path, **{"val.paired": str(pairs), "val.at_start": True})
    result = run_training(config)
    rows = (result.run_dir / "metrics.csv").read_text().splitlines()
    final = load_state_dict_file(result.final_weights)
    model = build_from_config(config.model)
    load_into(model, canonicalize_state_dict(final), str(result.final_weights))

    assert result.status == "finished"
    assert result.step == 4
    assert rows[0].startswith("step,epoch,samples,loss")
    assert [row.split(",")[0] for row in rows[1:] if row.split(",")[12]] == ["0", "2", "4"]
    assert set(final) == set(model.state_dict())
    assert (result.run_dir / "train.log").read_text().count("step 4/4") == 1
    assert result.start_validation["val_input_psnr"] == pytest.approx(
        result.validation["val_input_psnr"]
    )
    assert len(list((result.run_dir / "checkpoints").iterdir())) == 2


def test_validator_groups_by_scene(tmp_path: Path) -> None:
    from mbmamba_cli.training.distributed import setup_placement
    from mbmamba_cli.training.model_setup import build_from_config
    from mbmamba_cli.training.validation import Validator

    write_pairs(tmp_path / "val" / "first", count=2)
    write_pairs(tmp_path / "val" / "second", count=1)
    validator = Validator(
        tmp_path / "val", setup_placement("cpu"), crop=32, max_images=None, autocast_dtype=None
    )
    model = build_from_config(load_config(CONFIGS / "tiny-dryrun.json").model)
    scores = validator.run(model)
    groups = scores.groups

    assert sorted(groups) == ["first", "second"]
    assert (groups["first"]["pairs"], groups["second"]["pairs"]) == (2, 1)
    assert scores.pairs == 3
    mean = (2 * groups["first"]["input_psnr"] + groups["second"]["input_psnr"]) / 3
    assert scores.input_psnr == pytest.approx(mean)
    assert model.training


def test_final_weights_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    from mbmamba_cli.training.loop import run_training

    result = run_training(tiny_config(tmp_path, **{"train.steps": 2}))
    with safe_open(str(result.final_weights), "pt") as handle:
        metadata = handle.metadata()

    assert metadata["steps"] == "2"
    assert metadata["variant"] == "custom"
    assert metadata["weights"] == "ema"


def test_final_weights_load_as_variant(tmp_path: Path) -> None:
    from mbmamba_cli.models.weights import load_model
    from mbmamba_cli.training.distributed import setup_placement
    from mbmamba_cli.training.loop import Trainer

    config = tiny_config(tmp_path, **{"model.architecture": None, "model.variant": "unet"})
    trainer = Trainer(config, setup_placement("cpu"), None)
    path = trainer.write_final_weights()
    model, info = load_model("unet", path)
    key = "decoders.0.heads.2.weight"

    assert info.variant == "unet"
    assert torch.equal(model.state_dict()[key], trainer.ema.state_dict()[key])


def test_existing_run_folder_rejected(tmp_path: Path) -> None:
    from mbmamba_cli.training.loop import TrainingError, run_training

    run_training(tiny_config(tmp_path, **{"train.steps": 2}))

    with pytest.raises(TrainingError, match="--resume"):
        run_training(tiny_config(tmp_path, **{"train.steps": 2}))


def test_resume_reproduces_uninterrupted(tmp_path: Path) -> None:
    from mbmamba_cli.training.checkpoint import load_checkpoint
    from mbmamba_cli.training.loop import run_training

    overrides = {"train.steps": 6, "data.samples_per_epoch": 6, "train.checkpoint_every": 100}
    whole = run_training(tiny_config(tmp_path, "whole", **overrides))

    def interrupt(trainer: object) -> None:
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = run_training(tiny_config(tmp_path, "parts", **overrides), on_step=interrupt)
    resumed_config = resolve_config(None, [], stopped.run_dir)
    resumed = run_training(resumed_config, resume=stopped.run_dir)

    expected, actual = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    assert stopped.status == "interrupted"
    assert stopped.step == 3
    assert stopped.signal_name == "SIGTERM"
    assert resumed.step == 6
    assert all(torch.equal(expected.model[k], actual.model[k]) for k in expected.model)
    assert all(torch.equal(expected.ema[k], actual.ema[k]) for k in expected.ema)
    for index, entries in expected.optimizer["state"].items():
        assert all(
            torch.equal(value, actual.optimizer["state"][index][key])
            for key, value in entries.items()
        )
    assert expected.meta["data_epoch"] == actual.meta["data_epoch"] == 2
    assert torch.equal(expected.torch_rng[0], actual.torch_rng[0])


def test_loader_workers_same_batches(tmp_path: Path) -> None:
    from mbmamba_cli.training.checkpoint import load_checkpoint
    from mbmamba_cli.training.loop import run_training

    inline = run_training(tiny_config(tmp_path, "inline", **{"data.workers": 0}))
    workers = run_training(tiny_config(tmp_path, "workers", **{"data.workers": 2}))
    expected, actual = load_checkpoint(inline.checkpoint), load_checkpoint(workers.checkpoint)

    assert all(torch.equal(expected.model[k], actual.model[k]) for k in expected.model)


def test_resume_extends_steps(tmp_path: Path) -> None:
    from mbmamba_cli.training.loop import run_training

    first = run_training(tiny_config(tmp_path, **{"train.steps": 2}))
    config = resolve_config(None, ["train.steps=3"], first.run_dir)
    second = run_training(config, resume=first.run_dir)
    rows = (second.run_dir / "metrics.csv").read_text().splitlines()[1:]

    assert second.step == 3
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3]


def test_signal_handler_sets_stop() -> None:
    from mbmamba_cli.training.loop import StopRequest

    stop = StopRequest()
    stop.handle(signal.SIGTERM)

    assert stop.requested
    assert stop.signum == signal.SIGTERM


def test_second_sigint_aborts() -> None:
    from mbmamba_cli.training.loop import StopRequest

    stop = StopRequest()
    stop.handle(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT)


def test_minutes_budget_stops_with_weights(tmp_path: Path) -> None:
    from mbmamba_cli.training.loop import run_training

    result = run_training(tiny_config(tmp_path, **{"train.steps": 1000, "train.minutes": 1e-6}))

    assert result.status == "time_budget"
    assert result.step == 1
    assert result.final_weights.is_file()


def test_cli_sigterm_writes_checkpoint(tmp_path: Path) -> None:
    sharp = write_sharp_images(tmp_path / "sharp")
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "mbmamba_cli", "train", "--config", str(CONFIGS / "tiny-dryrun.json"),
        "--synthetic", str(sharp), "--steps", "100000", "--out", str(out), "--quiet",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) > 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert list((out / "checkpoints").iterdir())
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert "Traceback" not in stderr


def test_cli_bad_override_exit_code(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    arguments = ["train", "--config", str(CONFIGS / "tiny-dryrun.json"), "--set", "optim.lrr=1"]
    result = CliRunner().invoke(cli_app(), arguments)

    assert result.exit_code == 2
    assert "unknown config key optim.lrr" in result.output
    assert "lr, min_lr" in result.output


def test_cli_out_of_memory_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import mbmamba_cli.training.loop

    def run_out_of_memory(config: object, resume: object = None) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mbmamba_cli.training.loop, "run_training", run_out_of_memory)
    arguments = ["train", "--config", str(CONFIGS / "tiny-dryrun.json"), "--out", str(tmp_path)]
    result = CliRunner().invoke(cli_app(), arguments)

    assert result.exit_code == 3
    assert "lower --batch-size" in result.output
