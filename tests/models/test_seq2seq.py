"""Seq2Seq: attention masks and sums, greedy vs beam search, exhaustive search, padding."""

import itertools

import pytest
import torch

from rnnkit.models.attention import ATTENTIONS, make_attention
from rnnkit.models.seq2seq import BOS_ID, EOS_ID, Seq2Seq, Seq2SeqConfig

CASES = [(cell, attention) for cell in ("lstm", "gru", "rnn") for attention in ATTENTIONS]


def tiny_model(cell="lstm", attention="bahdanau", target_vocab=7, seed=0, **extra):
    torch.manual_seed(seed)
    config = Seq2SeqConfig(
        source_vocab_size=10,
        target_vocab_size=target_vocab,
        embedding_dim=8,
        hidden_size=6,
        cell=cell,
        attention=attention,
        **extra,
    )
    model = Seq2Seq(config).eval()
    # What is tested here does not depend on the encoder's kernel (the fused kernels are tested
    # against the reference elsewhere); the reference path spares compiling them for this file.
    model.encoder.backend = "reference"
    return model


def padded_sources(seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4])
    source = torch.randint(4, 10, (3, 5), generator=generator)
    source[torch.arange(5).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return source, lengths


@pytest.mark.parametrize("cell, attention", CASES)
def test_attention_weights_sum_to_one_and_are_zero_on_padding(cell, attention):
    model = tiny_model(cell, attention, bidirectional=cell != "rnn")
    source, lengths = padded_sources()
    decoder_input = torch.randint(4, 7, (3, 4))
    decoder_input[:, 0] = BOS_ID
    logits, weights = model(source, lengths, decoder_input)
    assert logits.shape == (3, 4, 7) and weights.shape == (3, 4, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    padding = torch.arange(5).unsqueeze(0) >= lengths.unsqueeze(1)
    assert torch.all(weights.masked_select(padding.unsqueeze(1).expand_as(weights)) == 0)
    assert torch.all(weights.masked_select(~padding.unsqueeze(1).expand_as(weights)) > 0)
    for hypothesis, length in zip(model.beam_search(source, lengths, 3, 6), lengths):
        assert hypothesis.attention.shape == (len(hypothesis.tokens) + 1, int(length))
        torch.testing.assert_close(
            hypothesis.attention.sum(-1), torch.ones(len(hypothesis.tokens) + 1)
        )


def test_luong_dot_needs_equal_sizes_and_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="query_size == memory_size"):
        make_attention("luong-dot", 4, 6)
    with pytest.raises(ValueError, match="attention must be one of"):
        Seq2SeqConfig(10, 10, attention="luong-concat")
    with pytest.raises(ValueError, match="target_vocab_size must be an int >= 5"):
        Seq2SeqConfig(10, 4)


@pytest.mark.parametrize("cell, attention", CASES)
def test_beam_size_one_is_greedy_decoding(cell, attention):
    model = tiny_model(cell, attention, seed=2)
    source, lengths = padded_sources()
    greedy = model.greedy_decode(source, lengths, max_length=8)
    beam = model.beam_search(source, lengths, beam_size=1, max_length=8)
    assert [h.tokens for h in beam] == [h.tokens for h in greedy]
    for b, g in zip(beam, greedy):
        assert b.score == pytest.approx(g.score, abs=1e-5)
        torch.testing.assert_close(b.attention, g.attention)


def sequence_log_prob(model, source, length, tokens):
    """log p(tokens + </s> | source) by teacher forcing, with decoding's masking."""
    target = [*tokens, EOS_ID]
    decoder_input = torch.tensor([[BOS_ID, *target[:-1]]])
    logits, _ = model(source.unsqueeze(0)[:, :length], torch.tensor([length]), decoder_input)
    log_probs = model._log_probs(logits[0], last_step=False)
    return float(sum(log_probs[t, token] for t, token in enumerate(target)))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_brute_force_best_sequence(attention, length_penalty):
    # Vocabulary: 4 special ids, then tokens 4 and 5; outputs of up to 3 tokens.
    model = tiny_model("gru", attention, target_vocab=6, seed=5)
    source, lengths = padded_sources()
    max_length = 3
    with torch.no_grad():
        for b in range(3):
            best = None
            for size in range(max_length + 1):
                for body in itertools.product((4, 5), repeat=size):
                    log_prob = sequence_log_prob(model, source[b], int(lengths[b]), list(body))
                    score = log_prob / ((5 + size + 1) / 6) ** length_penalty
                    if best is None or score > best[0]:
                        best = (score, list(body))
            found = model.beam_search(
                source[b : b + 1], lengths[b : b + 1], 16, max_length, length_penalty
            )
            assert found[0].tokens == best[1]
            assert found[0].score == pytest.approx(best[0], abs=1e-4)


@pytest.mark.parametrize("cell, attention", [("lstm", "bahdanau"), ("gru", "luong-general")])
def test_padded_batch_decodes_as_each_example_alone(cell, attention):
    model = tiny_model(cell, attention, seed=3)
    source, lengths = padded_sources(seed=4)
    for method in ("greedy", "beam"):
        if method == "greedy":
            together = model.greedy_decode(source, lengths, 7)
        else:
            together = model.beam_search(source, lengths, 3, 7, length_penalty=0.6)
        for b in range(3):
            alone_source = source[b : b + 1, : int(lengths[b])]
            alone_lengths = lengths[b : b + 1]
            if method == "greedy":
                alone = model.greedy_decode(alone_source, alone_lengths, 7)[0]
            else:
                alone = model.beam_search(alone_source, alone_lengths, 3, 7, length_penalty=0.6)[0]
            assert together[b].tokens == alone.tokens
            assert together[b].score == pytest.approx(alone.score, abs=1e-5)
            torch.testing.assert_close(together[b].attention, alone.attention)


def test_without_teacher_forcing_the_decoder_reads_its_own_predictions():
    model = tiny_model(seed=6)
    source, lengths = padded_sources()
    decoder_input = torch.randint(4, 7, (3, 5))
    decoder_input[:, 0] = BOS_ID
    changed = decoder_input.clone()
    changed[:, 1:] = torch.randint(4, 7, (3, 4))
    own_a, _ = model(source, lengths, decoder_input, teacher_forcing=0.0)
    own_b, _ = model(source, lengths, changed, teacher_forcing=0.0)
    torch.testing.assert_close(own_a, own_b)
    forced_a, _ = model(source, lengths, decoder_input)
    forced_b, _ = model(source, lengths, changed)
    assert not torch.allclose(forced_a[:, 1:], forced_b[:, 1:])
    # Greedy decoding is exactly the untaught forward pass, step by step.
    greedy = model.greedy_decode(source, lengths, max_length=4)
    predicted = model._log_probs(own_a, last_step=False).argmax(-1)
    for b, hypothesis in enumerate(greedy):
        assert hypothesis.tokens == predicted[b, : len(hypothesis.tokens)].tolist()


def test_decoding_ends_by_max_length_and_validates_arguments():
    model = tiny_model(seed=7)
    source, lengths = padded_sources()
    for hypothesis in model.beam_search(source, lengths, 2, max_length=2):
        assert len(hypothesis.tokens) <= 2
    with pytest.raises(ValueError, match="beam_size must be an int >= 1"):
        model.beam_search(source, lengths, 0, 5)
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        model.beam_search(source, lengths, 2, 5, length_penalty=-1.0)
    with pytest.raises(ValueError, match="lengths must lie in"):
        model.greedy_decode(source, torch.tensor([5, 0, 4]), 5)
