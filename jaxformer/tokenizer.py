"""Char-level, byte-level BPE and plain byte tokenizers, as HF `tokenizers.Tokenizer`s.

Every kind carries the special token `<|endoftext|>` (EOT), which the data
pipeline places after every document; char tokenizers also reserve `<|unk|>`
for characters outside their vocabulary (used only where data.unknown_chars=unk). A tokenizer lives in one `tokenizer.json`
(HF format); its `fingerprint` goes into data manifests and checkpoints so that
token ids are never silently read with another vocabulary.
"""

from collections.abc import Iterable
import hashlib
import json

from etils import epath
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import numpy as np

EOT = "<|endoftext|>"
UNK = "<|unk|>"
KINDS = ("char", "bpe", "byte")
VERSION = 2  # in the tokenizer cache's key; 2: char tokenizers reserve <|unk|>
UNKNOWN_POLICIES = ("error", "unk")


class TokenizerError(ValueError):
  """Text or a setting the tokenizer cannot take; the message says what to change."""

# Byte-level BPE starts from the 256 byte symbols; EOT is one more.
MIN_BPE_VOCAB = 256 + 1


def train_char(texts: Iterable[str]) -> Tokenizer:
  """A char tokenizer over the sorted characters of `texts`, then EOT.

  Every character is its own pre-token and the decoder concatenates, so
  whitespace, newlines and repeated spaces round-trip exactly.
  """
  alphabet = set()
  for text in texts:
    alphabet.update(text)
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  vocab[EOT] = len(vocab)
  vocab[UNK] = len(vocab)
  # `encode` refuses unseen characters unless asked to map them, so UNK is never a silent id.
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([EOT, UNK])
  return tok


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizes to)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  moved = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_tokenizer() -> Tokenizer:
  """Token id = UTF-8 byte value (0..255), EOT = 256: any text, nothing to train.

  A BPE model with no merges over GPT-2's byte alphabet, so it shares the
  ByteLevel decoding (and byte accounting) of the BPE kind.
  """
  vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([EOT])
  return tok


def check_bpe_vocab_size(vocab_size: int) -> None:
  """Byte-level BPE cannot have fewer tokens than its alphabet (256 bytes + EOT)."""
  if vocab_size < MIN_BPE_VOCAB:
    raise TokenizerError(
        f"data.bpe_vocab_size={vocab_size} is smaller than the byte-level alphabet "
        f"(256 bytes + {EOT}); set data.bpe_vocab_size to at least {MIN_BPE_VOCAB}.")


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
  """A GPT-2 style byte-level BPE tokenizer trained on `texts`; EOT has id 0."""
  check_bpe_vocab_size(vocab_size)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[EOT],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=show_progress)
  tok.train_from_iterator(texts, trainer)
  return tok


def train_tokenizer(kind_: str, texts: Iterable[str], bpe_vocab_size: int = 0) -> Tokenizer:
  """A tokenizer of kind `kind_` (KINDS) for `texts` (the byte tokenizer reads none)."""
  if kind_ == "char":
    return train_char(texts)
  if kind_ == "bpe":
    return train_bpe(texts, bpe_vocab_size)
  return byte_tokenizer()


def kind(tok: Tokenizer) -> str:
  """"char", "bpe" or "byte", read off the tokenizer's model."""
  if isinstance(tok.model, models.WordLevel):
    return "char"
  # A trained BPE gives EOT id 0 (special tokens first); the byte tokenizer gives it 256.
  return "byte" if vocab_size(tok) == 257 and tok.token_to_id(EOT) == 256 else "bpe"


def unk_id(tok: Tokenizer) -> int | None:
  """The id unknown characters map to (char tokenizers from before `<|unk|>` have none)."""
  return tok.token_to_id(UNK)


def token_bytes(tok: Tokenizer) -> np.ndarray:
  """(V,) int64: how many bytes of UTF-8 text each token id stands for.

  Special tokens (EOT) stand for no text: 0 bytes. `<|unk|>` stands for one
  character of unknown width; it counts 1 byte. Byte-level tokens are written
  in GPT-2's one-character-per-byte alphabet, so their length is their bytes.
  """
  special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  char_kind = kind(tok) == "char"
  out = np.zeros(vocab_size(tok), np.int64)
  for token, i in tok.get_vocab(with_added_tokens=True).items():
    if token == UNK:
      out[i] = 1
    elif token not in special:
      out[i] = len(token.encode("utf-8")) if char_kind else len(token)
  return out


def load_tokenizer(path: str) -> Tokenizer:
  """Reads a `tokenizer.json` (or the `tokenizer.json` inside a directory)."""
  file = epath.Path(path)  # local or in a bucket
  if file.is_dir():
    file = file / "tokenizer.json"
  if not file.exists():
    raise FileNotFoundError(f"no tokenizer at {file}; train one first (a training run writes tokenizer.json).")
  try:
    return Tokenizer.from_str(file.read_text())
  except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
    raise TokenizerError(f"{file} is not a readable tokenizer ({str(err).splitlines()[0][:120]}); restore the "
                         "run's tokenizer.json from a copy, or start a new --workdir.") from None


def fingerprint(tok: Tokenizer) -> str:
  """Short sha256 of the tokenizer's canonical JSON: same vocab and rules, same print."""
  canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def eot_id(tok: Tokenizer) -> int:
  return tok.token_to_id(EOT)


def vocab_size(tok: Tokenizer) -> int:
  """V, special tokens included (the model may pad it further)."""
  return tok.get_vocab_size(with_added_tokens=True)


def unseen_chars(tok: Tokenizer, text: str) -> list[str]:
  """Characters of `text` a char tokenizer cannot encode (always [] for BPE)."""
  if kind(tok) != "char":
    return []
  vocab = tok.get_vocab(with_added_tokens=False)
  # EOT itself is encodable as a whole even where its characters are not.
  return sorted(ch for ch in set(text.replace(EOT, "")) if ch not in vocab)


def check_unknown(tok: Tokenizer, missing: list[str], unknown: str, what: str) -> None:
  """Refuses characters outside a char vocabulary unless `unknown` is "unk" and there is an id for them."""
  if not missing:
    return
  listed = ", ".join(repr(ch) for ch in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
  if unknown != "unk":
    raise TokenizerError(
        f"{what} holds characters the run's char tokenizer has never seen: {listed}; pass "
        "--config.data.unknown_chars=unk to map them to <|unk|>, or train with data.tokenizer=byte or bpe.")
  if unk_id(tok) is None:
    raise TokenizerError(
        f"{what} holds characters the run's char tokenizer has never seen ({listed}), and this tokenizer "
        f"predates {UNK} so cannot map them; remove them from the text, or train a new run.")


def encode(tok: Tokenizer, text: str, unknown: str = "error", what: str = "the prompt") -> list[int]:
  """Token ids of `text`; a literal `<|endoftext|>` becomes EOT.

  Characters a char tokenizer has never seen are refused naming them, or with
  `unknown="unk"` become `<|unk|>`.
  """
  check_unknown(tok, unseen_chars(tok, text), unknown, what)
  return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
  """Text of `ids`, EOT written as `<|endoftext|>`; ids >= V (model padding) are dropped."""
  v = vocab_size(tok)
  return tok.decode([int(i) for i in ids if 0 <= int(i) < v], skip_special_tokens=False)
