import gzip
import json
from collections import Counter

import pytest

from rnnkit.data import DataError, LabelledTexts, load_labelled_texts


def test_embedded_surnames():
    data = load_labelled_texts()
    assert isinstance(data, LabelledTexts)
    assert len(data.texts) == len(data.labels) == 6423
    counts = Counter(data.labels)
    assert sorted(counts) == [
        "Czech", "Dutch", "English", "Finnish", "French",
        "German", "Irish", "Italian", "Spanish", "Swedish",
    ]  # fmt: skip
    assert counts["Irish"] == counts["Italian"] == 1000
    assert counts["Czech"] == 198
    pairs = set(zip(data.texts, data.labels))
    assert ("Bartoš", "Czech") in pairs
    assert ("Williams", "English") in pairs
    assert ("Virtanen", "Finnish") in pairs
    # "Müller" is listed as both Czech and German, so it is dropped as ambiguous
    assert "Müller" not in data.texts
    # a name listed under two languages would make the task ambiguous; none are kept
    assert len(set(data.texts)) == len(data.texts)


def test_csv_with_quotes_commas_and_newlines(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        'id,label,text\n1,pos,"Great, really great"\n\n2,neg,"two\nlines"\n3,pos,fine\n',
        encoding="utf-8",
    )
    data = load_labelled_texts(path)
    assert data.texts == ["Great, really great", "two\nlines", "fine"]
    assert data.labels == ["pos", "neg", "pos"]
    assert data.classes == ["neg", "pos"]


def test_tsv_with_custom_columns_gzip(tmp_path):
    path = tmp_path / "names.tsv.gz"
    content = "name\tlang\nMüller\tGerman\nRossi\tItalian\n"
    path.write_bytes(gzip.compress(content.encode()))
    data = load_labelled_texts(path, text_column="name", label_column="lang")
    assert data.texts == ["Müller", "Rossi"]
    assert data.labels == ["German", "Italian"]


def test_jsonl_with_integer_labels_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": "good", "label": 1}, {"text": "bad", "label": 0, "extra": None}]
    path.write_text("\n" + "\n\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    data = load_labelled_texts(path)
    assert data.texts == ["good", "bad"]
    assert data.labels == ["1", "0"]


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    assert load_labelled_texts(path).labels == ["x", "y"]


def test_missing_column_lists_the_columns_found(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\nnice,pos\nbad,neg\n")
    with pytest.raises(DataError) as caught:
        load_labelled_texts(path)
    message = str(caught.value)
    assert "reviews.csv" in message
    assert "'text', 'label'" in message
    assert "'review', 'sentiment'" in message


def test_missing_key_in_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl: line 2: missing key\(s\) 'text'.*'txt'"):
        load_labelled_texts(path)


def test_single_class_is_rejected(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\na,spam\nb,spam\n")
    with pytest.raises(DataError, match=r"one\.csv: column 'label' has a single class 'spam'"):
        load_labelled_texts(path)


def test_header_only_file(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match=r"header\.csv: contains no labelled rows"):
        load_labelled_texts(path)


def test_empty_json_list(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]")
    with pytest.raises(DataError, match=r"none\.json: contains no labelled rows"):
        load_labelled_texts(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.tsv: file is empty"):
        load_labelled_texts(path)


def test_short_row_names_the_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text,label\na,x\nb\n")
    with pytest.raises(DataError, match=r"short\.csv: line 3 has 1 field"):
        load_labelled_texts(path)


def test_empty_label_names_the_line(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("text,label\na,x\nb,\nc,y\n")
    with pytest.raises(DataError, match=r"gap\.csv: line 3: empty 'label'"):
        load_labelled_texts(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafé,x\nthé,y\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: line 2 is not valid UTF-8"):
        load_labelled_texts(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_labelled_texts(path)


def test_non_object_record(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"text": "a", "label": "x"}, ["b", "y"]]')
    with pytest.raises(DataError, match=r"list\.json: record 2: expected a JSON object"):
        load_labelled_texts(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"unknown format '\.xlsx'"):
        load_labelled_texts(path)


def test_same_text_and_label_column_is_a_value_error():
    with pytest.raises(ValueError, match="must differ"):
        load_labelled_texts(None, text_column="x", label_column="x")
