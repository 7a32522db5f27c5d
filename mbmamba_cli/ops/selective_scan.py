"""Selective scan of Mamba v1 (the S6 recurrence): a chunked PyTorch backend and the CUDA kernel.

Glossary of shape symbols: b batch, d channels (the Mamba block's d_inner), l sequence length
(tokens), n state size (d_state), T chunk length, K number of chunks (ceil(l / T)), Kg chunks
per group.

For each batch element and channel, with delta_t = softplus(delta_t + delta_bias) if delta_softplus:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h_t: (n,), h_0 = 0
    y_t = C_t . h_t + D * u_t,   then   y_t = y_t * silu(z_t)   when z is given

Backends:
- "torch" (`chunked_selective_scan`): a chunked two-pass scan in plain PyTorch, for any device.
  The sequence is cut into K chunks of T steps. Pass 1 runs the recurrence inside every chunk
  from a zero state, all chunks at once (a loop of T steps over (K, b, d, n) tensors), and keeps
  each chunk's end state. A loop of K small steps carries the states across chunk boundaries,
  and pass 2 reruns every chunk from its true start state. The result is exact, not an
  approximation: it equals the sequential loop up to float32 rounding.
  Consecutive chunks run in groups whose (Kg, T, b, d, n) buffers have about `_GROUP_ELEMENTS`
  elements, so no (b, d, l, n) tensor is ever built. Beyond a few (b, d, l) copies of the inputs
  in the chunk layout (K, T, b, d), the forward pass needs two such buffers and the backward
  pass three. The backward pass (`_ChunkedSelectiveScan`) saves only the (K, b, d, n) chunk
  start states besides the inputs. It recomputes the states inside each chunk and runs the
  adjoint recurrence backwards with the same two passes.
  The chunk layout is token-major, so inputs that are views of (b, l, d) tensors (as the
  projections of a Mamba block produce them) convert without a transpose, and the output is
  returned as such a view: `y.transpose(1, 2)` is contiguous.
- "cuda": `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` (mamba-ssm 2.x), imported
  when first called because `mamba_ssm` loads a compiled CUDA extension at import.

Dtype contract: the output has the dtype of `u`. The "torch" backend runs in float32 with
autocast disabled whatever the input dtypes, so A, D and the states stay float32 under bfloat16
autocast. Float64 inputs are computed in float64, which only the gradient checks use.

How it was checked: tests/test_ops_scan.py compares the forward pass with
`selective_scan_reference`, the sequential loop, to a relative error below 1e-5. It covers
lengths that are not multiples of the chunk length, one and many chunk groups, and every
combination of D, z, delta_bias and softplus. Every gradient passes torch.autograd.gradcheck in
float64, and float32 gradients match autograd through the reference.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SCAN_BACKENDS = ("torch", "cuda")

# Elements of one (Kg, T, b, d, n) buffer of a chunk group. With three buffers in the backward
# pass, 2**20 float32 elements keep a group within 12 MiB, which fits a typical L3 cache. On a
# shared 2-core AMD EPYC (torch 2.13), forward timings changed little from 2**19 to 2**21.
_GROUP_ELEMENTS = 1 << 20


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "torch",
) -> Tensor:
    """Run the selective scan with the named backend ("torch" or "cuda").

    Args:
        u: (b, d, l) input.
        delta: (b, d, l) step sizes, before `delta_bias` and softplus.
        A: (d, n) real state matrix diagonal, negative for a stable scan.
        B: (b, n, l) input-dependent input matrix.
        C: (b, n, l) input-dependent output matrix.
        D: (d,) skip connection, or None.
        z: (b, d, l) gate, or None.
        delta_bias: (d,) added to `delta`, or None.
        delta_softplus: apply softplus to `delta` after the bias.
        backend: "torch" (any device) or "cuda" (mamba_ssm kernel, CUDA tensors only).

    Returns:
        (b, d, l) output in the dtype of `u`. The "torch" backend returns a token-major view
        (strides (d, 1, b * d)); make it contiguous before code that needs (b, d, l) order.
    """
    if backend == "torch":
        return chunked_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    if backend == "cuda":
        # Imported here: mamba_ssm loads its CUDA extension at import and fails without one.
        # NOTE: the tests check this call with a stand-in module only; no CUDA run checked it.
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    raise ValueError(
        f"unknown scan backend {backend!r}: expected one of {', '.join(SCAN_BACKENDS)}"
    )


def chunked_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_length: int | None = None,
) -> Tensor:
    """Run the "torch" backend: the chunked two-pass scan with its own backward pass.

    Arguments and result are as in `selective_scan`. `chunk_length` (T) overrides the length
    picked by `choose_chunk_length`; any T >= 1 gives the same result up to rounding.
    """
    _validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, channels, length = u.shape
    if chunk_length is None:
        chunk_length = choose_chunk_length(length, batch * channels * A.shape[1])
    elif chunk_length < 1:
        raise ValueError(f"chunk_length must be >= 1, got {chunk_length}")
    chunk_length = min(chunk_length, length)

    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        inputs = [
            None if tensor is None else tensor.to(compute_dtype)
            for tensor in (u, delta, A, B, C, D, z, delta_bias)
        ]
        needs_grad = torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad for tensor in inputs
        )
        if needs_grad:
            out = _ChunkedSelectiveScan.apply(*inputs, delta_softplus, chunk_length)
        else:
            out, _ = _scan_forward(*inputs, delta_softplus, chunk_length, keep_states=False)
    return out.to(u.dtype)


def choose_chunk_length(length: int, state_elements: int) -> int:
    """Return the chunk length T for `length` tokens whose state has `state_elements` = b * d * n.

    Python issues about 2 * T small tensor operations per chunk group and K = l / T for the
    carry. With G groups that is 2 * G * T + l / T operations, and G = l * b * d * n /
    `_GROUP_ELEMENTS` once the sequence needs more than one group, so the count is smallest
    at T = sqrt(min(l, _GROUP_ELEMENTS / (b * d * n)) / 2), rounded here to a power of two.
    """
    tokens_per_group = min(length, max(1, _GROUP_ELEMENTS // state_elements))
    chunk_length = 1 << max(0, round(math.log2(math.sqrt(tokens_per_group / 2))))
    return min(chunk_length, length)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Run the scan as a plain loop over the l tokens; the tests' reference, too slow for use.

    Arguments and result are as in `selective_scan`. Computes in float32 (float64 for float64
    `u`) and differentiates through ordinary autograd.
    """
    _validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf = u.to(compute_dtype)
        Af = A.to(compute_dtype)
        Bf = B.to(compute_dtype)
        Cf = C.to(compute_dtype)
        step = delta.to(compute_dtype)
        if delta_bias is not None:
            step = step + delta_bias.to(compute_dtype)[:, None]
        if delta_softplus:
            step = F.softplus(step)

        batch, channels, length = uf.shape
        state = uf.new_zeros(batch, channels, Af.shape[1])
        outputs = []
        for t in range(length):
            decay = torch.exp(step[:, :, t, None] * Af)
            drive = (step[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, None, :, t]
            state = decay * state + drive
            outputs.append((state * Cf[:, None, :, t]).sum(-1))
        y = torch.stack(outputs, dim=-1)

        if D is not None:
            y = y + uf * D.to(compute_dtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(compute_dtype))
    return y.to(u.dtype)


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Autograd wrapper that saves the chunk start states and recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_length):
        out, chunk_starts = _scan_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_length, keep_states=True
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_starts)
        ctx.delta_softplus = delta_softplus
        ctx.chunk_length = chunk_length
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, chunk_starts = ctx.saved_tensors
        with torch.autocast(device_type=u.device.type, enabled=False):
            grads = _scan_backward(
                grad_out.to(u.dtype),
                u,
                delta,
                A,
                B,
                C,
                D,
                z,
                delta_bias,
                ctx.delta_softplus,
                ctx.chunk_length,
                chunk_starts,
            )
        return (*grads, None, None)


