"""Text sources: the config's `data` section -> a stream of train and validation text.

Three sources, chosen by `data.source`:
  stories  the built-in story generator (`jaxformer.data.stories`); the last
           `valid_fraction` of stories are validation, with their log-probs.
  text     local files: .txt, .jsonl/.json, .parquet, .csv, optionally compressed
           (.gz, .bz2, .xz, .zst); `data.path` takes comma-separated paths and globs.
  hf       a Hugging Face hub dataset by name, config, revision and splits
           (memory-mapped Arrow, or `data.hf_streaming` to stream it).

A source is never held in memory whole (stories excepted: they are small and
generated). `Source.stream()` reads it afresh each time as pieces
(split, text, end): consecutive pieces make one document, `end` marks its last
piece; a long document (a whole book) comes in pieces cut where no token can
cross, so it tokenizes in parallel and in bounded memory with the same ids.

`describe_source` says what a source is without reading it (file sizes and
mtimes of the expanded globs, hub name and revision, generator settings); the
data cache is keyed by it.
"""

from collections.abc import Callable, Iterator
import contextlib
import fractions
import glob
import hashlib
import io
import itertools
import json
import lzma
import os
import re
from typing import NamedTuple

import numpy as np

TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BLOCK_CHARS = 1 << 20     # characters read from a .txt file at a time
PIECE_CHARS = 1 << 18     # long documents are cut into pieces of at least this many characters
LOOKAHEAD_CHARS = 1 << 26  # text held while deciding whether a corpus is too short for the streaming split

Piece = tuple[str, str, bool]  # (split "train" | "valid", text, last piece of its document)


class DataError(ValueError):
  """Bad data input; the message names the problem and the fix in one sentence."""


class Source(NamedTuple):
  description: dict                       # describe_source(...) of this source
  stream: Callable[[], Iterator[Piece]]   # a fresh pass over the text, in a fixed order
  valid_logps: np.ndarray | None = None   # log p(document) in nats, float64 (stories only)


def cache_root(data_config) -> str:
  """Where jaxformer keeps token arrays and tokenizers (`data.cache_dir`)."""
  root = data_config.cache_dir or os.path.join("~", ".cache", "jaxformer")
  return os.path.abspath(os.path.expanduser(root))


# --- describing a source (cheap: nothing is read) ------------------------------------------------


def _paths(data_config) -> list[str]:
  """`data.path` expanded: comma-separated entries, each a path or a glob (sorted matches)."""
  entries = [p.strip() for p in str(data_config.path).split(",") if p.strip()]
  if not entries:
    raise DataError("data.source=text needs data.path; set --config.data.path=FILE "
                    "(or FILE1,FILE2, or 'DIR/*.jsonl.gz').")
  paths = []
  for entry in entries:
    entry = os.path.abspath(os.path.expanduser(entry))
    if not glob.has_magic(entry):
      paths.append(entry)
      continue
    matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
    if not matches:
      raise DataError(f"data.path pattern {entry} matches no files; check the pattern (quote it so the shell "
                      "does not expand it).")
    paths.extend(matches)
  return list(dict.fromkeys(paths))  # a file named twice is read once


def file_format(path: str) -> tuple[str, str | None]:
  """(".jsonl", ".gz") for "a.jsonl.gz": the text format and the compression (None: plain)."""
  stem, ext = os.path.splitext(path)
  compression = None
  if ext.lower() in COMPRESSIONS:
    stem, compression = stem, ext.lower()
    ext = os.path.splitext(stem)[1]
  return ext.lower(), compression


