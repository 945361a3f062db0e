import json

import pytest

from rnnkit.data import PAD_ID, UNK_ID, CharVocab, DataError, WordVocab


def test_char_vocab_encodes_and_decodes():
    vocab = CharVocab.build(["hello", "world"])
    assert len(vocab) == 2 + len(set("helloworld"))
    assert vocab.tokens[:2] == ["<pad>", "<unk>"]
    ids = vocab.encode("hold")
    assert UNK_ID not in ids and PAD_ID not in ids
    assert vocab.decode(ids) == "hold"


def test_char_vocab_unknown_and_padding():
    vocab = CharVocab.build("abc")  # a str is one text
    assert vocab.encode("abz") == [vocab.encode("a")[0], vocab.encode("b")[0], UNK_ID]
    assert vocab.decode([PAD_ID, *vocab.encode("ab"), UNK_ID, PAD_ID]) == "ab\ufffd"


def test_char_vocab_min_count():
    vocab = CharVocab.build(["aab", "ac"], min_count=2)
    assert vocab.tokens == ["<pad>", "<unk>", "a"]


def test_char_vocab_json_round_trip():
    vocab = CharVocab.build(["Hamlet: to be, or not to be\n"])
    restored = CharVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab
    assert restored.encode("to be\n") == vocab.encode("to be\n")


def test_word_vocab_tokenizes_orders_and_caps():
    assert WordVocab.tokenize("Don't STOP, now!") == ["don't", "stop", ",", "now", "!"]
    vocab = WordVocab.build(["the cat", "the dog", "a cat"], max_size=4)
    assert vocab.tokens == ["<pad>", "<unk>", "cat", "the"]
    assert vocab.encode("The bird") == [vocab.tokens.index("the"), UNK_ID]
    assert vocab.decode([3, 1, 0]) == "the <unk>"


def test_word_vocab_json_round_trip():
    vocab = WordVocab.build(["one two two three three three"], min_count=2)
    assert vocab.tokens == ["<pad>", "<unk>", "three", "two"]
    assert WordVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


@pytest.mark.parametrize(
    "data, problem",
    [
        ([], "expected a dict"),
        ({"type": "WordVocab", "tokens": ["a"]}, "expected 'CharVocab'"),
        ({"type": "CharVocab", "tokens": "abc"}, "list of non-empty strings"),
        ({"type": "CharVocab", "tokens": ["a", "a"]}, "repeated"),
        ({"type": "CharVocab", "tokens": ["ab"]}, "single characters"),
        ({"type": "CharVocab", "tokens": ["<pad>"]}, "must not hold"),
    ],
)
def test_char_vocab_from_dict_rejects_bad_content(data, problem):
    with pytest.raises(DataError, match=problem):
        CharVocab.from_dict(data)


def test_decode_rejects_out_of_range_ids():
    vocab = CharVocab.build("ab")
    with pytest.raises(ValueError, match=r"ids\[1\] = 9 is outside the vocabulary \(0..3\)"):
        vocab.decode([2, 9])


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="min_count"):
        CharVocab.build(["a"], min_count=0)
    with pytest.raises(ValueError, match="max_size"):
        WordVocab.build(["a"], max_size=1)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        WordVocab.build(["a", 3])