def _scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    chunk_length: int,
    keep_states: bool,
) -> tuple[Tensor, Tensor | None]:
    """Compute the scan output (b, d, l) and, if `keep_states`, the (K, b, d, n) chunk start states.

    All inputs must already have the compute dtype. Chunk groups run in order, each starting
    from the state that the previous group ended with. Every element-wise step runs in the
    chunk layout, where all operands share one memory order.
    """
    batch, channels, length = u.shape
    state_size = A.shape[1]
    plan = _ChunkPlan.create(batch, channels, length, state_size, chunk_length)
    workspace = u.new_empty(2, plan.group_elements)

    u_chunks = plan.to_chunks(u)  # (K, T, b, d)
    step = plan.step_sizes(plan.to_chunks(delta), delta_bias, delta_softplus)  # (K, T, b, d)
    step_u = step * u_chunks
    B_chunks = plan.to_chunks(B)  # (K, T, b, n)
    C_chunks = plan.to_chunks(C)  # (K, T, b, n)
    y_chunks = torch.empty_like(step)  # (K, T, b, d)
    chunk_starts = u.new_empty(plan.num_chunks, batch, channels, state_size) if keep_states else None
    state = u.new_zeros(batch, channels, state_size)

    for group in plan.groups():
        decay, states = _discretize(step[group], step_u[group], A, B_chunks[group], workspace)
        chunk_decay = _chunk_decay(step[group], A)  # (Kg, b, d, n)
        starts = _chunk_start_states(decay, states, chunk_decay, state)  # (Kg, b, d, n)
        _scan_within_chunks(decay, states, starts)
        state = states[-1, -1].clone()

        _contract_states(states, C_chunks[group], out=y_chunks[group])
        if chunk_starts is not None:
            chunk_starts[group] = starts

    if D is not None:
        y_chunks.addcmul_(u_chunks, D)
    if z is not None:
        y_chunks.mul_(F.silu(plan.to_chunks(z)))
    return plan.from_chunks(y_chunks), chunk_starts


