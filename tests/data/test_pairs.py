"""Source -> target pairs: the shipped CMUdict set, TSV files, bad files, splits, vocabularies."""

import gzip

import numpy as np
import pytest

from rnnkit.data import DataError, Pairs, TokenVocab, load_pairs, split_pairs
from rnnkit.data.pairs import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def test_shipped_cmudict_holds_words_and_their_phonemes():
    pairs = load_pairs()
    assert len(pairs) == 114_591
    lookup = dict(zip(pairs.sources, pairs.targets))
    assert lookup["cat"] == "K AE1 T"
    assert lookup["dictionary"] == "D IH1 K SH AH0 N EH2 R IY0"
    assert all(s.isalpha() and s.islower() and 2 <= len(s) <= 12 for s in pairs.sources)
    assert len(set(pairs.sources)) == len(pairs)  # one pronunciation per word


def test_tsv_file_and_gzip_give_the_same_pairs(tmp_path):
    text = "hello\tbonjour\n\n cat \tle chat\r\nhello\tsalut\n"
    plain = tmp_path / "pairs.tsv"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "pairs.tsv.gz"
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    for path in (plain, packed):
        pairs = load_pairs(path)
        assert pairs.sources == ["hello", "cat", "hello"]
        assert pairs.targets == ["bonjour", "le chat", "salut"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a\tb\nno tab here\n", "line 2 has 0 tab(s)"),
        (b"a\tb\tc\n", "line 1 has 2 tab(s)"),
        (b"a\tb\n\tb\n", "line 2: empty source"),
        (b"a\tb\nc\t  \n", "line 2: empty target"),
        (b"a\tb\nc\t\xff\xfe\n", "line 2 is not valid UTF-8"),
        (b"", "file is empty"),
        (b"\n  \n", "contains no pairs"),
    ],
)
def test_bad_pair_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "absent.tsv")


def test_split_keeps_each_source_in_one_split_and_repeats_with_the_seed():
    sources = [f"w{i % 40}" for i in range(100)]  # 40 distinct sources, repeated
    pairs = Pairs(sources, [f"t{i}" for i in range(100)])
    parts = split_pairs(pairs, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    seen = [{sources[i] for i in part} for part in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert [len(s) for s in seen] == [32, 4, 4]
    again = split_pairs(pairs, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_pairs(pairs, seed=4)
    assert not np.array_equal(parts[0], other[0])


def test_token_vocab_round_trips_characters_and_space_tokens():
    chars = TokenVocab.build(["cat", "dog"], "char")
    assert chars.tokens[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert chars.decode(chars.encode("god")) == "god"
    assert chars.encode("cz")[1] == UNK_ID
    phonemes = TokenVocab.build(["K AE1 T", "D AO1 G"], "space")
    ids = phonemes.encode("D AE1 T")
    assert phonemes.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == "D AE1 T"
    assert TokenVocab.from_dict(phonemes.to_dict()) == phonemes
    assert TokenVocab.from_dict(phonemes.to_dict()) != chars


def test_token_vocab_rejects_bad_descriptions():
    with pytest.raises(DataError, match="expected a TokenVocab"):
        TokenVocab.from_dict({"type": "CharVocab", "tokens": ["a"]})
    with pytest.raises(DataError, match="'level'"):
        TokenVocab.from_dict({"type": "TokenVocab", "level": "word", "tokens": ["a"]})
    with pytest.raises(ValueError, match="level must be one of"):
        TokenVocab.build(["a"], "word")
