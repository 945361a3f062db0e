"""Attention over an encoder's outputs (the memory), for a decoder query at one step.

    Bahdanau (additive):  score(q, m_j) = v . tanh(W q + U m_j)        (Bahdanau et al. 2015)
    Luong dot:            score(q, m_j) = q . m_j                      (Luong et al. 2015)
    Luong general:        score(q, m_j) = q . (W_a m_j)
    a = softmax over the valid source positions j of score;  context = sum_j a_j m_j

Padded source positions get score -inf, so their weight is exactly 0. The part of a score that
depends only on the memory (U m_j, W_a m_j) is computed once per sequence by `keys`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ATTENTIONS = ("bahdanau", "luong-dot", "luong-general")


class Attention(nn.Module):
    """Shared part: keys(memory) once, then (query, keys, memory, mask) -> context, weights."""

    def keys(self, memory: Tensor) -> Tensor:
        """(B, S, M) memory -> (B, S, K) keys."""
        return memory

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """(B, Q) query, (B, S, K) keys -> (B, S) scores."""
        raise NotImplementedError

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(B, Q) query, (B, S, K) keys, (B, S, M) memory, (B, S) bool valid -> (B, M), (B, S)."""
        scores = self.scores(query, keys).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights


class AdditiveAttention(Attention):
    """Bahdanau: v . tanh(W q + U m_j)."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int) -> None:
        super().__init__()
        self.memory_projection = nn.Linear(memory_size, attention_size, bias=False)
        self.query_projection = nn.Linear(query_size, attention_size)
        self.v = nn.Linear(attention_size, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        return self.memory_projection(memory)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        return self.v(torch.tanh(keys + self.query_projection(query).unsqueeze(1))).squeeze(-1)


class DotAttention(Attention):
    """Luong dot: q . m_j (query and memory of the same size)."""

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)


class GeneralAttention(DotAttention):
    """Luong general: q . (W_a m_j)."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.memory_projection = nn.Linear(memory_size, query_size, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        return self.memory_projection(memory)


def make_attention(kind: str, query_size: int, memory_size: int) -> Attention:
    """The attention named `kind` (one of ATTENTIONS) for these sizes."""
    if kind == "bahdanau":
        return AdditiveAttention(query_size, memory_size, query_size)
    if kind == "luong-general":
        return GeneralAttention(query_size, memory_size)
    if kind == "luong-dot":
        if query_size != memory_size:
            raise ValueError(
                f"luong-dot attention needs query_size == memory_size, got {query_size} "
                f"and {memory_size}"
            )
        return DotAttention()
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
