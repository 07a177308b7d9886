"""Char and byte-level BPE tokenizers: round trips, refusals, save/load, fingerprints."""

import pytest

from jaxformer import runs
from jaxformer import tokenizer as tk

CORPUS = [
    "The cat sat on the mat.\nThe dog sat  on the log.\n\n",
    "Once upon a time, there was a little girl named Lily.\tShe liked the sun.",
    "Hello, world! Hello again, world...   ",
] * 4
TRICKY = " leading\n\n\ttabs  and   spaces\r\ntrailing  \n"


def test_char_round_trips_whitespace_exactly():
  tok = tk.train_char(CORPUS + [TRICKY])
  for text in (TRICKY, "  ", "\n", "", CORPUS[0], "a<|endoftext|>b\n"):
    assert tk.decode(tok, tk.encode(tok, text)) == text
  assert len(tk.encode(tok, "  \n\n")) == 4  # one token per character


def test_char_vocab_is_sorted_alphabet_then_eot():
  tok = tk.train_char(["cab\n", "ba c"])
  assert tk.vocab_size(tok) == 5 + 1
  assert tk.eot_id(tok) == 5
  assert tk.encode(tok, "\n abc") == [0, 1, 2, 3, 4]
  assert tk.encode(tok, "a<|endoftext|>") == [2, 5]
  assert tk.kind(tok) == "char"


def test_char_unicode_in_alphabet_round_trips():
  text = "naïve café — “quotes” 🙂 日本"
  tok = tk.train_char([text])
  ids = tk.encode(tok, text)
  assert len(ids) == len(text)
  assert tk.decode(tok, ids) == text


def test_char_refuses_unseen_characters_and_lists_them():
  tok = tk.train_char(["hello world"])
  with pytest.raises(ValueError) as e:
    tk.encode(tok, "hello @ Zorld Z")
  msg = str(e.value)
  assert "'@', 'Z'" in msg
  assert "never seen" in msg and "data.tokenizer=bpe" in msg


def test_bpe_round_trips_any_text():
  tok = tk.train_bpe(CORPUS, 300, show_progress=False)
  assert tk.kind(tok) == "bpe"
  assert tk.eot_id(tok) == 0
  for text in (TRICKY, "", " ", "naïve café — “quotes” 🙂 日本語\u0000\x7f", "xyzzy QWERTY 12345",
               "story one<|endoftext|>story two", "a\n\n\n\nb   c"):
    assert tk.decode(tok, tk.encode(tok, text)) == text
  # Merges were learned: common words take fewer tokens than bytes.
  assert len(tk.encode(tok, "The cat sat on the mat.")) < len("The cat sat on the mat.")


def test_bpe_vocab_smaller_than_alphabet_is_refused():
  with pytest.raises(ValueError, match=r"smaller than the byte-level alphabet.*at least 257"):
    tk.train_bpe(CORPUS, 256)
  assert tk.vocab_size(tk.train_bpe(CORPUS, 257, show_progress=False)) == 257


def test_decode_drops_padding_ids():
  tok = tk.train_char(["ab"])
  v = tk.vocab_size(tok)
  assert tk.decode(tok, [0, v, 1, v + 5, 2]) == "ab<|endoftext|>"


def test_save_load_keeps_fingerprint_and_ids(tmp_path):
  for tok in (tk.train_char(CORPUS + [TRICKY]), tk.train_bpe(CORPUS, 300, show_progress=False)):
    path = str(tmp_path / f"{tk.kind(tok)}" / "tokenizer.json")
    runs.atomic_write(path, tok.to_str())
    loaded = tk.load_tokenizer(path)
    assert tk.fingerprint(loaded) == tk.fingerprint(tok)
    assert tk.encode(loaded, TRICKY) == tk.encode(tok, TRICKY)
    assert tk.fingerprint(tk.load_tokenizer(str(tmp_path / tk.kind(tok)))) == tk.fingerprint(tok)
  assert sorted(p.name for p in (tmp_path / "char").iterdir()) == ["tokenizer.json"]  # no temp files left


def test_fingerprint_is_stable_and_tells_tokenizers_apart():
  char_a, char_b = tk.train_char(CORPUS), tk.train_char(CORPUS)
  bpe_a, bpe_b = (tk.train_bpe(CORPUS, 300, show_progress=False) for _ in range(2))
  assert tk.fingerprint(char_a) == tk.fingerprint(char_b)
  assert tk.fingerprint(bpe_a) == tk.fingerprint(bpe_b)  # training is deterministic
  prints = {tk.fingerprint(t) for t in (char_a, bpe_a, tk.train_char(CORPUS + ["Z"]),
                                        tk.train_bpe(CORPUS, 280, show_progress=False))}
  assert len(prints) == 4
  assert all(len(p) == 16 for p in prints)


def test_load_missing_tokenizer_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer at"):
    tk.load_tokenizer(str(tmp_path / "nope.json"))
