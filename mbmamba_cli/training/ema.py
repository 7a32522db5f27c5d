"""Exponential moving average (EMA) of a model's weights, used for validation and the final weights.

After every optimiser step each floating-point tensor of the EMA copy moves towards the trained
one: ema = ema + (1 - decay_t) * (param - ema), with decay_t = min(decay, (1 + t) / (10 + t)) at
update t, so the average follows the fast early changes instead of holding on to the random
initialisation. Integer buffers are copied. The EMA copy has the same `state_dict()` keys as the
model.
"""

import copy

import torch
from torch import nn


class ModelEma:
    """An EMA copy of a model, kept in float32 on the model's device and always in eval mode."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        """Return the decay the next update uses (warmed up over the first updates)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA weights towards `model`'s (the unwrapped model, not the DDP wrapper)."""
        weight = 1.0 - self.current_decay()
        averaged, trained = [], []
        for (name, ema_tensor), tensor in zip(
            self.module.state_dict().items(), model.state_dict().values(), strict=True
        ):
            if ema_tensor.shape != tensor.shape:
                raise ValueError(
                    f"EMA tensor {name} has shape {tuple(ema_tensor.shape)}, "
                    f"model {tuple(tensor.shape)}"
                )
            if ema_tensor.is_floating_point():
                averaged.append(ema_tensor)
                trained.append(tensor.to(ema_tensor.dtype))
            else:
                ema_tensor.copy_(tensor)

        if averaged:
            torch._foreach_lerp_(averaged, trained, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the EMA weights under the model's own keys."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the EMA weights and the update count (which sets the warm-up decay)."""
        self.module.load_state_dict(state, strict=True)
        self.updates = updates