def _describe_file(path: str) -> dict:
  ext, compression = file_format(path)
  if ext not in TEXT_BUILDERS:
    raise DataError(f"data file {path} has extension {ext or '(none)'!r}; use one of {', '.join(TEXT_BUILDERS)} "
                    f"(optionally compressed: {', '.join(COMPRESSIONS)}).")
  if ext == ".parquet" and compression:
    raise DataError(f"data file {path} is a compressed parquet file; parquet compresses inside, so store it "
                    "uncompressed (drop the outer compression).")
  if not os.path.isfile(path):
    raise DataError(f"data file {path} does not exist; check --config.data.path.")
  stat = os.stat(path)
  if stat.st_size == 0:
    raise DataError(f"data file {path} is empty; point --config.data.path at a file with text in it.")
  return {"path": path, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _generator_hash() -> str:
  """Hash of the story generator's source, so changing it invalidates caches."""
  from jaxformer.data import stories  # pylint: disable=g-import-not-at-top
  path = getattr(stories, "__file__", None)
  if not path or not os.path.exists(path):
    return "unknown"
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def describe_source(data_config) -> dict:
  """What the source is, cheaply (nothing is read or downloaded); JSON-serialisable."""
  d = data_config
  if d.source == "stories":
    return {"kind": "stories", "num_stories": int(d.num_stories), "seed": int(d.stories_seed),
            "valid_fraction": float(d.valid_fraction), "generator": _generator_hash()}
  if d.source == "text":
    return {"kind": "text", "files": [_describe_file(p) for p in _paths(d)],
            "doc_separator": d.doc_separator, "text_field": d.text_field,
            "valid_fraction": float(d.valid_fraction)}
  if d.source == "hf":
    if not d.hf_name:
      raise DataError("data.source=hf needs data.hf_name; set --config.data.hf_name=OWNER/DATASET.")
    return {"kind": "hf", "name": d.hf_name, "config": d.hf_config, "revision": d.hf_revision,
            "split_train": d.hf_split_train, "split_valid": d.hf_split_valid,
            "text_field": d.text_field, "valid_fraction": float(d.valid_fraction)}
  raise DataError(f"data.source must be stories, text or hf, got {d.source!r}.")


# --- the validation split, chosen while streaming ------------------------------------------------


def holdout_indices(num_docs: int, valid_fraction: float) -> np.ndarray:
  """Validation documents of a short corpus: `valid_fraction` of them, evenly spaced, at least one."""
  num_valid = min(max(1, round(valid_fraction * num_docs)), num_docs - 1)
  return ((np.arange(num_valid) + 0.5) * num_docs / num_valid).astype(np.int64)


def holdout_rule(valid_fraction: float) -> Callable[[int], bool]:
  """A test of whether document i is held out: the middle one of every 1/valid_fraction (5, 15, 25, ... at 0.1).

  Document j of the validation split is number floor((j + 0.5) / valid_fraction),
  which is `holdout_indices` when the corpus has a multiple of 1/valid_fraction
  documents; but it needs no document count, so a stream can be split as it goes.
  Exact rational arithmetic: the same split on every machine.
  """
  f = fractions.Fraction(valid_fraction).limit_denominator(1_000_000)
  p, q = f.numerator, f.denominator

  def held_before(n):  # #{j >= 0 : (j + 0.5) / f < n} = ceil(n f - 1/2)
    return max(0, -((q - 2 * n * p) // (2 * q)))

  return lambda i: held_before(i + 1) > held_before(i)


def _documents(pieces: list[tuple[str, bool]]) -> list[list[str]]:
  docs, current = [], []
  for text, end in pieces:
    current.append(text)
    if end:
      docs.append(current)
      current = []
  return docs


def cut_document(pieces: Iterator[tuple[str, bool]], num_chars: int, valid_fraction: float) -> Iterator[Piece]:
  """One document of `num_chars` characters split on characters: the head trains, the tail validates.

  As nanoGPT's int(n * 0.9) for Tiny Shakespeare; streamed, so the document may be any size.
  """
  cut = int(num_chars * (1.0 - valid_fraction))
  pos, split = 0, "train"
  for text, end in pieces:
    size = len(text)
    if split == "train" and pos + size >= cut:
      yield "train", text[:cut - pos], True
      split, text = "valid", text[cut - pos:]
    pos += size
    yield split, text, end


def split_stream(pieces: Iterator[tuple[str, bool]], valid_fraction: float, what: str) -> Iterator[Piece]:
  """Documents (as pieces) -> (split, text, end), holding out documents by index (`holdout_rule`).

  A corpus too short for that rule to hold one out (at most 1/(2 valid_fraction)
  documents) is split as before streaming: `holdout_indices`, or one document on
  characters. Only those few first documents are held to find out.
  """
  is_valid = holdout_rule(valid_fraction)
  first_valid = next(i for i in itertools.count() if is_valid(i))
  head, docs, chars = [], 0, 0
  pieces = iter(pieces)
  for text, end in pieces:
    head.append((text, end))
    docs, chars = docs + end, chars + len(text)
    if docs > first_valid or chars > LOOKAHEAD_CHARS:
      break
  else:  # the whole corpus is in `head`
    whole = _documents(head)
    if not whole:
      raise DataError(f"{what} holds no text (only whitespace or separators); point it at text.")
    if len(whole) == 1:
      text = "".join(whole[0])
      yield from cut_document(_doc_pieces(text), len(text), valid_fraction)
      return
    valid = set(holdout_indices(len(whole), valid_fraction).tolist())
    for i, doc in enumerate(whole):
      for j, text in enumerate(doc):
        yield ("valid" if i in valid else "train"), text, j == len(doc) - 1
    return
  i = 0
  for text, end in itertools.chain(head, pieces):
    yield ("valid" if is_valid(i) else "train"), text, end
    i += end


# --- reading local files -------------------------------------------------------------------------

# Byte-level BPE pre-tokens never span a newline that has non-space on both sides
# (and char and byte tokens never span anything), so cutting there leaves the ids unchanged.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def split_long(doc: str, size: int | None = None) -> list[str]:
  """`doc` cut into pieces of at least `size` (PIECE_CHARS) characters at token-safe places."""
  size = size or PIECE_CHARS
  pieces, start = [], 0
  while len(doc) - start > size:
    cut = _SAFE_CUT.search(doc, start + size)
    if cut is None:
      break
    pieces.append(doc[start:cut.start()])
    start = cut.start()
  pieces.append(doc[start:])
  return pieces


def _doc_pieces(doc: str) -> Iterator[tuple[str, bool]]:
  pieces = split_long(doc)
  for j, piece in enumerate(pieces):
    yield piece, j == len(pieces) - 1


def open_binary(path: str):
  """The file's bytes, decompressed by its extension (pyarrow carries gzip, bz2 and zstd; lzma does xz)."""
  compression = file_format(path)[1]
  if compression is None:
    return open(path, "rb")
  if compression == ".xz":
    return lzma.open(path, "rb")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.input_stream(path, compression={".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}[compression])


def open_text(path: str):
  # Universal newlines ("\r\n" -> "\n"), as datasets' text builder and open() read text.
  return io.TextIOWrapper(open_binary(path), encoding="utf-8")


def _txt_doc_end(doc: str, started: bool, sep: str) -> Iterator[tuple[str, bool]]:
  """The last piece of a .txt document (`started`: its head was handed out already)."""
  if sep:  # separated documents are stripped, and empty ones dropped
    doc = doc.rstrip() if started else doc.strip()
  if started:
    yield doc, True
  elif doc.strip():
    yield from _doc_pieces(doc)


def _txt_pieces(f, sep: str) -> Iterator[tuple[str, bool]]:
  """The documents of a text stream: split on `sep`, or (sep "") the whole text is one document.

  Read a block at a time; a document longer than 2 PIECE_CHARS is handed out in
  pieces as it is read, so memory stays bounded whatever its size.
  """
  buf, started = "", False
  while True:
    block = f.read(BLOCK_CHARS)
    buf += block
    pos = 0
    while sep and (i := buf.find(sep, pos)) >= 0:
      yield from _txt_doc_end(buf[pos:i], started, sep)
      started, pos = False, i + len(sep)
    buf = buf[pos:]
    if not block:
      yield from _txt_doc_end(buf, started, sep)
      return
    keep = len(sep)  # a separator may straddle two blocks: never cut into the last len(sep) characters
    while len(buf) > 2 * PIECE_CHARS + keep and (cut := _SAFE_CUT.search(buf, PIECE_CHARS, len(buf) - keep)):
      piece, buf = buf[:cut.start()], buf[cut.start():]
      yield (piece.lstrip() if sep and not started else piece), False
      started = True


def _no_field(where: str, field: str, fields) -> DataError:
  return DataError(f"{where} has no field {field!r}; its fields are {', '.join(map(repr, fields))}; "
                   "set --config.data.text_field to one of them.")


def _records(texts) -> Iterator[tuple[str, bool]]:
  for text in texts:
    if isinstance(text, str) and text.strip():
      yield from _doc_pieces(text)


def _json_texts(f, field: str, path: str) -> Iterator:
  """The `field` of each record of JSON lines (or of a JSON array, which is read whole)."""
  head = f.read(1)
  while head.isspace():
    head = f.read(1)
  rows = json.loads(head + f.read()) if head == "[" else (json.loads(line) for line in
                                                          itertools.chain([head + f.readline()], f) if line.strip())
  for n, row in enumerate(rows):
    if not isinstance(row, dict):
      raise DataError(f"data file {path} holds a {type(row).__name__} where a JSON object was expected; "
                      "write one object per line.")
    if n == 0 and field not in row:
      raise _no_field(f"data file {path}", field, row)
    yield row.get(field)


def _arrow_texts(batches, schema, field: str, path: str) -> Iterator:
  if field not in schema.names:
    raise _no_field(f"data file {path}", field, schema.names)
  for batch in batches:
    yield from batch.column(field).to_pylist()


def _file_texts(path: str, ext: str, field: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if ext == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    columns = [field] if field in names else None
    yield from _arrow_texts(pf.iter_batches(batch_size=1024, columns=columns), pf.schema_arrow, field, path)
  elif ext == ".csv":
    import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top
    with open_binary(path) as f:
      reader = pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(column_types={field: pa.string()}))
      yield from _arrow_texts(reader, reader.schema, field, path)
  else:
    with open_text(path) as f:
      yield from _json_texts(f, field, path)


@contextlib.contextmanager
def _reading(path: str):
  """Turns what a broken or mislabelled file raises into one DataError naming it."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  try:
    yield
  except DataError:
    raise
  except (OSError, EOFError, ValueError, lzma.LZMAError, pa.ArrowException) as e:
    ext, compression = file_format(path)
    names = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
    what = f"{names[compression]}-compressed {TEXT_BUILDERS[ext]}" if compression else TEXT_BUILDERS[ext]
    raise DataError(f"could not read data file {path} as {what} ({type(e).__name__}: {str(e)[:200]}); check the "
                    "file is complete and its format matches its extension.") from e


def _file_pieces(path: str, data_config) -> Iterator[tuple[str, bool]]:
  """The documents of one local file, in pieces."""
  with _reading(path):
    if file_format(path)[0] == ".txt":
      with open_text(path) as f:
        yield from _txt_pieces(f, data_config.doc_separator)
    else:
      yield from _records(_file_texts(path, file_format(path)[0], data_config.text_field))


def count_chars(path: str) -> int:
  """Characters in a text file as `open_text` reads it (one streaming pass)."""
  with _reading(path), open_text(path) as f:
    return sum(len(block) for block in iter(lambda: f.read(BLOCK_CHARS), ""))


def _text_stream(data_config, description: dict) -> Iterator[Piece]:
  files = [f["path"] for f in description["files"]]
  what = f"data.path {data_config.path}"
  if data_config.doc_separator or any(file_format(p)[0] != ".txt" for p in files):
    pieces = itertools.chain.from_iterable(_file_pieces(p, data_config) for p in files)
    yield from split_stream(pieces, data_config.valid_fraction, what)
    return
  # Text files without a separator: each file is one document, so their number is known unread.
  if len(files) == 1:  # one document (a book, Tiny Shakespeare): split on characters
    pieces = _file_pieces(files[0], data_config)
    first = next(pieces, None)
    if first is None:
      raise DataError(f"{what} holds no text (only whitespace); point it at a file with text in it.")
    yield from cut_document(itertools.chain([first], pieces), count_chars(files[0]), data_config.valid_fraction)
    return
  valid, empty = set(holdout_indices(len(files), data_config.valid_fraction).tolist()), True
  for i, path in enumerate(files):
    for text, end in _file_pieces(path, data_config):
      empty = False
      yield ("valid" if i in valid else "train"), text, end
  if empty:
    raise DataError(f"{what} holds no text (only whitespace); point it at files with text in them.")


# --- hub datasets --------------------------------------------------------------------------------


def _load_hub(d):
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    return datasets.load_dataset(d.hf_name, d.hf_config or None, revision=d.hf_revision or None,
                                 streaming=bool(d.hf_streaming))
  except (ConnectionError, OSError) as e:
    raise DataError(
        f"could not reach the Hugging Face hub for dataset {d.hf_name} (no network?); download it elsewhere "
        "and point data.source=text / data.path at local files, or set HF_DATASETS_OFFLINE=1 with a populated "
        f"cache ({type(e).__name__}: {e}).") from e
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"could not load Hugging Face dataset {d.hf_name} (config {d.hf_config!r}): "
                    f"{type(e).__name__}: {e}; check data.hf_name and data.hf_config.") from e


def _hub_pieces(split, field: str, name: str) -> Iterator[tuple[str, bool]]:
  """Documents of one split (memory-mapped Arrow or streamed), a batch of rows at a time."""
  if split.column_names is not None:  # None: a stream that has not said (checked on its first rows)
    if field not in split.column_names:
      raise _no_field(f"dataset {name}", field, split.column_names)
    split = split.select_columns([field])  # the other columns (urls, dates, ...) are never decoded
  for batch in split.iter(batch_size=1024):
    if field not in batch:
      raise _no_field(f"dataset {name}", field, batch)
    yield from _records(batch[field])


def _hub_stream(data_config, load) -> Iterator[Piece]:
  d = data_config
  dataset = load()
  splits = list(dataset.keys())
  if d.hf_split_train not in splits:
    raise DataError(f"dataset {d.hf_name} has no split {d.hf_split_train!r}; its splits are "
                    f"{', '.join(map(repr, splits))}; set --config.data.hf_split_train.")
  train = _hub_pieces(dataset[d.hf_split_train], d.text_field, d.hf_name)
  what = f"dataset {d.hf_name} (field {d.text_field!r})"
  if not (d.hf_split_valid and d.hf_split_valid in splits):
    yield from split_stream(train, d.valid_fraction, what)
    return
  seen = {"train": 0, "valid": 0}
  for split, pieces in (("train", train), ("valid", _hub_pieces(dataset[d.hf_split_valid], d.text_field, d.hf_name))):
    for text, end in pieces:
      seen[split] += 1
      yield split, text, end
  if not all(seen.values()):
    raise DataError(f"{what} has no text in one of its splits; check data.text_field and the splits.")


# --- sources -------------------------------------------------------------------------------------


def _stories_source(data_config, description: dict) -> Source:
  from jaxformer.data import stories  # pylint: disable=g-import-not-at-top
  n = int(data_config.num_stories)
  if n < 2:
    raise DataError(f"data.num_stories must be at least 2 (train + validation), got {n}.")
  texts, logps = stories.generate_stories(n, int(data_config.stories_seed))
  num_valid = min(max(1, round(data_config.valid_fraction * n)), n - 1)
  cut = n - num_valid

  def stream():
    for i, text in enumerate(texts):
      for piece, end in _doc_pieces(text):
        yield ("train" if i < cut else "valid"), piece, end

  return Source(description, stream, np.asarray(logps, dtype=np.float64)[cut:])


def load_source(data_config, description: dict | None = None) -> Source:
  """The source, ready to stream: nothing is read (or downloaded) until `stream()` is iterated."""
  description = description or describe_source(data_config)
  kind = description["kind"]
  if kind == "stories":
    return _stories_source(data_config, description)
  if kind == "text":
    return Source(description, lambda: _text_stream(data_config, description))
  hub = []

  def load():  # once per source: streaming re-reads, Arrow is memory-mapped
    if not hub:
      hub.append(_load_hub(data_config))
    return hub[0]

  return Source(description, lambda: _hub_stream(data_config, load))
