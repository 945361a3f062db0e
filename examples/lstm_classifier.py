"""The classic LSTMClassifier with rnnkit.LSTM in place of torch.nn.LSTM.

Task (generated, so it runs anywhere): a sequence of random tokens is labelled by which of
three marker tokens occurs most often in it. Prints the held-out accuracy against chance.
"""

from __future__ import annotations

import torch
from torch import nn

import rnnkit

VOCAB, MARKERS, CLASSES = 20, (1, 2, 3), 3


class LSTMClassifier(nn.Module):
    """(B, T) token ids -> (B, classes) logits from the concatenated final states."""

    def __init__(self, vocab: int, embed: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = rnnkit.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(self.embedding(tokens), lengths=lengths)
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))


def make_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random token sequences of length 5-20 and their majority-marker labels."""
    tokens = torch.randint(0, VOCAB, (size, 20), generator=generator)
    lengths = torch.randint(5, 21, (size,), generator=generator)
    mask = torch.arange(20).unsqueeze(0) < lengths.unsqueeze(1)
    counts = torch.stack([((tokens == m) & mask).sum(1) for m in MARKERS], dim=1)
    labels = (counts + 0.1 * torch.arange(CLASSES)).argmax(1)  # ties go to the later marker
    return tokens, lengths, labels


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = LSTMClassifier(VOCAB, 16, 32, CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(300):
        tokens, lengths, labels = make_batch(64, generator)
        loss = nn.functional.cross_entropy(model(tokens, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    tokens, lengths, labels = make_batch(2000, generator)
    with torch.no_grad():
        accuracy = (model(tokens, lengths).argmax(1) == labels).float().mean().item()
    majority = labels.bincount().max().item() / len(labels)
    print(f"held-out accuracy {accuracy:.3f} (majority class {majority:.3f})")


if __name__ == "__main__":
    main()