def _scan_backward(
    grad_out: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    chunk_length: int,
    chunk_starts: Tensor,
) -> tuple[Tensor | None, ...]:
    """Return the gradients for (u, delta, A, B, C, D, z, delta_bias), None for absent inputs.

    With a_t = exp(delta_t * A), the adjoint of the states g_t = dL/dh_t follows the reverse
    recurrence g_t = dy_t * C_t + a_{t+1} * g_{t+1}, run with the same two passes as the
    forward scan, chunk groups from last to first. Then dL/da_t = g_t * h_{t-1} and
    dL/d(delta_t * B_t * u_t) = g_t.
    """
    batch, channels, length = u.shape
    state_size = A.shape[1]
    plan = _ChunkPlan.create(batch, channels, length, state_size, chunk_length)
    workspace = u.new_empty(3, plan.group_elements)

    # Inputs in the chunk layout; the padding of every tensor is zero, except `pre_softplus`.
    u_chunks = plan.to_chunks(u)  # (K, T, b, d)
    pre_softplus = plan.to_chunks(delta)
    if delta_bias is not None:
        pre_softplus += delta_bias
    step = plan.step_sizes(pre_softplus, None, delta_softplus)
    step_u = step * u_chunks
    B_chunks = plan.to_chunks(B)  # (K, T, b, n)
    C_chunks = plan.to_chunks(C)
    grad_out_chunks = plan.to_chunks(grad_out)  # (K, T, b, d)
    if z is not None:
        z_chunks = plan.to_chunks(z)
        z_sigmoid = torch.sigmoid(z_chunks)
        grad_y = grad_out_chunks * z_chunks * z_sigmoid  # dL/dy before the gate
        y_scan = torch.empty_like(step)  # C . h, for dL/dz
    else:
        grad_y = grad_out_chunks
        y_scan = None

    grad_step_u = torch.empty_like(step)  # dL/d(delta_t * u_t) = g_t . B_t
    grad_step = torch.empty_like(step)  # dL/ddelta_t through a_t only, then in total
    grad_A = torch.zeros_like(A)
    grad_B = torch.empty_like(B_chunks)
    grad_C = torch.empty_like(C_chunks)
    adjoint_in = u.new_zeros(batch, channels, state_size)

    for group in plan.groups(reverse=True):
        # Recompute the states h_t from the saved chunk start states.
        decay, states = _discretize(step[group], step_u[group], A, B_chunks[group], workspace)
        starts = chunk_starts[group]  # (Kg, b, d, n)
        _scan_within_chunks(decay, states, starts)
        if y_scan is not None:
            _contract_states(states, C_chunks[group], out=y_scan[group])
        _contract_channels(states, grad_y[group], out=grad_C[group])

        # Adjoint states g_t (Kg, T, b, d, n), built in the third workspace buffer.
        adjoint = workspace[2, : states.numel()].view(states.shape)
        torch.mul(grad_y[group, :, :, :, None], C_chunks[group, :, :, None, :], out=adjoint)
        chunk_decay = _chunk_decay(step[group], A)
        _adjoint_within_chunks(decay, adjoint, chunk_decay, adjoint_in)
        adjoint_in = decay[0, 0] * adjoint[0, 0]

        # dL/da_t * a_t = g_t * h_{t-1} * a_t, written over `decay`.
        decay[:, 1:].mul_(states[:, :-1])
        decay[:, 0].mul_(starts)
        decay.mul_(adjoint)
        grad_decay = decay

        # Through delta_t * B_t * u_t: g_t . B_t and dL/dB_t = sum over d of g_t * delta_t * u_t.
        _contract_states(adjoint, B_chunks[group], out=grad_step_u[group])
        _contract_channels(adjoint, step_u[group], out=grad_B[group])

        # Through a_t = exp(delta_t * A); `states` is free to hold the products now.
        product = states
        torch.mul(grad_decay, A, out=product)
        torch.sum(product, dim=-1, out=grad_step[group])
        torch.mul(grad_decay, step[group, :, :, :, None], out=product)
        grad_A += product.sum((0, 1, 2))

    grad_u = grad_step_u * step
    grad_step.addcmul_(grad_step_u, u_chunks)
    if delta_softplus:
        grad_step.mul_(torch.sigmoid(pre_softplus))
    grad_delta_bias = None if delta_bias is None else grad_step.sum((0, 1, 2))

    grad_D = None
    if D is not None:
        grad_u.addcmul_(grad_y, D)
        grad_D = (grad_y * u_chunks).sum((0, 1, 2))

    grad_z = None
    if z is not None:
        if D is not None:
            y_scan.addcmul_(u_chunks, D)
        silu_slope = z_sigmoid * (1 + z_chunks * (1 - z_sigmoid))
        grad_z = plan.from_chunks(grad_out_chunks.mul_(y_scan).mul_(silu_slope))

    return (
        plan.from_chunks(grad_u),
        plan.from_chunks(grad_step),
        grad_A,
        plan.from_chunks(grad_B),
        plan.from_chunks(grad_C),
        grad_D,
        grad_z,
        grad_delta_bias,
    )


