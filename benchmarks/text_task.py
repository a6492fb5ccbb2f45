"""The data and model of the generated-sequence task (``benchmarks/utility_text.py`` describes the task).

Imported by ``benchmarks/utility_text.py`` and ``benchmarks/tasks.py``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

V, T, D, HEADS = 16, 12, 64, 2
TRAIN, TEST, EPOCHS, BATCH, DELTA = 6000, 2000, 15, 200, 1e-5
DATA_SEED = 1234


def make_data() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(DATA_SEED)
    n = TRAIN + TEST
    first = torch.randint(0, V, (n,), generator=g)
    # other tokens: uniform over the V - 1 tokens that are not the first one
    rest = torch.randint(0, V - 1, (n, T - 1), generator=g)
    rest = rest + (rest >= first[:, None]).long()
    label = torch.randint(0, 2, (n,), generator=g)
    copies = 1 + torch.randint(0, 2, (n,), generator=g)
    order = torch.rand(n, T - 1, generator=g).argsort(dim=1)
    for i in torch.nonzero(label).flatten().tolist():
        rest[i, order[i, : copies[i]]] = first[i]
    x = torch.cat([first[:, None], rest], dim=1)
    return x, label


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, D))
        return h + self.mlp(self.ln2(h))


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.block = Block()
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.block(self.tok(x) + self.pos(positions))
        return self.head(self.ln(h[:, 0]))


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Classifier()
