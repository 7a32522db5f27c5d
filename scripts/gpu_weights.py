"""Split trained weights into files small enough to come back from a GPU machine; join them again.

`export FINAL OUT_DIR`: keep the tensors a run trained (the sub-decoders when the encoder was
frozen, else all) from a `final.safetensors`, in float32, and write them as
`<name>-0000k-of-0000n.safetensors` files of at most `--max-mb` MiB each, every one carrying the
source's metadata. `merge OUT_DIR TARGET`: join such files into one safetensors file, checking that
every part is present.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

PART_PATTERN = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def trained_tensors(path: Path) -> tuple[dict, dict[str, str], str]:
    """Return (tensors, metadata, name) of what the run trained."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    frozen = json.loads(metadata.get("config", "{}")).get("train", {}).get("freeze_encoder", False)
    display = metadata.get("display_name", "model").replace(" ", "-")
    if frozen:
        return (
            {k: v for k, v in tensors.items() if not k.startswith("encoder.")},
            metadata,
            f"{display}.decoders",
        )
    return tensors, metadata, display


def export(final: Path, out_dir: Path, max_mb: float) -> list[Path]:
    tensors, metadata, name = trained_tensors(final)
    limit = max_mb * 1024 * 1024
    parts: list[dict] = [{}]
    sizes = [0]
    for key in sorted(tensors):
        tensor = tensors[key].float().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > limit:
            raise SystemExit(
                f"tensor {key} alone is {nbytes / 2**20:.1f} MiB, over --max-mb {max_mb}"
            )
        if sizes[-1] + nbytes > limit:
            parts.append({})
            sizes.append(0)
        parts[-1][key] = tensor
        sizes[-1] += nbytes

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, part in enumerate(parts, start=1):
        path = out_dir / f"{name}-{index:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(path), metadata={**metadata, "part": f"{index}/{len(parts)}"})
        written.append(path)
    return written


def merge(out_dir: Path, target: Path) -> None:
    found = sorted(p for p in out_dir.iterdir() if PART_PATTERN.match(p.name))
    if not found:
        raise SystemExit(f"no <name>-0000k-of-0000n.safetensors files in {out_dir}")
    count = int(PART_PATTERN.match(found[0].name)["count"])
    if len(found) != count:
        raise SystemExit(f"{out_dir} has {len(found)} of {count} parts; copy the missing ones back")

    tensors, metadata = {}, {}
    for path in found:
        tensors.update(load_file(str(path)))
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
    metadata.pop("part", None)
    save_file(tensors, str(target), metadata=metadata)
    print(f"{target}: {len(tensors)} tensors from {count} parts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export", help="split a final.safetensors into small parts")
    exporting.add_argument("final", type=Path)
    exporting.add_argument("out_dir", type=Path)
    exporting.add_argument("--max-mb", type=float, default=15.0)
    merging = commands.add_parser("merge", help="join the parts into one file")
    merging.add_argument("out_dir", type=Path)
    merging.add_argument("target", type=Path)
    args = parser.parse_args()

    if args.command == "export":
        for path in export(args.final, args.out_dir, args.max_mb):
            print(path)
    else:
        merge(args.out_dir, args.target)


if __name__ == "__main__":
    sys.exit(main())
