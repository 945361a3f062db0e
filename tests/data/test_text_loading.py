import gzip

import pytest

from rnnkit.data import DataError, load_text


def test_embedded_shakespeare_is_cleaned_play_text():
    text = load_text()
    assert 1_000_000 < len(text) < 1_300_000
    assert text.startswith("BERNARDO:\nWho's there?\n")
    assert "HAMLET:\nTo be, or not to be" in text
    # markdown and stage directions are gone
    for marker in ("**", "_Enter", "# ", "\\"):
        assert marker not in text
    assert len(set(text)) < 80


def test_user_text_file_with_crlf_and_bom(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffhello\r\nwörld\r\n".encode())
    assert load_text(path) == "hello\nwörld\n"


def test_gzip_text_file(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"abc\ndef\n"))
    assert load_text(str(path)) == "abc\ndef\n"


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_text(path)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_text(tmp_path)


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_or_blank_file(tmp_path, content):
    path = tmp_path / "blank.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"blank\.txt: (file is empty|contains only whitespace)"):
        load_text(path)


def test_invalid_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: line 2 is not valid UTF-8 \(byte 0xe9"):
        load_text(path)


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match="binary"):
        load_text(path)


def test_utf16_is_reported_as_not_utf8(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes("hello".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-8"):
        load_text(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"broken\.txt\.gz: not a readable gzip file"):
        load_text(path)


def test_path_type_is_checked():
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        load_text(42)
