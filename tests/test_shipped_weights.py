"""Regression guard for the shipped weights: each one still scores what its manifest recorded."""

import pytest

from mbmamba_cli.models.weights import load_model, read_manifest, shipped_variants
from mbmamba_cli.training.publish import measure_crop

SHIPPED = shipped_variants()
NOTHING_SHIPPED = [pytest.param("s", marks=pytest.mark.skip(reason="weights/ holds no shipped weights"))]


def test_manifest_lists_every_shipped_variant():
    manifest = read_manifest().get("variants", {})

    for variant in SHIPPED:
        assert variant in manifest, f"weights/ has files for {variant} but the manifest has no entry"


@pytest.mark.parametrize("variant", SHIPPED or NOTHING_SHIPPED)
def test_shipped_variant_matches_manifest_crop(variant, shared_data):
    entry = read_manifest()["variants"][variant]
    model, _ = load_model(variant)

    measured = measure_crop(model, shared_data)

    assert measured["psnr"] == pytest.approx(entry["crop_check"]["psnr"], abs=0.05)
    if entry.get("beats_input"):
        assert measured["psnr"] > measured["input_psnr"]
