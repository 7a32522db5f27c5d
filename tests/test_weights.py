"""Checkpoint loading: wrappers, prefixes, strictness, pickles and the shipped layout."""

import json
import pickle

import pytest
import torch
from conftest import tiny_mbmamba

from mbmamba_cli.models import build_model
from mbmamba_cli.models.weights import (
    ENCODER_FILE,
    WeightsError,
    WeightsInfo,
    WeightsNotFoundError,
    canonicalize_state_dict,
    decoders_file,
    detect_variant,
    fill_identity_blocks,
    identity_blocks,
    load_into,
    load_model,
    load_state_dict_file,
    save_safetensors,
    split_for_shipping,
)


def meta_state(variant: str) -> dict:
    with torch.device("meta"):
        return build_model(variant).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"params_ema": sd},
        lambda sd: {"params": sd, "iter": 5},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
)
def test_canonicalize_unwraps_and_strips(wrap):
    state = tiny_mbmamba().state_dict()

    canonical = canonicalize_state_dict(wrap(state))

    assert canonical.keys() == state.keys()


@pytest.mark.parametrize("variant", ["s", "b", "l", "unet"])
def test_detect_variant_from_keys(variant):
    assert detect_variant(meta_state(variant)) == variant


def test_wrong_variant_names_detected_one():
    with torch.device("meta"):
        model_b = build_model("b")

    with pytest.raises(WeightsError) as error:
        load_into(model_b, meta_state("s"), "s.safetensors")

    message = str(error.value)
    assert "detected variant mbmamba-s" in message
    assert "missing keys" in message
    assert "--variant" in message


def test_safetensors_round_trip(tmp_path):
    source, target = tiny_mbmamba().eval(), tiny_mbmamba().eval()
    path = tmp_path / "tiny.safetensors"

    save_safetensors(source.state_dict(), path, {"variant": "tiny"})
    load_into(target, load_state_dict_file(path), str(path))
    x = torch.rand(1, 3, 20, 20)

    assert torch.equal(source(x), target(x))


def test_plain_pth_loads_with_weights_only(tmp_path):
    state = tiny_mbmamba().state_dict()
    path = tmp_path / "plain.pth"
    torch.save({"params": state}, path)

    loaded = canonicalize_state_dict(load_state_dict_file(path))

    assert loaded.keys() == state.keys()


class _Custom:
    pass


def test_pickled_objects_rejected_with_advice(tmp_path):
    path = tmp_path / "old.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": _Custom()}, handle)

    with pytest.raises(WeightsError, match="cannot be loaded safely"):
        load_state_dict_file(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors"):
        load_state_dict_file(tmp_path / "nope.safetensors")


def test_missing_shipped_variant_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("MBMAMBA_WEIGHTS_DIR", str(tmp_path))

    with pytest.raises(WeightsNotFoundError, match="mbmamba train"):
        load_model("l")


def test_shipped_layout_assembles_half_precision(tmp_path, monkeypatch):
    model = build_model("s").eval()
    encoder, decoders, omitted = split_for_shipping({k: v.half() for k, v in model.state_dict().items()})
    save_safetensors(encoder, tmp_path / ENCODER_FILE, {})
    save_safetensors(decoders, tmp_path / decoders_file("s"), {})
    manifest = {"variants": {"s": {"steps": 7, "beats_input": False, "metrics": {}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MBMAMBA_WEIGHTS_DIR", str(tmp_path))

    loaded, info = load_model("s")

    first = next(iter(model.state_dict()))
    assert torch.equal(loaded.state_dict()[first], model.state_dict()[first].half().float())
    assert loaded.state_dict()[first].dtype == torch.float32
    assert len(omitted) == 22  # every untrained encoder block is an identity and is left out
    assert info.beats_input is False
    assert "7 training steps" in info.summary
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-2)


def test_quality_warning_quotes_measurements():
    manifest = {"metrics": {"levin09": {"psnr": 24.1, "input_psnr": 24.5}}}
    info = WeightsInfo("s", "shipped", manifest, beats_input=False)

    warning = info.quality_warning()

    assert "PSNR 24.10 dB vs input 24.50 dB" in warning


def test_no_warning_when_weights_beat_input():
    info = WeightsInfo("s", "shipped", {"metrics": {}}, beats_input=True)

    assert info.quality_warning() is None


def test_identity_blocks_need_zero_scales():
    state = tiny_mbmamba().state_dict()
    state["encoder.levels.0.0.ffn.scale"] = torch.full_like(state["encoder.levels.0.0.ffn.scale"], 0.1)

    omitted = identity_blocks(state)

    assert "encoder.levels.0.0." not in omitted
    assert "encoder.levels.1.0." in omitted


def test_fill_identity_blocks_leaves_active_blocks_missing():
    model = tiny_mbmamba()
    state = model.state_dict()
    state["encoder.levels.0.0.scale"] = torch.ones_like(state["encoder.levels.0.0.scale"])
    del state["encoder.levels.0.0.expand.weight"]
    del state["encoder.levels.1.0.expand.weight"]

    filled = fill_identity_blocks(state, model)

    assert "encoder.levels.0.0.expand.weight" not in filled
    assert "encoder.levels.1.0.expand.weight" in filled


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"hello, these are notes\n", "not a PyTorch checkpoint"),
        (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
        (b"", "is empty"),
    ],
)
def test_junk_weights_file_gives_clear_error(tmp_path, content, expected):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)

    with pytest.raises(WeightsError, match=expected):
        load_state_dict_file(path)


def test_weights_folder_is_rejected(tmp_path):
    with pytest.raises(WeightsError, match="is a folder"):
        load_state_dict_file(tmp_path)


def test_training_checkpoint_uses_ema_weights():
    model_state = tiny_mbmamba().state_dict()
    ema_state = {key: value + 1 for key, value in model_state.items()}
    checkpoint = {f"model.{k}": v for k, v in model_state.items()}
    checkpoint.update({f"ema.{k}": v for k, v in ema_state.items()})
    checkpoint["optim.state.0.exp_avg"] = torch.zeros(3)

    canonical = canonicalize_state_dict(checkpoint)

    assert canonical.keys() == model_state.keys()
    first = next(iter(model_state))
    assert torch.equal(canonical[first], ema_state[first])


def test_custom_architecture_file_is_rejected(tmp_path):
    path = tmp_path / "final.safetensors"
    save_safetensors(tiny_mbmamba().state_dict(), path, {"variant": "custom", "display_name": "width 16"})

    with pytest.raises(WeightsError, match="custom architecture"):
        load_model("s", path)


def test_missing_unet_weights_name_stage_one_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MBMAMBA_WEIGHTS_DIR", str(tmp_path))

    with pytest.raises(WeightsNotFoundError, match="stage1-unet.json"):
        load_model("unet")
