"""Attention, recurrent and transformer layers (DP forwards) vs the float64 micro-batch reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dp.grad_sample import attach_grad_sample_hooks
from tests.test_grad_sample import check_per_sample, smooth_loss


class Attention(nn.Module):
    """``nn.MultiheadAttention`` called as self-attention (one input) or with separate key/value."""

    def __init__(self, need_weights: bool = True, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **kwargs)
        self.need_weights = need_weights

    def forward(self, query, key=None, value=None, key_padding_mask=None, attn_mask=None):
        key = query if key is None else key
        value = key if value is None else value
        return self.attn(
            query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=self.need_weights
        )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention(batch_first, bias):
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    check_per_sample(Attention(batch_first=batch_first, bias=bias), x, batch_dims=[0 if batch_first else 1])


def test_attention_kdim_vdim_and_bias_kv():
    model = Attention(batch_first=True, kdim=6, vdim=7, add_bias_kv=True, add_zero_attn=True)
    check_per_sample(model, torch.randn(3, 5, 8), torch.randn(3, 4, 6), torch.randn(3, 4, 7))


def test_cross_attention_packed_weights_with_masks():
    model = Attention(batch_first=True, need_weights=False)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    padding[0, -1] = padding[2, -2:] = True
    causal = torch.triu(torch.ones(5, 4, dtype=torch.bool), diagonal=1)
    inputs = (torch.randn(3, 5, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8), padding, causal)
    check_per_sample(model, *inputs, batch_dims=[0, 0, 0, 0, None])


def test_attention_dp_forward_matches_pytorch_and_keeps_parameters():
    model = Attention(batch_first=False, kdim=6, vdim=7)
    q, k, v = torch.randn(5, 3, 8), torch.randn(4, 3, 6), torch.randn(4, 3, 7)
    expected = model(q, k, v)
    params = list(model.parameters())
    keys = list(model.state_dict())
    hooks = attach_grad_sample_hooks(model)
    assert "forward" in model.attn.__dict__
    got = model(q, k, v)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    hooks.remove()
    assert "forward" not in model.attn.__dict__


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_multilayer_bidirectional(cls, batch_first):
    model = cls(4, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(3, 6, 4) if batch_first else torch.randn(6, 3, 4)
    check_per_sample(model, x, batch_dims=[0 if batch_first else 1])


@pytest.mark.parametrize(
    "model",
    [nn.RNN(4, 5, nonlinearity="relu", bias=False), nn.LSTM(4, 5, proj_size=3), nn.GRU(4, 5, num_layers=2)],
    ids=["rnn-relu-nobias", "lstm-proj", "gru-2"],
)
def test_recurrent_variants_with_initial_state(model):
    layers = model.num_layers
    out_size = model.proj_size or model.hidden_size
    h0 = torch.randn(layers, 3, out_size)
    if isinstance(model, nn.LSTM):
        state = (h0, torch.randn(layers, 3, model.hidden_size))

        class WithState(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = model

            def forward(self, x, h, c):
                return self.rnn(x, (h, c))

        check_per_sample(WithState(), torch.randn(6, 3, 4), *state, batch_dims=[1, 1, 1])
    else:
        check_per_sample(model, torch.randn(6, 3, 4), h0, batch_dims=[1, 1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_dp_forward_matches_pytorch(cls):
    model = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 4)
    expected = model(x)
    hooks = attach_grad_sample_hooks(model)
    got = model(x)
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation runs PyTorch's own fused kernel
        torch.testing.assert_close(model(x)[0], expected[0])
    hooks.remove()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_layer(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    check_per_sample(layer, x, batch_dims=[0 if batch_first else 1])


def test_transformer_decoder_layer():
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation="gelu")
    check_per_sample(layer, torch.randn(3, 5, 8), torch.randn(3, 4, 8))


@pytest.mark.parametrize("model", [
    nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True),
    nn.LSTM(8, 6, num_layers=2, dropout=0.3, batch_first=True),
], ids=["encoder", "lstm"])
def test_dropout_is_drawn_once_so_per_sample_sums_to_the_gradient(model):
    """With dropout active, the per-sample gradients must belong to the very mask of this step."""
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum")
    smooth_loss(model(torch.randn(4, 5, 8))).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-4, atol=1e-5, msg=name)
    hooks.remove()


class SeqModel(nn.Module):
    """Time-major tokens → embedding → LSTM(batch_first=False) → heads on the sequence and on h_n."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.rnn = nn.LSTM(6, 5, batch_first=False)
        self.norm = nn.LayerNorm(5)
        self.per_step = nn.Linear(5, 3)
        self.final = nn.Linear(5, 2)

    def forward(self, tokens):  # tokens: (T, B)
        out, (h, _) = self.rnn(self.emb(tokens))
        return self.per_step(self.norm(out)).sum(0), self.final(h[-1])


def test_batch_not_first_model():
    check_per_sample(SeqModel(), torch.randint(0, 11, (7, 4)), batch_dims=[1])
