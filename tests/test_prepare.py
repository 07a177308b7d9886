"""Streaming preparation: compressed files and globs, the streaming split, resume, flat memory, hub code."""

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="jaxformer-test-hf-"))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxformer import config as config_lib
from jaxformer import tokenizer as tk
from jaxformer.data import DataError, load_data
from jaxformer.data import prepare
from jaxformer.data import sources

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "big", "red", "sun", "hat", "naïve", "über"]


def _config(tmp_path, **overrides):
  d = config_lib.base_config().data
  d.cache_dir = str(tmp_path / "cache")
  d.source = "text"
  for k, v in overrides.items():
    d[k] = v
  return d


def _docs(n, seed=0, words=(5, 60)):
  rng = np.random.default_rng(seed)
  return [f"Doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(*words)))) + "." for i in range(n)]


def _jsonl(docs) -> bytes:
  return "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _stream(tok, docs):
  eot = tk.eot_id(tok)
  return [i for doc in docs for i in tk.encode(tok, doc) + [eot]]


def _split(docs, valid_fraction=0.1):
  held = sources.holdout_rule(valid_fraction)
  return [d for i, d in enumerate(docs) if not held(i)], [d for i, d in enumerate(docs) if held(i)]


def _same_cache(a, b):
  for name in ("train", "valid", "valid_doc_starts"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "cache_dir", "shards")}
  assert strip(a.manifest) == strip(b.manifest)


def test_a_glob_of_compressed_jsonl_and_txt_files_streams_every_document(tmp_path):
  docs = _docs(90)
  folder = tmp_path / "corpus"
  folder.mkdir()
  (folder / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs[:30])))
  (folder / "b.jsonl.xz").write_bytes(lzma.compress(_jsonl(docs[30:50])))
  with pa.output_stream(str(folder / "c.jsonl.zst"), compression="zstd") as f:
    f.write(_jsonl(docs[50:70]))
  (folder / "d.txt.bz2").write_bytes(bz2.compress(("\n<|endoftext|>\n".join(docs[70:80]) + "\n").encode()))
  pq.write_table(pa.table({"id": list(range(10)), "text": docs[80:]}), str(folder / "e.parquet"))
  (folder / "notes.md").write_text("not matched by the globs")
  d = _config(tmp_path, path=f"{folder}/*.jsonl.*, {folder}/*.txt.bz2,{folder}/*.parquet",
              doc_separator="<|endoftext|>", tokenizer="bpe", bpe_vocab_size=300)
  data = load_data(d, None, seq_len=16)
  assert [os.path.basename(f["path"]) for f in data.manifest["source"]["files"]] == [
      "a.jsonl.gz", "b.jsonl.xz", "c.jsonl.zst", "d.txt.bz2", "e.parquet"]
  train, valid = _split(docs)
  assert len(valid) == 9  # documents 5, 15, ..., 85
  assert data.train.tolist() == _stream(data.tokenizer, train)
  assert data.valid.tolist() == _stream(data.tokenizer, valid)
  assert data.manifest["splits"]["valid"]["documents"] == 9 and len(data.valid_doc_starts) == 9


@pytest.mark.parametrize("content, message", [
    (gzip.compress(_jsonl(_docs(2000)), mtime=0)[:20_000], r"could not read data file .*bad\.jsonl\.gz as gzip-compressed "
                                                  r"json \(OSError: Truncated.*check the file is complete"),
    (b"plain text, not gzip" * 20, "incorrect header check"),
    (gzip.compress(b'{"text": "ok"}\n{"text": broken\n', mtime=0), "JSONDecodeError"),
], ids=["truncated-gzip", "not-gzip", "broken-json"])  # fixed ids: pytest-xdist workers must collect the same names
def test_a_broken_file_is_one_error_and_keeps_the_complete_cache(tmp_path, content, message):
  good = tmp_path / "good.jsonl"
  good.write_bytes(_jsonl(_docs(40)))
  d = _config(tmp_path, path=str(good))
  data = load_data(d, None, seq_len=16)
  bad = tmp_path / "bad.jsonl.gz"
  bad.write_bytes(content)
  with pytest.raises(DataError, match=message):
    load_data(_config(tmp_path, path=f"{good},{bad}"), None, seq_len=16)
  assert sorted(os.listdir(tmp_path / "cache" / "tokens")) == [os.path.basename(data.manifest["cache_dir"])]
  again = load_data(d, None, seq_len=16)
  _same_cache(again, data)


