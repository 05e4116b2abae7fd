"""SCAN's vocabulary and tokenisation on real captions (tests/fixtures/precomp, README there).

With the committed SCAN vocabulary, our token ids for the committed Flickr30K captions equal SCAN's ``word2idx``
lookups of SCAN's tokenisation (nltk ``word_tokenize`` = punkt sentences, then Treebank words; SCAN
``data.py`` line 57–62), except the captions with an inner sentence end listed below. Without punkt installed,
SCAN's tokenisation is emulated with nltk's Punkt algorithm (untrained parameters, which need no data) knowing
the abbreviations that SCAN's vocabulary proves punkt kept whole (its words ending in a period: mr. dr. st. ...).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nltk.tokenize import TreebankWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from itmatch.text.tokenize import punkt_available, tokenize_all, tokenize_sentences
from itmatch.text.vocab import SPECIALS, Vocab, build_vocab, make_tokens, read_scan_vocab

FIX = Path(__file__).parent / "fixtures" / "precomp"
CAPS = FIX / "f30k_test_caps.txt"
VOCAB = FIX / "f30k_precomp_vocab.json"

#: 0-based lines of f30k_test_caps.txt whose whole-caption tokens differ from SCAN's punkt tokens: "E.S.E." is
#: no abbreviation punkt knows, so SCAN ends a sentence there ("e.s.e" "."), we keep "e.s.e." whole
MULTI_SENTENCE = {800, 801, 803}


def _captions() -> list[str]:
    return CAPS.read_text(encoding="utf-8").splitlines()


def _scan_tokens(text: str, word2idx: dict[str, int]) -> list[str]:
    """SCAN's tokenisation: nltk word_tokenize when punkt is installed, else its emulation (module docstring)."""
    if punkt_available():
        return tokenize_sentences(text)
    params = PunktParameters()
    params.abbrev_types = {w[:-1] for w in word2idx if w.endswith(".") and len(w) > 1}
    tb = TreebankWordTokenizer()
    return [w for s in PunktSentenceTokenizer(params).tokenize(text.lower()) for w in tb.tokenize(s)]


def _captions_parquet(path: Path, texts: list[str], splits: list[str]) -> Path:
    pd.DataFrame({"caption_id": np.arange(len(texts), dtype=np.int64),
                  "image_id": np.arange(len(texts), dtype=np.int64) // 5,
                  "split": splits, "text": texts}).to_parquet(path)
    return path


def test_scan_vocab_is_read_with_scan_ids():
    raw = json.loads(VOCAB.read_text(encoding="utf-8"))
    v = read_scan_vocab(VOCAB)
    assert len(v) == raw["idx"] == len(raw["word2idx"]) == 8481
    assert v.word2idx == raw["word2idx"]
    assert all(v.idx2word[int(i)] == w for i, w in raw["idx2word"].items())
    assert tuple(v.idx2word[:4]) == SPECIALS
    assert Vocab.load(VOCAB).idx2word == v.idx2word  # the generic reader recognises the format


def test_token_ids_equal_scan_lookups(tmp_path):
    """Acceptance: ids of the committed captions = SCAN's word2idx lookups of SCAN's tokens, but the listed."""
    caps = _captions()
    assert len(caps) == 1000
    word2idx = json.loads(VOCAB.read_text(encoding="utf-8"))["word2idx"]
    unk = word2idx["<unk>"]
    src = _captions_parquet(tmp_path / "captions.parquet", caps, ["test"] * len(caps))
    make_tokens(src, tmp_path / "vocab.json", tmp_path / "tokens.parquet", vocab_file=VOCAB, sentences=True)
    ours = pd.read_parquet(tmp_path / "tokens.parquet")["tokens"].tolist()
    differ = set()
    for i, (text, ids) in enumerate(zip(caps, ours, strict=True)):
        scan = [word2idx.get(w, unk) for w in _scan_tokens(text, word2idx)]
        if list(ids) != scan:
            differ.add(i)
    assert differ == (set() if punkt_available() else MULTI_SENTENCE), sorted(differ)
    # the vocabulary written for the later stages keeps SCAN's ids
    assert Vocab.load(tmp_path / "vocab.json").word2idx == word2idx
    # and SCAN's vocabulary covers these words: <unk> only for words too rare in train + dev (threshold 4)
    flat = np.concatenate([np.asarray(t) for t in ours])
    assert (flat == unk).mean() < 0.01


def test_multi_sentence_captions_are_the_measured_ones():
    """The listed captions are exactly those with a period inside that ends a sentence for punkt."""
    caps = _captions()
    word2idx = json.loads(VOCAB.read_text(encoding="utf-8"))["word2idx"]
    tokens = tokenize_all(caps)
    differ = {i for i, c in enumerate(caps) if tokens[i] != _scan_tokens(c, word2idx)}
    if not punkt_available():
        assert differ == MULTI_SENTENCE
    for i in MULTI_SENTENCE:
        assert "e.s.e." in tokens[i] and "E.S.E." in caps[i]


def test_default_vocabulary_counts_train_and_val_like_scan(tmp_path):
    """SCAN vocab.py (lines 73–100): train + dev captions, threshold 4, Counter order (first occurrence)."""
    caps = _captions()
    splits = ["train"] * 600 + ["val"] * 200 + ["test"] * 200
    src = _captions_parquet(tmp_path / "captions.parquet", caps, splits)
    v = make_tokens(src, tmp_path / "vocab.json", tmp_path / "tokens.parquet", vocab_splits=("train", "val"),
                    order="first")
    # SCAN's algorithm, step by step: count the train then dev files, keep count >= 4 in Counter order
    counter: Counter[str] = Counter()
    for text in caps[:800]:
        counter.update(tokenize_all([text], sentences=True)[0])
    expected = [*SPECIALS, *(w for w, c in counter.items() if c >= 4)]
    assert v.idx2word == expected
    # train only (our default for other datasets) gives fewer words
    v_train = build_vocab(tokenize_all(caps[:600]), 4)
    assert set(v_train.idx2word) < set(v.idx2word)
    assert v_train.idx2word[4:7] == sorted(v_train.idx2word[4:], key=lambda w: -v_train.counts[w])[:3]


@pytest.mark.parametrize("content, message", [
    ({"idx2word": {"0": "<pad>"}, "idx": 1}, "no 'word2idx'"),
    ({"word2idx": {"<pad>": 0, "<start>": 1, "<unk>": 2, "<end>": 3}}, "id 2 is '<unk>'"),
    ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5}}, "each once (word '<unk>' has id 5)"),
    ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": "3"}}, "word2idx['<unk>'] = '3'"),
    ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx2word": {"3": "dog"}},
     "idx2word[3] = 'dog' disagrees"),
])
def test_bad_scan_vocabulary_is_named(tmp_path, content, message):
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="bad_vocab.json") as e:
        read_scan_vocab(path)
    assert message in str(e.value)


def test_make_tokens_with_bad_vocabulary_writes_nothing(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps({"idx2word": ["<pad>", "<start>", "<end>"]}))
    src = _captions_parquet(tmp_path / "captions.parquet", _captions()[:10], ["train"] * 10)
    with pytest.raises(ValueError, match="v.json"):
        make_tokens(src, tmp_path / "vocab.json", tmp_path / "tokens.parquet", vocab_file=bad)
    assert not (tmp_path / "vocab.json").exists() and not (tmp_path / "tokens.parquet").exists()
