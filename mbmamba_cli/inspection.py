"""Facts about this installation for `mbmamba info`: versions, devices, backends, variants, weights."""

import platform
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from mbmamba_cli import __version__


def collect_info() -> dict[str, Any]:
    """Gather versions, devices, scan backends, the variant table and the shipped weights."""
    import torch

    from mbmamba_cli.models import VARIANTS
    from mbmamba_cli.models.weights import read_manifest, shipped_variants, weights_dir
    from mbmamba_cli.ops.backends import available_backends

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]

    manifest = read_manifest().get("variants", {})
    shipped = set(shipped_variants())
    weights = []
    for name, spec in VARIANTS.items():
        entry = manifest.get(name, {})
        weights.append(
            {
                "variant": spec.display_name,
                "shipped": name in shipped,
                "steps": entry.get("steps"),
                "beats_input": entry.get("beats_input"),
                "metrics": entry.get("metrics", {}),
            }
        )

    return {
        "mbmamba": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "backends": available_backends(),
        "weights_dir": str(weights_dir()),
        "variants": [
            {
                "variant": spec.display_name,
                "sub_decoders": spec.sub_decoders,
                "params": spec.params,
                "macs_256": spec.macs,
                "dtypes": list(spec.dtypes),
            }
            for spec in VARIANTS.values()
        ],
        "weights": weights,
    }


def render_info(report: dict[str, Any]) -> None:
    """Print the report as Rich tables on stdout."""
    console = Console()
    console.print(
        f"mbmamba {report['mbmamba']}, Python {report['python']}, torch {report['torch']} "
        f"(CUDA {report['cuda'] or 'none'}), {report['platform']}"
    )
    console.print(f"devices: {', '.join(report['devices'])}; CPU threads: {report['cpu_threads']}")

    backends = Table(title="Scan backends")
    backends.add_column("backend")
    backends.add_column("status")
    for name, status in report["backends"].items():
        backends.add_row(name, status)
    console.print(backends)

    variants = Table(title="Variants (MACs at 1x3x256x256; FLOPs = 2 x MACs)")
    for column in ("variant", "sub-decoders", "params (M)", "GMACs", "dtypes", "weights", "steps"):
        variants.add_column(column)
    weights = {w["variant"]: w for w in report["weights"]}
    for row in report["variants"]:
        shipped = weights[row["variant"]]
        status = "shipped" if shipped["shipped"] else "not shipped"
        if shipped["shipped"] and shipped["beats_input"] is False:
            status += " (does not beat blurred input yet)"
        variants.add_row(
            row["variant"],
            str(row["sub_decoders"]),
            f"{row['params'] / 1e6:.1f}",
            f"{row['macs_256'] / 1e9:.1f}",
            ", ".join(row["dtypes"]),
            status,
            str(shipped["steps"] if shipped["steps"] is not None else "-"),
        )
    console.print(variants)
    console.print(f"weights folder: {report['weights_dir']}")
