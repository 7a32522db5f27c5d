"""Training losses for MBMamba: Charbonnier, edge, FFT and Ising terms, summed over output scales.

The objective for one output image `y` of size (h_k, w_k) and the target `t` resized to that size:

    charbonnier(y, t) + edge_weight * edge(y, t) + fft_weight * fft(y, t) + lambda_ising * ising(y)

`MultiScaleLoss` sums this over every output of the network (every sub-decoder, every scale).

Glossary of shape symbols: b batch, c channels (3 for RGB), h height, w width.
Every loss is computed in float32, also when the caller runs under autocast.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Discrete Laplacian, 4-connected. It sums to zero, so a constant image has a Laplacian of 0.
_LAPLACIAN_3X3 = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))

# Neighbour offsets (dy, dx) that cover each undirected pixel pair once. The Ising loss counts
# every pair twice (once from each end), so these halves are enough to compute it.
_HALF_OFFSETS = {
    4: ((0, 1), (1, 0)),
    8: ((0, 1), (1, 0), (1, 1), (1, -1)),
}


def _check_same_shape(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: prediction shape {tuple(pred.shape)} differs from target shape "
            f"{tuple(target.shape)}. Resize the target to the prediction size first"
        )


def _check_image_batch(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a (b, c, h, w) tensor, got shape {tuple(x.shape)}")


def charbonnier_loss(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """Compute mean(sqrt((pred - target)^2 + eps^2)), a smooth L1 loss.

    pred, target: tensors of the same shape, usually (b, c, h, w). Returns a scalar float32 tensor.
    The value for pred == target is eps, not 0.
    """
    _check_same_shape(pred, target, "charbonnier_loss")

    diff = pred.float() - target.float()
    return torch.sqrt(diff * diff + eps * eps).mean()


def laplacian(x: Tensor) -> Tensor:
    """Apply the 3x3 discrete Laplacian to each channel, with replicate padding.

    x: (b, c, h, w). Returns (b, c, h, w) float32.
    """
    _check_image_batch(x, "laplacian")

    x = x.float()
    channels = x.shape[1]
    kernel = torch.tensor(_LAPLACIAN_3X3, dtype=torch.float32, device=x.device)
    kernel = kernel.expand(channels, 1, 3, 3)

    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels)


def edge_loss(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """Compute the Charbonnier loss between the Laplacians of pred and target.

    pred, target: (b, c, h, w). Returns a scalar float32 tensor.
    """
    _check_same_shape(pred, target, "edge_loss")

    return charbonnier_loss(laplacian(pred), laplacian(target), eps)


def fft_loss(pred: Tensor, target: Tensor, norm: str = "backward") -> Tensor:
    """Compute the L1 distance between the 2-D spectra of pred and target.

    pred, target: (b, c, h, w). The real and imaginary parts of rfft2(pred) - rfft2(target),
    shape (b, c, h, w // 2 + 1), are stacked and averaged in absolute value. Returns a scalar
    float32 tensor.

    norm is passed to torch.fft.rfft2. With the default "backward" (unnormalised) the value
    grows with the image size: a uniform offset of delta on an h x w image puts delta * h * w in
    the zero-frequency coefficient. The default FFT weight 0.1 of `MultiScaleLoss` was tuned in
    published deblurring recipes with this unnormalised transform. "ortho" makes the term
    independent of the image size.
    """
    _check_same_shape(pred, target, "fft_loss")

    spectrum_diff = torch.fft.rfft2(pred.float() - target.float(), norm=norm)
    return torch.view_as_real(spectrum_diff).abs().mean()


def ising_loss(x: Tensor, neighbours: int = 4) -> Tensor:
    """Compute the Ising energy of an image: the mean absolute difference to the neighbours.

    x: (b, c, h, w). For each pixel p and channel, sum |x_p - x_q| over the neighbours q of p
    that lie inside the image (4-connected or 8-connected). Border pixels have fewer neighbours
    and there is no padding, so a constant image has a loss of exactly 0.

    Normalisation: the sum over all pixels and channels is divided by b * c * h * w, which makes
    the loss independent of the image size. Each neighbouring pair is counted from both of its
    pixels, so the value is 2 * sum over pairs |x_p - x_q| / (b * c * h * w).
    Returns a scalar float32 tensor.
    """
    if neighbours not in _HALF_OFFSETS:
        raise ValueError(f"ising_loss: neighbours must be 4 or 8, got {neighbours}")
    _check_image_batch(x, "ising_loss")

    x = x.float()
    height, width = x.shape[-2:]
    total = x.new_zeros(())

    for dy, dx in _HALF_OFFSETS[neighbours]:
        if dy >= height or abs(dx) >= width:
            continue

        # Pair each pixel (y, x) with (y + dy, x + dx), keeping only pairs inside the image.
        first = x[..., : height - dy, max(0, -dx) : width - max(0, dx)]
        second = x[..., dy:, max(0, dx) : width - max(0, -dx)]
        total = total + (first - second).abs().sum()

    return 2.0 * total / x.numel()


def _resize_target(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize target (b, c, h, w) down to `size` by area interpolation. A larger size raises."""
    height, width = target.shape[-2:]
    if (height, width) == size:
        return target
    if size[0] > height or size[1] > width:
        raise ValueError(
            f"MultiScaleLoss: output size {size} is larger than the target size "
            f"{(height, width)}. Every output must be the target size or smaller"
        )
    return F.interpolate(target, size=size, mode="area")


class MultiScaleLoss(nn.Module):
    """Sum of Charbonnier, edge, FFT and Ising terms over every output image of the network.

    Call as `loss_fn(outputs, target)`, where outputs is a list of (b, 3, h_k, w_k) tensors (a
    single tensor is accepted too) and target is (b, 3, h, w) with h_k <= h and w_k <= w. Each
    output is compared with the target resized to its size by area interpolation. Returns
    `(total, parts)`: total is a scalar float32 tensor to back-propagate, and parts maps
    "charbonnier", "edge", "fft", "ising" (unweighted, summed over outputs) and "total" to
    Python floats for logging.
    """

    def __init__(
        self,
        charbonnier_eps: float = 1e-3,
        edge_weight: float = 0.05,
        fft_weight: float = 0.1,
        lambda_ising: float = 0.001,
        ising_neighbours: int = 4,
        fft_norm: str = "backward",
    ) -> None:
        super().__init__()
        if ising_neighbours not in _HALF_OFFSETS:
            raise ValueError(f"ising_neighbours must be 4 or 8, got {ising_neighbours}")
        for name, value in (
            ("charbonnier_eps", charbonnier_eps),
            ("edge_weight", edge_weight),
            ("fft_weight", fft_weight),
            ("lambda_ising", lambda_ising),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

        self.charbonnier_eps = charbonnier_eps
        self.edge_weight = edge_weight
        self.fft_weight = fft_weight
        self.lambda_ising = lambda_ising
        self.ising_neighbours = ising_neighbours
        self.fft_norm = fft_norm

    def extra_repr(self) -> str:
        return (
            f"charbonnier_eps={self.charbonnier_eps}, edge_weight={self.edge_weight}, "
            f"fft_weight={self.fft_weight}, lambda_ising={self.lambda_ising}, "
            f"ising_neighbours={self.ising_neighbours}, fft_norm={self.fft_norm!r}"
        )

    def forward(self, outputs: list[Tensor] | Tensor, target: Tensor) -> tuple[Tensor, dict]:
        if isinstance(outputs, Tensor):
            outputs = [outputs]
        if len(outputs) == 0:
            raise ValueError("MultiScaleLoss: outputs is empty. Pass at least one output image")
        _check_image_batch(target, "MultiScaleLoss target")

        # The spectrum and the small differences near convergence need float32, so autocast
        # is switched off here and every input is cast up.
        with torch.autocast(device_type=target.device.type, enabled=False):
            target = target.float()
            terms = {name: target.new_zeros(()) for name in ("charbonnier", "edge", "fft", "ising")}

            for index, output in enumerate(outputs):
                _check_image_batch(output, f"MultiScaleLoss output {index}")
                if output.shape[:2] != target.shape[:2]:
                    raise ValueError(
                        f"MultiScaleLoss: output {index} has shape {tuple(output.shape)} but "
                        f"the target has shape {tuple(target.shape)}. Batch size and channels "
                        "must match"
                    )

                output = output.float()
                scaled_target = _resize_target(target, tuple(output.shape[-2:]))

                terms["charbonnier"] = terms["charbonnier"] + charbonnier_loss(
                    output, scaled_target, self.charbonnier_eps
                )
                terms["edge"] = terms["edge"] + edge_loss(
                    output, scaled_target, self.charbonnier_eps
                )
                terms["fft"] = terms["fft"] + fft_loss(output, scaled_target, self.fft_norm)
                terms["ising"] = terms["ising"] + ising_loss(output, self.ising_neighbours)

            total = (
                terms["charbonnier"]
                + self.edge_weight * terms["edge"]
                + self.fft_weight * terms["fft"]
                + self.lambda_ising * terms["ising"]
            )

        # One device-to-host copy for all the logged values instead of one per term.
        names = [*terms, "total"]
        values = torch.stack([*terms.values(), total]).detach().cpu().tolist()
        parts = dict(zip(names, values, strict=True))
        return total, parts
