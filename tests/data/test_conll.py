"""CoNLL-U and column-file readers, the shipped treebank and NER files, and their errors."""

import gzip

import pytest

from rnnkit.data import (
    DataError,
    TaggedSentences,
    load_tagged_file,
    load_ud_english_ewt,
    load_uner_english_ewt,
    read_column_file,
    read_conllu,
)

CONLLU = """# sent_id = 1
# text = I don't know.
1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
4.1\tknew\tknow\tVERB\tVBD\t_\t_\t_\t4:conj\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = 2
1\tHello\thello\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_conllu_skips_multiword_tokens_and_empty_nodes(tmp_path):
    data = read_conllu(write(tmp_path, "a.conllu", CONLLU))
    assert data.tokens == [["I", "do", "n't", "know", "."], ["Hello"]]
    assert data.tags == [["PRON", "AUX", "PART", "VERB", "PUNCT"], ["INTJ"]]
    assert data.lines == [3, 12]
    xpos = read_conllu(write(tmp_path, "b.conllu", CONLLU), tag_column="xpos")
    assert xpos.tags[0] == ["PRP", "VBP", "RB", "VB", "."]


def test_gzip_conllu_reads_the_same(tmp_path):
    path = tmp_path / "a.conllu.gz"
    path.write_bytes(gzip.compress(CONLLU.encode()))
    assert load_tagged_file(path).tokens == read_conllu(write(tmp_path, "a.conllu", CONLLU)).tokens


@pytest.mark.parametrize(
    "bad, message",
    [
        ("1\tI\tPRON", "line 3 has 3 tab-separated column"),
        ("x\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_", "line 3: malformed ID 'x'"),
        ("2\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_", "line 3: word ID 2 out of order, expected 1"),
        ("1\tI\tI\t_\tPRP\t_\t4\tnsubj\t_\t_", "line 3: word 'I' has no UPOS tag"),
    ],
)
def test_malformed_conllu_lines_are_named(tmp_path, bad, message):
    text = CONLLU.replace("1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_", bad)
    path = write(tmp_path, "bad.conllu", text)
    with pytest.raises(DataError, match=message) as error:
        read_conllu(path)
    assert str(path) in str(error.value)


def test_conllu_rejects_a_bad_multiword_range(tmp_path):
    path = write(tmp_path, "bad.conllu", CONLLU.replace("2-3\tdon't", "3-2\tdon't"))
    with pytest.raises(DataError, match="line 4: multiword token ID '3-2'"):
        read_conllu(path)


TWO_COLUMN = "EU B-ORG\nrejects O\nGerman B-MISC\ncall O\n\nPeter\tB-PER\nBlackburn\tI-PER\n"
UNER = (
    "# sent_id = x-1\n# text = where in tampa bay\n"
    "1\twhere\tO\t-\t-\n2\tin\tO\t-\t-\n3\ttampa\tB-LOC\t-\tstephen\n4\tbay\tI-LOC\t-\tstephen\n\n"
)
CONLL2003 = "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"


def test_column_files_in_their_three_layouts(tmp_path):
    two = read_column_file(write(tmp_path, "a.iob2", TWO_COLUMN))
    assert two.tokens == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert two.tags[1] == ["B-PER", "I-PER"]
    uner = read_column_file(write(tmp_path, "b.iob2", UNER))
    assert uner.tokens == [["where", "in", "tampa", "bay"]]
    assert uner.tags == [["O", "O", "B-LOC", "I-LOC"]]
    conll = read_column_file(write(tmp_path, "c.txt", CONLL2003))
    assert conll.tags == [["B-ORG", "O"], ["B-PER"]]


def test_a_hash_token_inside_a_sentence_is_a_token(tmp_path):
    data = read_column_file(write(tmp_path, "a.txt", "love O\n# O\nit O\n"))
    assert data.tokens == [["love", "#", "it"]]


@pytest.mark.parametrize(
    "content, message",
    [
        ("EU B-ORG\nrejects\ncall O\n", "line 2 has 1 field.*expected 2.*without its tag"),
        ("EU B-ORG extra\nrejects O\n", "line 2 has 2 field.*expected 3 like line 1"),
        ("1\twhere\tO\t-\t-\n3\tin\tO\t-\t-\n", "line 2: token index '3' out of order"),
        ("justoneword\n", "line 1 has 1 field"),
        ("# only a comment\n\n", "contains no sentences"),
    ],
)
def test_malformed_column_files_are_named(tmp_path, content, message):
    path = write(tmp_path, "bad.iob2", content)
    with pytest.raises(DataError, match=message) as error:
        read_column_file(path)
    assert str(path) in str(error.value)


def test_invalid_utf8_and_empty_files_are_named(tmp_path):
    path = tmp_path / "bad.conllu"
    path.write_bytes(b"1\tcaf\xe9\tx\tNOUN\tNN\t_\t0\troot\t_\t_\n")
    with pytest.raises(DataError, match="line 1 is not valid UTF-8"):
        read_conllu(path)
    with pytest.raises(DataError, match="file is empty"):
        read_column_file(write(tmp_path, "empty.iob2", ""))
    with pytest.raises(DataError, match="no such file"):
        load_tagged_file(tmp_path / "missing.conllu")


def test_mismatched_token_and_tag_counts_are_refused():
    with pytest.raises(DataError, match="line 7: sentence 1 has 2 tokens but 1 tags"):
        TaggedSentences([["a", "b"]], [["X"]], "f.txt", [7])


def test_shipped_treebank_has_the_documented_sizes():
    dev = load_ud_english_ewt("dev")
    assert (len(dev), sum(map(len, dev.tokens))) == (2001, 25147)
    assert len(dev.tagset) == 17 and "PROPN" in dev.tagset
    test = load_uner_english_ewt("test")
    assert (len(test), sum(map(len, test.tokens))) == (2077, 25097)
    assert test.tagset == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    with pytest.raises(ValueError, match="split"):
        load_uner_english_ewt("train")