class _ChunkPlan:
    """Chunking of one scan call: T, K, and the groups of consecutive chunks run together.

    Tensors in chunk layout are (K, T, b, c): chunk, step inside the chunk, batch, channel.
    A group contains Kg chunks of all batch elements and channels, so that each (Kg, T, b, d, n)
    temporary has at most `group_elements` elements (more only when one chunk alone exceeds it).
    """

    def __init__(self, length, chunk_length, num_chunks, chunks_per_group, group_elements):
        self.length = length
        self.chunk_length = chunk_length
        self.num_chunks = num_chunks
        self.chunks_per_group = chunks_per_group
        self.group_elements = group_elements

    @classmethod
    def create(cls, batch, channels, length, state_size, chunk_length) -> "_ChunkPlan":
        num_chunks = -(-length // chunk_length)
        chunk_elements = chunk_length * batch * channels * state_size
        chunks_per_group = min(num_chunks, max(1, _GROUP_ELEMENTS // chunk_elements))
        return cls(
            length, chunk_length, num_chunks, chunks_per_group, chunks_per_group * chunk_elements
        )

    def groups(self, reverse: bool = False) -> list[slice]:
        """Return the chunk ranges of the groups, first to last (last to first if `reverse`)."""
        starts = range(0, self.num_chunks, self.chunks_per_group)
        ranges = [slice(k, min(k + self.chunks_per_group, self.num_chunks)) for k in starts]
        return ranges[::-1] if reverse else ranges

    def to_chunks(self, x: Tensor) -> Tensor:
        """Reorder (b, c, l) into contiguous (K, T, b, c), zero-padded at the end of l."""
        batch, channels, _ = x.shape
        padded_length = self.num_chunks * self.chunk_length
        out = x.new_empty(padded_length, batch * channels)
        if x.stride(-1) == 1:
            # A 2-D transpose of (b * c, l): torch copies it about twice as fast as the 3-D
            # permute (torch 2.13 on CPU).
            out[: self.length] = x.reshape(batch * channels, self.length).t()
        else:
            # Token-major views such as B and C sliced from a (b, l, c) projection copy
            # without a transpose.
            out[: self.length].view(self.length, batch, channels).copy_(x.permute(2, 0, 1))
        out[self.length :] = 0
        return out.view(self.num_chunks, self.chunk_length, batch, channels)

    def step_sizes(self, delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
        """Return delta + delta_bias, through softplus if `softplus`, as (K, T, b, d).

        `delta` (K, T, b, d) may be modified in place. The padding is zero in the result, so
        padded steps neither decay nor drive the state.
        """
        if delta_bias is not None:
            delta += delta_bias
        if softplus:
            delta = F.softplus(delta)
        delta.view(-1, *delta.shape[2:])[self.length :] = 0
        return delta

    def from_chunks(self, x: Tensor) -> Tensor:
        """Return (K, T, b, c) as a (b, c, l) view without the padding.

        The view is token-major (strides (c, 1, b * c)), like the projections around the scan in
        a Mamba block, so `y.transpose(1, 2)` into the output projection needs no copy.
        """
        return x.flatten(0, 1)[: self.length].permute(1, 2, 0)


def _discretize(
    step: Tensor, step_u: Tensor, A: Tensor, B: Tensor, workspace: Tensor
) -> tuple[Tensor, Tensor]:
    """Build a_t = exp(delta_t * A) and delta_t * B_t * u_t in the first two workspace buffers.

    Args:
        step: (Kg, T, b, d) delta after bias and softplus.
        step_u: (Kg, T, b, d) delta * u.
        A: (d, n).
        B: (Kg, T, b, n).
        workspace: (>= 2, group_elements).

    Returns:
        decay a_t and drive delta_t * B_t * u_t, both (Kg, T, b, d, n) views of `workspace`.
    """
    shape = (*step.shape, A.shape[1])
    numel = math.prod(shape)
    decay = workspace[0, :numel].view(shape)
    drive = workspace[1, :numel].view(shape)

    torch.mul(step[..., None], A, out=decay)
    decay.exp_()
    torch.mul(step_u[..., None], B[..., None, :], out=drive)
    return decay, drive


def _chunk_decay(step: Tensor, A: Tensor) -> Tensor:
    """Return the decay over each whole chunk, exp(A * sum of delta in the chunk): (Kg, b, d, n).

    `step` (Kg, T, b, d) is zero on the padding, so padded steps decay nothing.
    """
    return torch.exp(step.sum(1)[..., None] * A)


def _chunk_start_states(
    decay: Tensor, drive: Tensor, chunk_decay: Tensor, initial_state: Tensor
) -> Tensor:
    """Run pass 1 and the carry: return the state entering each chunk, (Kg, b, d, n).

    Pass 1 scans every chunk from a zero state at once, keeping only the end states. The carry
    then walks the chunks in order from `initial_state` (b, d, n):
    start_{k+1} = chunk_decay_k * start_k + end_k.
    """
    decay_steps = decay.unbind(1)
    drive_steps = drive.unbind(1)
    end = drive_steps[0].clone()  # (Kg, b, d, n)
    for t in range(1, len(decay_steps)):
        torch.addcmul(drive_steps[t], decay_steps[t], end, out=end)

    starts = torch.empty_like(end)
    starts[0] = initial_state
    start_steps = starts.unbind(0)
    end_steps = end.unbind(0)
    chunk_decay_steps = chunk_decay.unbind(0)
    for k in range(1, len(start_steps)):
        torch.addcmul(
            end_steps[k - 1], chunk_decay_steps[k - 1], start_steps[k - 1], out=start_steps[k]
        )
    return starts


def _scan_within_chunks(decay: Tensor, drive: Tensor, starts: Tensor) -> None:
    """Run pass 2 in place: `drive` (Kg, T, b, d, n) becomes the states h_t."""
    decay_steps = decay.unbind(1)
    state_steps = drive.unbind(1)
    state_steps[0].addcmul_(decay_steps[0], starts)
    for t in range(1, len(decay_steps)):
        state_steps[t].addcmul_(decay_steps[t], state_steps[t - 1])


def _adjoint_within_chunks(
    decay: Tensor, adjoint: Tensor, chunk_decay: Tensor, adjoint_in: Tensor
) -> None:
    """Run the reverse recurrence g_t = c_t + a_{t+1} * g_{t+1} in place over `adjoint`.

    On entry `adjoint` (Kg, T, b, d, n) contains c_t = dy_t * C_t, on return the adjoint states
    g_t. `adjoint_in` (b, d, n) is a_{t+1} * g_{t+1} for the group's last step, sent back by
    the later groups. Same two passes as the forward scan, walking the chunks last to first.
    """
    decay_steps = decay.unbind(1)
    adjoint_steps = adjoint.unbind(1)
    chunk_length = len(decay_steps)

    # Pass 1: what each chunk alone sends back to the last step of the chunk before it.
    outgoing = adjoint_steps[-1].clone()  # (Kg, b, d, n)
    for t in range(chunk_length - 2, -1, -1):
        torch.addcmul(adjoint_steps[t], decay_steps[t + 1], outgoing, out=outgoing)
    outgoing.mul_(decay_steps[0])

    # Carry: what enters each chunk's last step from all later chunks.
    incoming = torch.empty_like(outgoing)
    incoming[-1] = adjoint_in
    incoming_steps = incoming.unbind(0)
    outgoing_steps = outgoing.unbind(0)
    chunk_decay_steps = chunk_decay.unbind(0)
    for k in range(len(incoming_steps) - 2, -1, -1):
        torch.addcmul(
            outgoing_steps[k + 1],
            chunk_decay_steps[k + 1],
            incoming_steps[k + 1],
            out=incoming_steps[k],
        )

    # Pass 2.
    adjoint_steps[-1].add_(incoming)
    for t in range(chunk_length - 2, -1, -1):
        adjoint_steps[t].addcmul_(decay_steps[t + 1], adjoint_steps[t + 1])


def _contract_states(states: Tensor, weights: Tensor, out: Tensor) -> None:
    """Write sum over n of states * weights into `out` (Kg, T, b, d), e.g. y_t = C_t . h_t.

    `states` is (Kg, T, b, d, n) and `weights` (Kg, T, b, n), both contiguous. Written as a
    row vector times a transposed matrix, which ran about 4x faster than matrix times column
    vector with torch 2.13 on CPU.
    """
    channels, state_size = states.shape[-2:]
    torch.bmm(
        weights.view(-1, 1, state_size),
        states.view(-1, channels, state_size).transpose(1, 2),
        out=out.view(-1, 1, channels),
    )


def _contract_channels(states: Tensor, weights: Tensor, out: Tensor) -> None:
    """Write sum over d of states * weights into `out` (Kg, T, b, n), e.g. dL/dC_t = dy_t . h_t.

    `states` is (Kg, T, b, d, n) and `weights` (Kg, T, b, d), both contiguous.
    """
    channels, state_size = states.shape[-2:]
    torch.bmm(
        weights.view(-1, 1, channels),
        states.view(-1, channels, state_size),
        out=out.view(-1, 1, state_size),
    )


def _validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the argument whose shape or dtype does not fit the scan."""
    if u.dim() != 3:
        raise ValueError(f"u must have shape (b, d, l), got {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length < 1:
        raise ValueError("u has an empty sequence dimension (l = 0)")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must have shape (d, n) = ({channels}, n), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported: pass a real (d, n) A")
    state_size = A.shape[1]

    expected = {
        "delta": (delta, (batch, channels, length)),
        "B": (B, (batch, state_size, length)),
        "C": (C, (batch, state_size, length)),
        "D": (D, (channels,)),
        "z": (z, (batch, channels, length)),
        "delta_bias": (delta_bias, (channels,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for u {tuple(u.shape)} and A {tuple(A.shape)}, "
                f"got {tuple(tensor.shape)}; grouped or time-invariant B and C are not supported"
            )