def test_a_glob_matching_nothing_is_an_error(tmp_path):
  with pytest.raises(DataError, match=r"pattern .*/nothing/\*\.jsonl matches no files"):
    load_data(_config(tmp_path, path=str(tmp_path / "nothing" / "*.jsonl")), None, seq_len=16)


@pytest.mark.parametrize("compress", [False, True])
def test_one_long_text_splits_on_characters_as_before(tmp_path, monkeypatch, compress):
  """A single-document text (Tiny Shakespeare) keeps nanoGPT's 90% cut, read in many blocks and pieces."""
  rng = np.random.default_rng(3)
  text = "".join(f"{' '.join(rng.choice(WORDS, size=int(rng.integers(1, 12))))}\n" + "\n" * int(rng.integers(0, 2))
                 for _ in range(3000))
  path = tmp_path / ("book.txt.gz" if compress else "book.txt")
  path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
  monkeypatch.setattr(sources, "BLOCK_CHARS", 997)
  monkeypatch.setattr(sources, "PIECE_CHARS", 300)
  data = load_data(_config(tmp_path, path=str(path), tokenizer="bpe", bpe_vocab_size=300), None, seq_len=16)
  cut = int(len(text) * 0.9)
  eot = tk.eot_id(data.tokenizer)
  assert data.train.tolist() == tk.encode(data.tokenizer, text[:cut]) + [eot]
  assert data.valid.tolist() == tk.encode(data.tokenizer, text[cut:]) + [eot]
  assert data.manifest["splits"]["train"]["characters"] == cut
  assert data.manifest["splits"]["train"]["documents"] == data.manifest["splits"]["valid"]["documents"] == 1


def test_text_files_without_separator_are_one_document_each(tmp_path):
  """Their number is known unread, so the held-out files are the evenly spaced ones, as before streaming."""
  books = [f"Book {i}.\n" + "\n".join(_docs(30, seed=i)) for i in range(4)]
  for i, book in enumerate(books):
    (tmp_path / f"book{i}.txt").write_text(book)
  data = load_data(_config(tmp_path, path=str(tmp_path / "book*.txt"), tokenizer="byte", valid_fraction=0.25),
                   None, seq_len=16)
  (held,) = sources.holdout_indices(4, 0.25).tolist()
  assert data.valid.tolist() == _stream(data.tokenizer, [books[held]])
  assert data.train.tolist() == _stream(data.tokenizer, [b for i, b in enumerate(books) if i != held])


def test_streaming_holdout_is_the_evenly_spaced_one_when_it_divides():
  for fraction in (0.1, 0.25, 0.2, 0.05, 0.15, 1 / 3):
    for n in (20, 40, 60, 120, 600):
      if abs(n * fraction - round(n * fraction)) < 1e-9:
        held = sources.holdout_rule(fraction)
        assert [i for i in range(n) if held(i)] == sources.holdout_indices(n, fraction).tolist(), (fraction, n)


def test_tokenizer_sample_is_bounded_and_spread_over_the_stream():
  texts = [f"{i:05d}" for i in range(10_000)]  # 5 characters each
  sample = prepare.systematic_sample(iter(texts), 1000)
  assert 500 <= sum(map(len, sample)) <= 1000
  indices = [int(t) for t in sample]
  stride = indices[1] - indices[0]
  assert indices == list(range(0, 10_000, stride)) and indices[-1] >= 10_000 - stride
  assert prepare.systematic_sample(iter(texts[:10]), 1000) == texts[:10]  # a short stream: all of it


def test_hub_code_on_a_local_dataset_folder_arrow_and_streaming(tmp_path):
  folder = tmp_path / "hub"
  folder.mkdir()
  docs = _docs(50)
  (folder / "train.jsonl").write_bytes(_jsonl(docs[:45]))
  (folder / "validation.jsonl").write_bytes(_jsonl(docs[45:]))
  arrow = load_data(_config(tmp_path, source="hf", hf_name=str(folder), tokenizer="byte"), None, seq_len=16)
  streamed = load_data(_config(tmp_path / "s", source="hf", hf_name=str(folder), tokenizer="byte",
                               hf_streaming=True), None, seq_len=16)
  _same_cache(arrow, streamed)
  assert arrow.valid.tolist() == _stream(arrow.tokenizer, docs[45:])
  (folder / "validation.jsonl").unlink()  # no validation split: held out while streaming
  held = load_data(_config(tmp_path / "h", source="hf", hf_name=str(folder), tokenizer="byte",
                           hf_streaming=True), None, seq_len=16)
  assert held.valid.tolist() == _stream(held.tokenizer, _split(docs[:45])[1])


