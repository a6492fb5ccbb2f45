"""DP forward of :class:`torch.nn.RNN`, :class:`torch.nn.LSTM` and :class:`torch.nn.GRU`.

The cuDNN/ATen recurrent kernels are single fused calls whose matrix products hooks cannot see.
While hooks are attached, these modules run the textbook recurrence instead (PyTorch's documented
equations), with recorded projections
(:meth:`~lightning_dp.grad_sample.per_sample_recorder.PerSampleRecorder.linear`) on the module's *own*
parameters (``weight_ih_l0``, ``weight_hh_l0_reverse``, ``weight_hr_l0``... unchanged, so ``state_dict``
keys, optimizers and checkpoints are untouched). The input projection of a layer is one product over the
whole sequence; the hidden projection is recorded per time step and summed per sample.

Supported: any ``num_layers``, ``bidirectional``, ``batch_first`` both ways, unbatched input, ``bias``
on/off, RNN ``tanh``/``relu``, LSTM ``proj_size``, inter-layer ``dropout`` (drawn once, in this
forward). Not supported: ``PackedSequence`` input (pad the batch and mask the loss instead).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .registry import register_dp_forward


def _cell(
    module: nn.RNNBase,
    rec: Any,
    gates_x: torch.Tensor,
    h: torch.Tensor,
    c: Optional[torch.Tensor],
    w_hh: torch.Tensor,
    b_hh: Optional[torch.Tensor],
    w_hr: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One time step: ``(h_t, c_t)`` from the input gates ``W_ih x_t + b_ih`` and ``(h_{t-1}, c_{t-1})``."""
    gates_h = rec.linear(h, w_hh, b_hh)
    if module.mode == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = rec.linear(h, w_hr)
        return h, c
    if module.mode == "GRU":
        xr, xz, xn = gates_x.chunk(3, dim=1)
        hr, hz, hn = gates_h.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    pre = gates_x + gates_h
    return (torch.tanh(pre) if module.mode == "RNN_TANH" else torch.relu(pre)), None


def _direction(
    module: nn.RNNBase,
    rec: Any,
    layer_input: torch.Tensor,
    layer: int,
    direction: int,
    h: torch.Tensor,
    c: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One direction of one layer over the batch-first ``layer_input`` ``(B, T, ·)`` from ``(h_0, c_0)``:
    its outputs ``(B, T, H)`` and its last ``(h, c)``."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    param = lambda name: getattr(module, name + suffix, None)  # noqa: E731
    gates_x = rec.linear(layer_input, param("weight_ih"), param("bias_ih"))  # (B, T, G·H)
    steps = layer_input.shape[1]
    sequence: List[Optional[torch.Tensor]] = [None] * steps
    for t in (reversed(range(steps)) if direction else range(steps)):
        h, c = _cell(module, rec, gates_x[:, t], h, c, param("weight_hh"), param("bias_hh"), param("weight_hr"))
        sequence[t] = h
    return torch.stack(sequence, dim=1), h, c


@register_dp_forward(nn.RNN, nn.LSTM, nn.GRU)
def rnn_forward(module: nn.RNNBase, rec: Any, input: torch.Tensor, hx: Any = None) -> Any:
    """Same inputs and outputs as the module's own ``forward``."""
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            f"{type(module).__name__} with PackedSequence input is not supported with per-sample gradients; "
            "pass the padded batch (and mask the loss) instead."
        )
    lstm = module.mode == "LSTM"
    batched = input.dim() == 3
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    if not batched:
        input = input.unsqueeze(0)
        h0 = None if h0 is None else h0.unsqueeze(1)
        c0 = None if c0 is None else c0.unsqueeze(1)
    elif not module.batch_first:
        input = input.transpose(0, 1)
    batch_size = input.shape[0]
    rec.note_batch_size(batch_size)
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    if h0 is None:
        h0 = input.new_zeros(module.num_layers * directions, batch_size, out_size)
    if lstm and c0 is None:
        c0 = input.new_zeros(module.num_layers * directions, batch_size, module.hidden_size)

    layer_input = input
    h_n: List[torch.Tensor] = []
    c_n: List[torch.Tensor] = []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            c = c0[index] if lstm else None
            sequence, h, c = _direction(module, rec, layer_input, layer, direction, h0[index], c)
            outputs.append(sequence)
            h_n.append(h)
            if lstm:
                c_n.append(c)
        layer_input = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        if module.dropout > 0 and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, p=module.dropout, training=module.training)

    output = layer_input
    hidden = torch.stack(h_n)
    cell = torch.stack(c_n) if lstm else None
    if not batched:
        output, hidden = output.squeeze(0), hidden.squeeze(1)
        cell = None if cell is None else cell.squeeze(1)
    elif not module.batch_first:
        output = output.transpose(0, 1)
    return (output, (hidden, cell)) if lstm else (output, hidden)
