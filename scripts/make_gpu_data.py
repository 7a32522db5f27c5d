"""Prepare what `scripts/gpu_train.sh` needs on a GPU machine that has no network and no ../shared.

Everything that travels to such a machine counts against one size limit (64 MiB for the whole
working tree, the shipped weights included), so this script writes a compact copy of the data:

- `gpu_data/sharp/`: crops of the sharp photos (at most `--crop` pixels a side, up to 4 per photo,
  centre crop first), re-encoded as JPEG quality 95. Crops are taken round-robin over the photos
  until `--max-mb` is reached, so every photo has one crop before any photo gets a second;
- `gpu_data/kernels/`: the published PNG blur kernels, except Levin et al.'s 8, because those
  8 kernels made the Levin pairs the run evaluates on;
- `gpu_data/real/`: the real blurred/sharp pairs, copied unchanged (lossless) for evaluation;
- `gpu_wheels/`: wheels of the pure-Python packages the CLI imports (typer, rich, safetensors and
  what they require, at the versions installed here), for Python 3.12 on x86-64 Linux, used only
  when the GPU machine's own copies fail to import.

`--fake DIR` instead writes a few tiny generated images in the same layout, for the CPU dry run.
At the end the script prints the size of everything that would travel.
"""

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
TRAVEL_LIMIT_MB = 64.0
WHEEL_ROOTS = ("typer", "rich", "safetensors")
# Kernel folders left out because they produced the evaluation pairs (see module docstring).
HELD_OUT_KERNELS = ("levin09_png",)


