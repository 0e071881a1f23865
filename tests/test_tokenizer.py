"""data.Tokenizer against an independent oracle: transformers' pure-Python BERT tokenizer (its own
BasicTokenizer and WordpieceTokenizer, written in Python, sharing no code with the `tokenizers`
library data.Tokenizer is assembled from), on the real bert-base-uncased vocab.txt."""

import pytest

import data

# Accents, case, punctuation, CJK ideographs and punctuation, kana, Hangul, Greek and Cyrillic, numbers,
# emoji and words outside the vocabulary, control and zero-width characters, a word longer than the
# 100 characters WordPiece accepts, the empty text, and texts longer than max_length (truncated).
TEXTS = [
    "A man riding a WAVE on top of a surfboard.",
    "Café Zürich, 2 naïve dogs! ÉCOLE Über façade jalapeño",
    "unaffable 東京 tokens 你好，世界。 ひらがな カタカナ 안녕하세요",
    "Hello!!! (really?) -- yes; 'quoted' \"double\" [brackets] {braces} @#$%^&*_+=<>/\\|~`",
    "3.14159 1,000,000 2nd 42x 1990s -7 +3 50% $20 #1",
    "zzzqqqxxx 🙂 ⓐⓑⓒ Αθήνα Москва",
    "tabs\tand\nnewlines  and   spaces\u00a0nbsp \u200bzero\u200dwidth soft\u00adhyphen \x07bell",
    "a" * 150 + " short",
    "",
    "one two three four five six seven eight nine ten eleven twelve thirteen",
]


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """The pure-Python tokenizer: BertTokenizerLegacy in transformers 5 (where BertTokenizer itself
    runs on the `tokenizers` library), BertTokenizer (the slow one) before."""
    import os
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:
        from transformers import BertTokenizer as Slow
    ref = Slow(os.path.join(minilm_dir, "vocab.txt"), do_lower_case=True)
    assert not ref.is_fast and not hasattr(ref, "backend_tokenizer"), "must not be built on `tokenizers`"
    return ref, os.path.join(minilm_dir, "vocab.txt")


@pytest.mark.parametrize("max_length", [12, 40])
def test_encode_matches_pure_python_bert_tokenizer(reference, max_length):
    ref, vocab = reference
    tok = data.Tokenizer(vocab, max_length=max_length)
    for text in TEXTS:
        # truncation keeps [CLS] ... [SEP]: the last word pieces are dropped, never the markers
        assert tok.encode(text) == ref.encode(text, truncation=True, max_length=max_length), text
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.vocab_size) == (
        ref.cls_token_id, ref.sep_token_id, ref.mask_token_id, ref.pad_token_id, len(ref.vocab))


def test_pieces_and_wrap_match(reference):
    """pieces(): the caption index's word pieces, without markers or truncation; wrap() then adds
    the markers and truncates as encode() does."""
    ref, vocab = reference
    tok = data.Tokenizer(vocab, max_length=12)
    pieces = tok.pieces(TEXTS)
    for text, ours in zip(TEXTS, pieces):
        assert ours == ref.encode(text, add_special_tokens=False), text
        assert tok.wrap(ours) == tok.encode(text)
    long = TEXTS[-1]
    assert len(pieces[-1]) > 12 and len(tok.encode(long)) == 12  # truncation is per call, not left on


def test_errors(tmp_path):
    with pytest.raises(data.DataError, match="vocabulary file not found"):
        data.Tokenizer(str(tmp_path / "none.txt"))
    (tmp_path / "v.txt").write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(data.DataError, match=r"\[PAD\] at id 0"):
        data.Tokenizer(str(tmp_path / "v.txt"))
