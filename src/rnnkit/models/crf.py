"""A linear-chain conditional random field over per-token tag scores (Lafferty et al. 2001).

For emissions e_t(k) (B, T, K), transitions A[j, k] (from tag j to tag k), start s and end z:

score(y) = s[y_1] + sum_t e_t(y_t) + sum_{t>1} A[y_{t-1}, y_t] + z[y_T]
log Z    = log sum_y exp score(y)                     (forward algorithm:)
alpha_1(k) = s[k] + e_1(k)
alpha_t(k) = logsumexp_j (alpha_{t-1}(j) + A[j, k]) + e_t(k)
log Z    = logsumexp_k (alpha_T(k) + z[k])
NLL(y)   = log Z - score(y)
Viterbi: the same recursion with max instead of logsumexp, and back-pointers to the argmax.

Sequences shorter than T (lengths) stop their recursion at their own last step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnkit.models.common import check_positive_int


class LinearChainCRF(nn.Module):
    """Tag-transition scores; log partition, path score, NLL and Viterbi decoding."""

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        check_positive_int("LinearChainCRF", num_tags=num_tags)
        self.num_tags = num_tags
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def log_partition(self, emissions: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, K) emissions, (B,) lengths -> (B,) log Z over every tag path."""
        valid = self._valid_steps(emissions, lengths)
        alpha = self.start + emissions[:, 0]
        for t in range(1, emissions.size(1)):
            stepped = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1)
            alpha = torch.where(valid[:, t : t + 1], stepped + emissions[:, t], alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def path_score(self, emissions: Tensor, tags: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, K) emissions, (B, T) tag ids, (B,) lengths -> (B,) score of each tag path."""
        valid = self._valid_steps(emissions, lengths)
        tags = tags.masked_fill(~valid, 0)
        emitted = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)
        moved = self.transitions[tags[:, :-1], tags[:, 1:]]
        last = tags.gather(1, (valid.sum(1, keepdim=True) - 1)).squeeze(1)
        return (
            self.start[tags[:, 0]]
            + (emitted * valid).sum(1)
            + (moved * valid[:, 1:]).sum(1)
            + self.end[last]
        )

    def neg_log_likelihood(
        self, emissions: Tensor, tags: Tensor, lengths: Tensor | None = None
    ) -> Tensor:
        """(B, T, K) emissions, (B, T) gold tags, (B,) lengths -> (B,) -log p(tags | input)."""
        return self.log_partition(emissions, lengths) - self.path_score(emissions, tags, lengths)

    def decode(self, emissions: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, K) emissions, (B,) lengths -> (B, T) Viterbi tag ids, -1 past each length."""
        valid = self._valid_steps(emissions, lengths)
        batch, steps, _ = emissions.shape
        delta = self.start + emissions[:, 0]
        pointers = []
        for t in range(1, steps):
            best, argbest = (delta.unsqueeze(2) + self.transitions).max(dim=1)
            keep = valid[:, t : t + 1]
            delta = torch.where(keep, best + emissions[:, t], delta)
            # Past a sequence's end the pointer is the identity, so the backtrace passes through.
            identity = torch.arange(self.num_tags, device=emissions.device).expand(batch, -1)
            pointers.append(torch.where(keep, argbest, identity))
        tag = (delta + self.end).argmax(dim=1)
        path = [tag]
        for pointer in reversed(pointers):
            tag = pointer.gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        tags = torch.stack(path[::-1], dim=1)
        return tags.masked_fill(~valid, -1)

    def viterbi_start(self, emission: Tensor) -> Tensor:
        """(B, K) first step's emissions -> (B, K) best score of a one-step path ending in k."""
        return self.start + emission

    def viterbi_step(self, delta: Tensor, emission: Tensor) -> Tensor:
        """(B, K) best prefix scores, (B, K) next emissions -> (B, K) best scores one step on."""
        return (delta.unsqueeze(2) + self.transitions).amax(dim=1) + emission

    def _valid_steps(self, emissions: Tensor, lengths: Tensor | None) -> Tensor:
        if emissions.dim() != 3 or emissions.size(2) != self.num_tags or emissions.size(1) < 1:
            raise ValueError(
                f"LinearChainCRF: emissions must have shape (B, T>=1, num_tags={self.num_tags}), "
                f"got {tuple(emissions.shape)}"
            )
        steps = torch.arange(emissions.size(1), device=emissions.device)
        if lengths is None:
            return torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        lengths = torch.as_tensor(lengths, device=emissions.device)
        if lengths.shape != (emissions.size(0),) or bool(
            ((lengths < 1) | (lengths > emissions.size(1))).any()
        ):
            raise ValueError(
                f"LinearChainCRF: lengths must be (B={emissions.size(0)},) values in "
                f"1..{emissions.size(1)}, got {lengths.tolist()}"
            )
        return steps.unsqueeze(0) < lengths.unsqueeze(1)
