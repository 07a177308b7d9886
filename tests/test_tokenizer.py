"""Char, byte-level BPE and byte tokenizers: round trips, refusals, unknown characters, byte accounting."""

import math

import numpy as np
import pytest

from jaxformer import metrics

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


def test_char_vocab_is_sorted_alphabet_then_eot_and_unk():
  tok = tk.train_char(["cab\n", "ba c"])
  assert tk.vocab_size(tok) == 5 + 2
  assert tk.eot_id(tok) == 5 and tk.unk_id(tok) == 6
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
  assert "never seen" in msg and "data.unknown_chars=unk" in msg and "data.tokenizer=byte or bpe" in msg


def test_unknown_characters_map_to_unk_only_when_asked():
  tok = tk.train_char(["hello world"])
  ids = tk.encode(tok, "hello @ Zorld Z", unknown="unk")
  assert ids.count(tk.unk_id(tok)) == 3 and len(ids) == len("hello @ Zorld Z")
  assert tk.decode(tok, ids[:5]) == "hello"
  # A char tokenizer from before <|unk|> cannot map them, and says so.
  old = tk.Tokenizer.from_str(tk.train_char(["hello world"]).to_str().replace(tk.UNK, "<|gone|>"))
  old.model = tk.models.WordLevel({ch: i for ch, i in old.get_vocab().items() if ch != "<|gone|>"})
  assert tk.unk_id(old) is None
  with pytest.raises(tk.TokenizerError, match="predates <\\|unk\\|>"):
    tk.encode(old, "hello @", unknown="unk")


MULTI_BYTE = "naïve café — “quotes” 🙂 日本語, and plain ASCII.\n"


def test_byte_tokenizer_ids_are_the_utf8_bytes():
  tok = tk.byte_tokenizer()
  assert (tk.kind(tok), tk.vocab_size(tok), tk.eot_id(tok)) == ("byte", 257, 256)
  ids = tk.encode(tok, MULTI_BYTE + "<|endoftext|>x")
  assert ids == list(MULTI_BYTE.encode("utf-8")) + [256, ord("x")]
  assert tk.decode(tok, ids) == MULTI_BYTE + "<|endoftext|>x"
  assert tk.kind(tk.train_bpe(CORPUS, 257, show_progress=False)) == "bpe"  # same size, EOT first: not "byte"


@pytest.mark.parametrize("kind", ["char", "bpe", "byte"])
def test_token_bytes_add_up_to_the_texts_utf8_bytes(kind):
  tok = tk.train_tokenizer(kind, CORPUS + [MULTI_BYTE, TRICKY], 300)
  table = tk.token_bytes(tok)
  assert table.shape == (tk.vocab_size(tok),) and table[tk.eot_id(tok)] == 0
  for text in (MULTI_BYTE, TRICKY, CORPUS[1]):
    ids = tk.encode(tok, text + "<|endoftext|>")
    # Every scored token counts the bytes it stands for; a character split over byte tokens counts once.
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
  if kind == "char":
    assert table[tk.encode(tok, "🙂")[0]] == 4 and table[tk.encode(tok, "é")[0]] == 2


def test_bits_per_byte_of_known_distributions():
  text = MULTI_BYTE * 3
  byte = tk.byte_tokenizer()
  ids = np.array(tk.encode(byte, text), np.int32)[None, :]
  batch = {"targets": ids, "weights": np.ones(ids.shape, np.float32)}
  per_token = metrics.bytes_per_token([batch], tk.token_bytes(byte))
  assert per_token == 1.0
  # A model uniform over the 256 byte values spends exactly 8 bits on every byte.
  assert metrics.bits_per_byte(math.log(256), per_token) == pytest.approx(8.0, abs=1e-12)
  # The same text as characters: fewer tokens, same bytes; a uniform model over the 20 distinct
  # characters costs log2(20) bits per character, i.e. per byte that / (bytes per character).
  char = tk.train_char([text])
  cids = np.array(tk.encode(char, text), np.int32)[None, :]
  padded = {"targets": np.concatenate([cids, np.zeros_like(cids)]),  # a padding row, weight 0: not counted
            "weights": np.concatenate([np.ones(cids.shape, np.float32), np.zeros(cids.shape, np.float32)])}
  per_char = metrics.bytes_per_token([padded], tk.token_bytes(char))
  assert per_char == pytest.approx(len(text.encode("utf-8")) / len(text), abs=1e-12)
  n = len(set(text))
  assert metrics.bits_per_byte(math.log(n), per_char) == pytest.approx(
      math.log2(n) * len(text) / len(text.encode("utf-8")), abs=1e-12)


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
