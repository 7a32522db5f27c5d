"""Choice of the kernel backend for the Mamba block: "torch" everywhere, "cuda" where it works.

"cuda" needs a CUDA device and two optional packages, `mamba_ssm` (selective scan) and
`causal_conv1d` (depthwise causal convolution), installed with `pip install -e '.[cuda]'`.
The packages are imported only when the device is CUDA, because importing them on a machine
without CUDA fails or aborts. Import results are cached for the life of the process.
"""

import functools
import importlib

import torch

from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

BACKEND_CHOICES = ("auto", "torch", "cuda")
AVAILABLE = "available"
CUDA_INSTALL_HINT = "pip install -e '.[cuda]'"

# Modules that the "cuda" backend imports, with the pip package that provides each.
_CUDA_MODULES = {
    "mamba_ssm.ops.selective_scan_interface": "mamba-ssm",
    "causal_conv1d": "causal-conv1d",
}


def available_backends() -> dict[str, str]:
    """Return each backend name mapped to "available" or the reason it is not.

    Without a CUDA device, "cuda" reports that and its packages are not imported.
    """
    return {"torch": AVAILABLE, "cuda": _cuda_status()}


def resolve_backend(requested: str, device: str | torch.device) -> tuple[str, str]:
    """Pick the backend for `requested` ("auto", "torch" or "cuda") on `device`.

    "auto" picks "cuda" when the device is CUDA and both packages import, else "torch".

    Returns:
        (backend name, reason for the choice); the choice is logged in one line.

    Raises:
        ValueError: `requested` is not a known name, or it is "cuda" and that backend cannot
            run on `device`. The message names the reason and the fix.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(
            f"unknown backend {requested!r}: expected one of {', '.join(BACKEND_CHOICES)}"
        )
    device = torch.device(device)

    if requested == "torch":
        name, reason = "torch", "requested"
    elif requested == "cuda":
        if device.type != "cuda":
            raise ValueError(
                f"backend 'cuda' needs a CUDA device, but the device is {device.type}: "
                "run on a CUDA device or use backend 'torch' or 'auto'"
            )
        status = _cuda_status()
        if status != AVAILABLE:
            raise ValueError(
                f"backend 'cuda' is not available: {status}; "
                "fix that or use backend 'torch' or 'auto'"
            )
        name, reason = "cuda", "requested"
    elif device.type != "cuda":
        name, reason = "torch", f"auto: device is {device.type}"
    else:
        status = _cuda_status()
        if status == AVAILABLE:
            name, reason = "cuda", "auto: CUDA device and mamba_ssm and causal_conv1d import"
        else:
            name, reason = "torch", f"auto: {status}"

    logger.debug("kernel backend: %s (%s)", name, reason)
    return name, reason


def _cuda_status() -> str:
    """Return "available" or why the "cuda" backend cannot run in this process."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    for module, package in _CUDA_MODULES.items():
        problem = _import_problem(module, package)
        if problem is not None:
            return problem
    return AVAILABLE


@functools.cache
def _import_problem(module: str, package: str) -> str | None:
    """Import `module` once; return None on success, else the reason with the fix."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        root = module.partition(".")[0]
        if error.name is not None and error.name.partition(".")[0] == root:
            return f"{root} not installed: {CUDA_INSTALL_HINT}"
        return (
            f"{root} failed to import ({error}): reinstall {package} against this torch "
            f"with {CUDA_INSTALL_HINT}"
        )
    # Compiled extensions fail in several ways, such as ImportError for a missing symbol, OSError
    # for a missing CUDA library or RuntimeError from a version check. Each one only means that
    # the backend is unavailable, and the returned text gives the reason.
    except Exception as error:
        root = module.partition(".")[0]
        return (
            f"{root} failed to import ({type(error).__name__}: {error}): reinstall {package} "
            f"against this torch with {CUDA_INSTALL_HINT}"
        )
    return None
