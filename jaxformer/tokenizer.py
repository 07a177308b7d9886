"""Char-level and byte-level BPE tokenizers, as plain HF `tokenizers.Tokenizer`s.

Both kinds carry one special token, `<|endoftext|>` (EOT), which the data
pipeline places after every document. A tokenizer lives in one `tokenizer.json`
(HF format); its `fingerprint` goes into data manifests and checkpoints so that
token ids are never silently read with another vocabulary.
"""

from collections.abc import Iterable
import hashlib
import json

from etils import epath
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
KINDS = ("char", "bpe")


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
  # No unk token in the vocab: an unseen character is an error, never a silent id.
  tok = Tokenizer(models.WordLevel(vocab))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
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


def kind(tok: Tokenizer) -> str:
  """"char" or "bpe", read off the tokenizer's model."""
  return "char" if isinstance(tok.model, models.WordLevel) else "bpe"


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


def encode(tok: Tokenizer, text: str) -> list[int]:
  """Token ids of `text`; a literal `<|endoftext|>` becomes the EOT token."""
  missing = unseen_chars(tok, text)
  if missing:
    listed = ", ".join(repr(ch) for ch in missing)
    raise TokenizerError(
        f"the prompt contains characters the char tokenizer has never seen: {listed}; "
        "use only characters from the training text or train with data.tokenizer=bpe.")
  return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
  """Text of `ids`, EOT written as `<|endoftext|>`; ids >= V (model padding) are dropped."""
  v = vocab_size(tok)
  return tok.decode([int(i) for i in ids if 0 <= int(i) < v], skip_special_tokens=False)
