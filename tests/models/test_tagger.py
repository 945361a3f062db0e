"""SequenceTagger: padding, the character encoder, CRF decoding, streaming, learning."""

import pytest
import torch

from rnnkit import Stream
from rnnkit.models import SequenceTagger, SequenceTaggerConfig


def make_tagger(**overrides) -> SequenceTagger:
    torch.manual_seed(0)
    options = dict(
        num_tags=4,
        vocab_size=12,
        char_vocab_size=9,
        embedding_dim=6,
        char_embedding_dim=5,
        char_channels=7,
        hidden_size=8,
        dropout=0.0,
        word_dropout=0.0,
    )
    options.update(overrides)
    return SequenceTagger(SequenceTaggerConfig(**options)).double().eval()


def random_inputs(batch: int, steps: int, chars: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(1, 12, (batch, steps, 1), generator=generator)
    characters = torch.randint(1, 9, (batch, steps, chars), generator=generator)
    characters[:, :, -1] = 0  # some words are shorter than the widest
    return torch.cat([words, characters], dim=2)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padding_does_not_change_a_sentences_scores(cell, bidirectional):
    model = make_tagger(cell=cell, bidirectional=bidirectional)
    inputs = random_inputs(3, 7)
    lengths = torch.tensor([7, 4, 2])
    batched = model(inputs, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = model(inputs[row : row + 1, :length])
        torch.testing.assert_close(batched[row : row + 1, :length], alone)


def test_characters_tell_unknown_words_apart():
    model = make_tagger()
    first = torch.tensor([[[1, 2, 3, 4]]])  # word id 1 = <unk>, different spellings
    second = torch.tensor([[[1, 5, 6, 0]]])
    assert not torch.allclose(model(first), model(second))
    without_chars = make_tagger(char_vocab_size=0)
    torch.testing.assert_close(without_chars(first), without_chars(second))


def test_tag_marks_padding_and_uses_viterbi_with_a_crf():
    model = make_tagger(crf=True)
    inputs, lengths = random_inputs(2, 5), torch.tensor([5, 3])
    with torch.no_grad():
        model.crf.transitions.normal_()
        expected = model.crf.decode(model(inputs, lengths), lengths)
    tags = model.tag(inputs, lengths)
    assert torch.equal(tags, expected)
    assert (tags[1, 3:] == -1).all() and (tags[0] >= 0).all()


def test_softmax_loss_ignores_padded_positions():
    model = make_tagger()
    inputs, lengths = random_inputs(2, 5), torch.tensor([5, 2])
    emissions = model(inputs, lengths)
    tags = torch.randint(0, 4, (2, 5))
    changed = tags.clone()
    changed[1, 2:] = (changed[1, 2:] + 1) % 4
    loss = model.neg_log_likelihood(emissions, tags, lengths)
    torch.testing.assert_close(loss, model.neg_log_likelihood(emissions, changed, lengths))


@pytest.mark.parametrize("crf", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_streamed_tags_equal_whole_sentence_tags(cell, crf):
    model = make_tagger(cell=cell, bidirectional=False, crf=crf)
    if crf:
        with torch.no_grad():
            model.crf.transitions.normal_(std=2.0)
    inputs = random_inputs(2, 9)
    stream = Stream(model)
    scores = torch.cat([stream.step(chunk) for chunk in inputs.split([1, 3, 1, 4], dim=1)], 1)
    streamed = scores.argmax(dim=2)
    if not crf:
        torch.testing.assert_close(scores, model(inputs), rtol=1e-10, atol=1e-10)
        assert torch.equal(streamed, model.tag(inputs))
    else:
        # Token t's streamed tag is the last tag of the Viterbi path of the tokens up to t.
        for t in range(inputs.size(1)):
            assert torch.equal(streamed[:, t], model.tag(inputs[:, : t + 1])[:, -1])
        assert torch.equal(streamed[:, -1], model.tag(inputs)[:, -1])


def test_tokens_streamed_one_by_one_at_their_own_width_match_the_padded_sentence():
    """A server encodes each arriving token alone: (1, 1, 1 + len(word)) chunks."""
    model = make_tagger(bidirectional=False)
    words = [
        torch.tensor([[[3, 1, 2]]]),
        torch.tensor([[[5, 4]]]),
        torch.tensor([[[7, 1, 2, 3, 4]]]),
    ]
    padded = torch.zeros(1, 3, 5, dtype=torch.int64)
    for t, word in enumerate(words):
        padded[0, t, : word.size(2)] = word[0, 0]
    stream = Stream(model)
    streamed = torch.cat([stream.step(word) for word in words], dim=1)
    torch.testing.assert_close(streamed, model(padded), rtol=1e-10, atol=1e-10)


def test_bidirectional_tagger_refuses_to_stream():
    model = make_tagger(bidirectional=True)
    with pytest.raises(ValueError, match="unidirectional"):
        model.initial_state(1)


@pytest.mark.parametrize("crf", [False, True])
def test_tagger_learns_tags_that_depend_on_the_previous_word(crf):
    """Tag = the previous word's id mod 4: only the recurrence can carry it."""
    torch.manual_seed(3)
    model = make_tagger(bidirectional=False, crf=crf).float().train()
    words = torch.randint(2, 12, (64, 6))
    tags = torch.cat([torch.zeros(64, 1, dtype=torch.int64), words[:, :-1] % 4], dim=1)
    inputs = torch.cat([words.unsqueeze(2), torch.ones(64, 6, 1, dtype=torch.int64)], 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(80):
        loss = model.neg_log_likelihood(model(inputs), tags)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model.tag(inputs) == tags).double().mean()
    assert accuracy > 0.95


def test_bad_config_and_input_are_named():
    with pytest.raises(ValueError, match="num_tags"):
        SequenceTaggerConfig(num_tags=0, vocab_size=5)
    with pytest.raises(ValueError, match="word_dropout"):
        SequenceTaggerConfig(num_tags=3, vocab_size=5, word_dropout=1.5)
    with pytest.raises(ValueError, match=r"\(B, T, 1 \+ C\)"):
        make_tagger()(torch.ones(2, 3, dtype=torch.int64))
