"""Text sources: the config's `data` section -> train and validation documents.

Three sources, chosen by `data.source`:
  stories  the built-in story generator (`jaxformer.data.stories`); the last
           `valid_fraction` of stories are validation, with their log-probs.
  text     local files read through HF `datasets` builders: .txt, .jsonl/.json,
           .parquet, .csv (comma-separate several in `data.path`).
  hf       a Hugging Face hub dataset by name, config, revision and splits.

`describe_source` says what a source is without reading it (file sizes and
mtimes, hub name and revision, generator settings); the data cache is keyed by it.
"""

import hashlib
import os
from typing import NamedTuple

import numpy as np

TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
  """Bad data input; the message names the problem and the fix in one sentence."""


class Source(NamedTuple):
  train: list[str]                 # training documents
  valid: list[str]                 # validation documents
  valid_logps: np.ndarray | None   # log p(document) in nats, float64 (stories only)
  description: dict                # describe_source(...) of this source


def cache_root(data_config) -> str:
  """Where jaxformer keeps token arrays and tokenizers (`data.cache_dir`)."""
  root = data_config.cache_dir or os.path.join("~", ".cache", "jaxformer")
  return os.path.abspath(os.path.expanduser(root))


def _paths(data_config) -> list[str]:
  paths = [p.strip() for p in str(data_config.path).split(",") if p.strip()]
  if not paths:
    raise DataError("data.source=text needs data.path; set --config.data.path=FILE (or FILE1,FILE2).")
  return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def _describe_file(path: str) -> dict:
  ext = os.path.splitext(path)[1].lower()
  if ext not in TEXT_BUILDERS:
    raise DataError(
        f"data file {path} has extension {ext or '(none)'!r}; use one of {', '.join(TEXT_BUILDERS)}.")
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


def holdout_indices(num_docs: int, valid_fraction: float) -> np.ndarray:
  """Validation documents: `valid_fraction` of them, evenly spaced through the corpus.

  Deterministic and spread out, so every file of a multi-file corpus contributes.
  """
  num_valid = min(max(1, round(valid_fraction * num_docs)), num_docs - 1)
  return ((np.arange(num_valid) + 0.5) * num_docs / num_valid).astype(np.int64)


def split_documents(docs: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
  """Held-out split by document; one long document is split on characters (tail = validation)."""
  if not docs:
    raise DataError("the source has no documents (only whitespace or separators); check data.path.")
  if len(docs) == 1:
    text = docs[0]
    cut = int(len(text) * (1.0 - valid_fraction))  # as nanoGPT: int(n * 0.9)
    return [text[:cut]], [text[cut:]]
  valid_idx = set(holdout_indices(len(docs), valid_fraction).tolist())
  train = [doc for i, doc in enumerate(docs) if i not in valid_idx]
  valid = [doc for i, doc in enumerate(docs) if i in valid_idx]
  return train, valid


def _column(dataset, field: str, where: str) -> list[str]:
  if field not in dataset.column_names:
    raise DataError(
        f"{where} has no field {field!r}; its fields are {', '.join(map(repr, dataset.column_names))}; "
        "set --config.data.text_field to one of them.")
  texts = dataset.data.column(field).to_pylist()
  return [t for t in texts if isinstance(t, str) and t.strip()]


def _load_file(path: str, data_config) -> list[str]:
  """The documents of one local file, read with the matching `datasets` builder."""
  import datasets  # pylint: disable=g-import-not-at-top
  builder = TEXT_BUILDERS[os.path.splitext(path)[1].lower()]
  kwargs = {"sample_by": "document"} if builder == "text" else {}
  try:
    dataset = datasets.load_dataset(builder, data_files=[path], split="train",
                                    cache_dir=os.path.join(cache_root(data_config), "hf_datasets"), **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"could not read data file {path} as {builder} ({type(e).__name__}: {e}); "
                    "check its format matches its extension.") from e
  if builder != "text":
    return _column(dataset, data_config.text_field, f"data file {path}")
  text = dataset.data.column("text").to_pylist()[0] if len(dataset) else ""
  sep = data_config.doc_separator
  if sep:
    return [piece.strip() for piece in text.split(sep) if piece.strip()]
  return [text] if text.strip() else []


def _load_text(data_config, description: dict) -> Source:
  docs = []
  for f in description["files"]:
    docs.extend(_load_file(f["path"], data_config))
  if not docs:
    raise DataError(f"data.path {data_config.path} holds no text (only whitespace or separators); "
                    "point it at a file with text in it.")
  train, valid = split_documents(docs, data_config.valid_fraction)
  return Source(train, valid, None, description)


def _load_hf(data_config, description: dict) -> Source:
  import datasets  # pylint: disable=g-import-not-at-top
  d = data_config
  try:
    dataset = datasets.load_dataset(d.hf_name, d.hf_config or None, revision=d.hf_revision or None)
  except (ConnectionError, OSError) as e:
    raise DataError(
        f"could not reach the Hugging Face hub for dataset {d.hf_name} (no network?); download it elsewhere "
        "and point data.source=text / data.path at local files, or set HF_DATASETS_OFFLINE=1 with a populated "
        f"cache ({type(e).__name__}: {e}).") from e
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"could not load Hugging Face dataset {d.hf_name} (config {d.hf_config!r}): "
                    f"{type(e).__name__}: {e}; check data.hf_name and data.hf_config.") from e
  splits = list(dataset.keys())
  if d.hf_split_train not in splits:
    raise DataError(f"dataset {d.hf_name} has no split {d.hf_split_train!r}; its splits are "
                    f"{', '.join(map(repr, splits))}; set --config.data.hf_split_train.")
  train = _column(dataset[d.hf_split_train], d.text_field, f"dataset {d.hf_name}")
  if d.hf_split_valid and d.hf_split_valid in splits:
    valid = _column(dataset[d.hf_split_valid], d.text_field, f"dataset {d.hf_name}")
  else:
    train, valid = split_documents(train, d.valid_fraction)
  if not train or not valid:
    raise DataError(f"dataset {d.hf_name} has no text in field {d.text_field!r}; check data.text_field.")
  return Source(train, valid, None, description)


def _load_stories(data_config, description: dict) -> Source:
  from jaxformer.data import stories  # pylint: disable=g-import-not-at-top
  n = int(data_config.num_stories)
  if n < 2:
    raise DataError(f"data.num_stories must be at least 2 (train + validation), got {n}.")
  texts, logps = stories.generate_stories(n, int(data_config.stories_seed))
  logps = np.asarray(logps, dtype=np.float64)
  num_valid = min(max(1, round(data_config.valid_fraction * n)), n - 1)
  cut = n - num_valid
  return Source(list(texts[:cut]), list(texts[cut:]), logps[cut:], description)


def load_source(data_config, description: dict | None = None) -> Source:
  """Reads (or generates, or downloads) the source's documents and splits them."""
  description = description or describe_source(data_config)
  loader = {"stories": _load_stories, "text": _load_text, "hf": _load_hf}[description["kind"]]
  return loader(data_config, description)