def list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def crop_boxes(height: int, width: int, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """Return up to `count` (top, left, h, w) boxes: the centre crop, then the corners."""
    crop_h, crop_w = min(size, height), min(size, width)
    centre = ((height - crop_h) // 2, (width - crop_w) // 2)
    corners = [(0, 0), (0, width - crop_w), (height - crop_h, 0), (height - crop_h, width - crop_w)]
    boxes = []
    for top, left in [centre, *corners]:
        box = (top, left, crop_h, crop_w)
        overlaps = any(
            abs(top - other_top) < crop_h // 2 and abs(left - other_left) < crop_w // 2
            for other_top, other_left, _, _ in boxes
        )
        if not overlaps:
            boxes.append(box)
    return boxes[:count]


def write_sharp_crops(source: Path, target: Path, size: int, quality: int, max_mb: float) -> dict:
    """Write JPEG crops round-robin over the photos until max_mb; return counts for the manifest."""
    photos = list_images(source)
    if not photos:
        raise SystemExit(
            f"no sharp images under {source}; pass --shared pointing at the data folder"
        )
    target.mkdir(parents=True, exist_ok=True)

    queues = []
    for path in photos:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot decode {path}; remove it or re-save it as PNG")
        queues.append((path, image, crop_boxes(image.shape[0], image.shape[1], size, 4)))

    written_bytes, written = 0, 0
    budget = max_mb * 1024 * 1024
    for round_index in range(4):
        for path, image, boxes in queues:
            if round_index >= len(boxes):
                continue
            top, left, height, width = boxes[round_index]
            ok, encoded = cv2.imencode(
                ".jpg",
                image[top : top + height, left : left + width],
                [cv2.IMWRITE_JPEG_QUALITY, quality],
            )
            if not ok:
                raise SystemExit(f"JPEG encoding failed for a crop of {path}")
            if written_bytes + encoded.size > budget:
                return {
                    "photos": len(photos),
                    "crops": written,
                    "bytes": written_bytes,
                    "stopped_by_budget": True,
                }
            name = f"{path.parent.name}_{path.stem}_{round_index}.jpg"
            (target / name).write_bytes(encoded.tobytes())
            written_bytes += encoded.size
            written += 1
    return {
        "photos": len(photos),
        "crops": written,
        "bytes": written_bytes,
        "stopped_by_budget": False,
    }


def copy_kernels(source: Path, target: Path) -> int:
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in sorted(source.rglob("*.png")):
        if any(part in HELD_OUT_KERNELS for part in path.relative_to(source).parts):
            continue
        shutil.copy2(path, target / f"{path.parent.name}_{path.name}")
        copied += 1
    return copied


def copy_real_pairs(source: Path, target: Path) -> int:
    if target.exists():
        shutil.rmtree(target)
    copied = 0
    for blur in sorted(source.glob("*/blur")):
        for role in ("blur", "sharp"):
            shutil.copytree(blur.parent / role, target / blur.parent.name / role)
        copied += len(list_images(blur))
    return copied


def write_fake(folder: Path) -> None:
    """Write tiny generated sharp images, real-style pairs and one kernel for the dry run."""
    rng = np.random.default_rng(7)
    for sub in ("sharp", "real/demo/blur", "real/demo/sharp", "kernels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(6):
        low = rng.random((6, 6, 3)).astype(np.float32)
        image = cv2.resize(low, (96, 96), interpolation=cv2.INTER_NEAREST)
        pixels = np.clip(image * 230 + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / "sharp" / f"fake{index}.jpg"), pixels)
        if index < 2:
            cv2.imwrite(str(folder / "real/demo/sharp" / f"pair{index}.png"), pixels)
            cv2.imwrite(
                str(folder / "real/demo/blur" / f"pair{index}.png"), cv2.blur(pixels, (7, 1))
            )
    kernel = np.zeros((9, 9), np.uint8)
    kernel[4, 1:8] = 255
    cv2.imwrite(str(folder / "kernels" / "line.png"), kernel)


def wheel_requirements() -> list[str]:
    """Return `name==version` for WHEEL_ROOTS and everything they require, as installed here."""
    pins: dict[str, str] = {}
    pending = list(WHEEL_ROOTS)
    while pending:
        name = pending.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = distribution.metadata["Name"].lower()
        if key in pins:
            continue
        pins[key] = distribution.version
        for requirement in distribution.requires or []:
            if "extra ==" in requirement or 'platform_system == "Windows"' in requirement:
                continue
            pending.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def download_wheels(target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    requirements = wheel_requirements()
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
        "-d", str(target),
        *requirements,
    ]  # fmt: skip
    print(f"downloading {len(requirements)} wheels: {' '.join(requirements)}")
    subprocess.run(command, check=True)


def travel_size_mb(extra: list[Path]) -> float:
    """Size of the tracked and untracked-not-ignored files plus the carried folders, in MiB."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = sum(
        (REPO / name.decode()).stat().st_size
        for name in listed
        if name and (REPO / name.decode()).is_file()
    )
    for folder in extra:
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return total / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder"
    )
    parser.add_argument("--out", type=Path, default=REPO / "gpu_data", help="data folder to write")
    parser.add_argument(
        "--wheels", type=Path, default=REPO / "gpu_wheels", help="wheel folder to write"
    )
    parser.add_argument("--crop", type=int, default=384, help="max crop side in pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops")
    parser.add_argument("--max-mb", type=float, default=16.0, help="MiB budget for the sharp crops")
    parser.add_argument("--no-wheels", action="store_true", help="skip downloading wheels")
    parser.add_argument(
        "--fake", type=Path, metavar="DIR", help="write tiny generated data to DIR and stop"
    )
    args = parser.parse_args()

    if args.fake is not None:
        write_fake(args.fake)
        return

    for needed in ("sharp", "kernels", "real"):
        if not (args.shared / needed).is_dir():
            raise SystemExit(
                f"{args.shared / needed} not found; pass --shared pointing at the data folder"
            )

    if args.out.exists():
        shutil.rmtree(args.out)
    crops = write_sharp_crops(
        args.shared / "sharp", args.out / "sharp", args.crop, args.quality, args.max_mb
    )
    kernels = copy_kernels(args.shared / "kernels", args.out / "kernels")
    pairs = copy_real_pairs(args.shared / "real", args.out / "real")
    manifest = {
        "sharp": crops,
        "kernels": kernels,
        "real_pairs": pairs,
        "crop": args.crop,
        "quality": args.quality,
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(
        f"{args.out}: {crops['crops']} crops of {crops['photos']} photos "
        f"({crops['bytes'] / 1e6:.1f} MB), "
        f"{kernels} kernels, {pairs} real pairs"
    )

    carried = [args.out]
    if not args.no_wheels:
        download_wheels(args.wheels)
        carried.append(args.wheels)

    size = travel_size_mb(carried)
    print(
        f"working tree plus carried folders: {size:.1f} MiB of the {TRAVEL_LIMIT_MB:.0f} MiB limit"
    )
    if size > TRAVEL_LIMIT_MB:
        raise SystemExit(f"{size:.1f} MiB would not travel; lower --max-mb or --crop")


if __name__ == "__main__":
    main()