_KILLED = """
import os, signal, sys
from jaxformer import config as config_lib
from jaxformer.data import pipeline, prepare
prepare.CHUNK_CHARS, prepare.SHARD_TOKENS = 4000, 6000
real_commit, real_encode, commits = prepare._commit, prepare.encode_chunk, []
def commit(*args):
  real_commit(*args)
  commits.append(1)
def encode(tok, chunk):
  if len(commits) == 1 and getattr(encode, "armed", False):
    os.kill(os.getpid(), signal.SIGKILL)  # as a preempted machine: mid-shard, files half-written
  encode.armed = len(commits) == 1  # one more chunk is appended (uncommitted) before the kill
  return real_encode(tok, chunk)
prepare._commit, prepare.encode_chunk = commit, encode
d = config_lib.base_config().data
d.update(dict(cache_dir=sys.argv[1], source="text", path=sys.argv[2], tokenizer="bpe", bpe_vocab_size=300))
pipeline.load_data(d, None, seq_len=16)
"""


def test_a_killed_preparation_resumes_from_its_last_shard(tmp_path, monkeypatch):
  path = tmp_path / "a.jsonl"
  path.write_bytes(_jsonl(_docs(600)))
  env = dict(os.environ, HF_DATASETS_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "cache"), str(path)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  tokens = tmp_path / "cache" / "tokens"
  (partial,) = [tokens / p for p in os.listdir(tokens)]
  assert partial.name.startswith(".partial-")
  progress = prepare.read_progress(str(partial))
  assert progress["shards"] == 1 and not progress["complete"]
  committed = progress["splits"]["train"]["tokens"]
  assert os.path.getsize(partial / "train.npy") > 128 + 2 * committed  # an uncommitted tail: cut off on resume

  monkeypatch.setattr(prepare, "CHUNK_CHARS", 4000)
  monkeypatch.setattr(prepare, "SHARD_TOKENS", 6000)
  real, tokenized = prepare.encode_chunk, []

  def counting(tok, chunk):
    tokenized.extend(chunk)
    return real(tok, chunk)

  monkeypatch.setattr(prepare, "encode_chunk", counting)
  d = _config(tmp_path, path=str(path), tokenizer="bpe", bpe_vocab_size=300)
  resumed = load_data(d, None, seq_len=16)
  assert len(tokenized) == 600 - progress["pieces"]  # the committed shard was not tokenized again
  assert resumed.manifest["shards"] > 2 and os.listdir(tokens) == [os.path.basename(resumed.manifest["cache_dir"])]
  whole = load_data(_config(tmp_path / "whole", path=str(path), tokenizer="bpe", bpe_vocab_size=300), None,
                    seq_len=16)
  _same_cache(resumed, whole)
  train, valid = _split(_docs(600))
  assert resumed.valid.tolist() == _stream(resumed.tokenizer, valid)


_PEAK = """
import json, resource, sys
from jaxformer import config as config_lib
from jaxformer.data import pipeline
d = config_lib.base_config().data
d.update(dict(cache_dir=sys.argv[1], source="text", path=sys.argv[2], tokenizer="byte"))
pipeline.load_data(d, None, seq_len=16)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
  """Peak RSS of the preparing process on 2 MB and 8 MB of text: within 6 MB (the text is never held; the
  version before streaming grew by 24 MB here)."""
  rng = np.random.default_rng(0)
  words = np.array(WORDS + [f"w{i}" for i in range(100)])
  peaks = {}
  for mb in (2, 8):
    path = tmp_path / f"c{mb}.jsonl"
    with open(path, "w") as f:
      size = 0
      while size < mb * 10**6:
        doc = " ".join(rng.choice(words, size=int(rng.integers(50, 400))))
        f.write(json.dumps({"text": doc}) + "\n")
        size += len(doc)
    # One tokenizer thread: the tokenizer's thread pool adds a slowly growing, bounded, malloc arena per thread.
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / f"cache{mb}"), str(path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks[mb] = float(proc.stdout.splitlines()[-1])
  assert peaks[8] - peaks[2] < 6, peaks
