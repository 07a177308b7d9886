"""Sources, cached token arrays, batch streams, validation layout, entropy floor."""

import json
import os
import subprocess
import sys
import tempfile
import types

# datasets reads these at import; conftest sets offline too, this keeps its cache out of ~.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="jaxformer-test-hf-"))

import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer import tokenizer as tk
import jaxformer.data
from jaxformer.data import batches
from jaxformer.data import prepare
from jaxformer.data import sources
from jaxformer.data import DataError, load_data, validation_set

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"


def _data_config(tmp_path, **overrides):
  d = config_lib.base_config().data
  d.cache_dir = str(tmp_path / "cache")
  for k, v in overrides.items():
    d[k] = v
  return d


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def _words(rng, n):
  vocab = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "big", "red", "sun", "hat"]
  return " ".join(rng.choice(vocab, size=n))


@pytest.fixture
def story_file(tmp_path):
  rng = np.random.default_rng(0)
  docs = [f"Story {i}. " + _words(rng, 20 + i % 7) + "." for i in range(40)]
  return _write(tmp_path / "stories.txt", "\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n"), docs


def _read(src):
  """{split: documents} of a source's stream (test-sized corpora only: it holds them all)."""
  docs, current = {"train": [], "valid": []}, []
  for split, text, end in src.stream():
    current.append(text)
    if end:
      docs[split].append("".join(current))
      current = []
  return docs


def _stream(tok, docs):
  eot = tk.eot_id(tok)
  return [i for doc in docs for i in tk.encode(tok, doc) + [eot]]


# --- sources -------------------------------------------------------------------------------------


def test_single_txt_file_splits_on_the_character_tail(tmp_path):
  text = "".join(f"line {i}: to be or not to be\n" for i in range(300))
  d = _data_config(tmp_path, source="text", path=_write(tmp_path / "a.txt", text))
  data = load_data(d, None, seq_len=32)
  cut = int(len(text) * 0.9)
  tok = data.tokenizer
  assert tk.decode(tok, data.train) == text[:cut] + "<|endoftext|>"
  assert tk.decode(tok, data.valid) == text[cut:] + "<|endoftext|>"
  assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
  assert data.entropy_floor is None and data.valid_doc_starts.tolist() == [0]
  assert data.manifest["splits"]["train"]["characters"] == cut


def test_txt_split_on_separator_holds_out_whole_documents(tmp_path, story_file):
  path, docs = story_file
  d = _data_config(tmp_path, source="text", path=path, doc_separator="<|endoftext|>")
  data = load_data(d, None, seq_len=16)
  valid_idx = sources.holdout_indices(len(docs), 0.1).tolist()
  assert valid_idx == [5, 15, 25, 35]
  valid_docs = [docs[i] for i in valid_idx]
  train_docs = [doc for i, doc in enumerate(docs) if i not in valid_idx]
  assert data.valid.tolist() == _stream(data.tokenizer, valid_docs)
  assert data.train.tolist() == _stream(data.tokenizer, train_docs)
  starts = data.valid_doc_starts
  assert len(starts) == 4 and starts[0] == 0
  assert all(data.valid[s - 1] == tk.eot_id(data.tokenizer) for s in starts[1:])


def test_jsonl_and_txt_files_load_together(tmp_path):
  rows = [{"text": f"record {i} says hello", "id": i} for i in range(19)] + [{"text": None, "id": 19}]
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
  txt = _write(tmp_path / "a.txt", "the txt file\n")
  d = _data_config(tmp_path, source="text", path=f"{txt}, {jsonl}", valid_fraction=0.25)
  src = sources.load_source(d)
  read = _read(src)
  docs = ["the txt file\n"] + [f"record {i} says hello" for i in range(19)]
  assert len(read["train"]) + len(read["valid"]) == 20
  assert sorted(read["train"] + read["valid"]) == sorted(docs)
  assert read["valid"] == [docs[i] for i in sources.holdout_indices(20, 0.25)]
  assert [f["path"] for f in src.description["files"]] == [txt, str(jsonl)]


def test_missing_text_field_lists_the_fields(tmp_path):
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"story": "a", "id": 1}\n{"story": "b", "id": 2}\n')
  d = _data_config(tmp_path, source="text", path=str(jsonl))
  with pytest.raises(DataError, match=r"has no field 'text'; its fields are 'story', 'id'.*text_field"):
    load_data(d, None, seq_len=4)


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "", "is empty"),
    ("blank.txt", "  \n\n", "holds no text"),
    ("data.xml", "<a/>", "extension '.xml'"),
])
def test_bad_files_are_named_in_the_error(tmp_path, name, content, message):
  path = tmp_path / name
  if content is not None:
    path.write_text(content)
  with pytest.raises(DataError, match=message):
    load_data(_data_config(tmp_path, source="text", path=str(path)), None, seq_len=4)


def test_no_path_is_an_error(tmp_path):
  with pytest.raises(DataError, match="data.path"):
    load_data(_data_config(tmp_path, source="text"), None, seq_len=4)


def test_split_shorter_than_a_window_is_an_error(tmp_path):
  d = _data_config(tmp_path, source="text", path=_write(tmp_path / "a.txt", "x" * 1000))
  with pytest.raises(DataError, match=r"validation split has 101 tokens, fewer than seq_len\+1 = 129"):
    load_data(d, None, seq_len=128)
  with pytest.raises(DataError, match="training split"):
    load_data(d, None, seq_len=1000)


def test_bpe_vocab_smaller_than_alphabet_is_an_error():
  c = config_lib.base_config()
  c.data.tokenizer, c.data.bpe_vocab_size = "bpe", 200
  with pytest.raises(config_lib.ConfigError, match="bpe_vocab_size=200 is smaller than the byte-level alphabet"):
    config_lib.validate(c)


def test_hub_dataset_without_network_is_one_clear_error(tmp_path):
  assert os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
  d = _data_config(tmp_path, source="hf", hf_name="roneneldan/TinyStories", hf_revision="main")
  with pytest.raises(DataError, match=r"could not reach the Hugging Face hub for dataset roneneldan/TinyStories "
                                      r"\(no network\?\); download it elsewhere"):
    load_data(d, None, seq_len=4)


# --- tokenizer and cache -------------------------------------------------------------------------


def test_second_load_reads_the_cache_without_tokenizing(tmp_path, monkeypatch, story_file):
  path, _ = story_file
  d = _data_config(tmp_path, source="text", path=path, doc_separator="<|endoftext|>", tokenizer="bpe",
                   bpe_vocab_size=300)
  first = load_data(d, str(tmp_path / "run"), seq_len=16)
  assert os.path.exists(tmp_path / "run" / "tokenizer.json")

  def fail(*args, **kwargs):
    raise AssertionError("the cache should have been used")

  monkeypatch.setattr(prepare, "write_tokens", fail)
  monkeypatch.setattr(sources, "load_source", fail)
  for workdir in (str(tmp_path / "run"), str(tmp_path / "other_run"), None):
    again = load_data(d, workdir, seq_len=16)
    assert again.manifest == first.manifest
    np.testing.assert_array_equal(again.train, first.train)
    assert tk.fingerprint(again.tokenizer) == tk.fingerprint(first.tokenizer)


_RACE = """
import json, sys, time
from jaxformer import config as config_lib
from jaxformer.data import pipeline
calls = {"tokenizer": 0, "cache": 0}
def counted(name, fn):
  def wrapped(*args, **kwargs):
    calls[name] += 1
    time.sleep(1.0)  # long enough for the other processes to arrive while this one builds
    return fn(*args, **kwargs)
  return wrapped
pipeline._train_tokenizer = counted("tokenizer", pipeline._train_tokenizer)
pipeline.build_cache = counted("cache", pipeline.build_cache)
d = config_lib.base_config().data
d.update(dict(cache_dir=sys.argv[1], source="text", path=sys.argv[2], doc_separator="<|endoftext|>",
              tokenizer="bpe", bpe_vocab_size=300))
data = pipeline.load_data(d, None, seq_len=16)
print(json.dumps({**calls, "tokens": int(data.train.sum()), "cache_dir": data.manifest["cache_dir"]}))
"""


def test_processes_starting_together_build_the_cache_once(tmp_path, story_file):
  """As the processes of one host do: the first builds tokenizer and tokens, the others wait and read them."""
  path, _ = story_file
  cmd = [sys.executable, "-c", _RACE, str(tmp_path / "cache"), path]
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for _ in range(3)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    results.append(json.loads(out.splitlines()[-1]))
  assert sum(r["tokenizer"] for r in results) == 1 and sum(r["cache"] for r in results) == 1, results
  assert len({(r["tokens"], r["cache_dir"]) for r in results}) == 1


def test_cache_key_follows_tokenizer_and_file(tmp_path, story_file):
  path, _ = story_file
  d = _data_config(tmp_path, source="text", path=path, doc_separator="<|endoftext|>")
  char = load_data(d, None, seq_len=16)
  d.tokenizer, d.bpe_vocab_size = "bpe", 300
  bpe = load_data(d, None, seq_len=16)
  assert char.manifest["cache_dir"] != bpe.manifest["cache_dir"]
  assert char.manifest["tokenizer"]["fingerprint"] != bpe.manifest["tokenizer"]["fingerprint"]
  with open(path, "a") as f:
    f.write("One more story.\n<|endoftext|>\n")
  changed = load_data(d, None, seq_len=16)
  assert changed.manifest["cache_dir"] != bpe.manifest["cache_dir"]
  assert len(changed.train) > len(bpe.train)


def test_cache_written_by_another_tokenizer_is_refused(tmp_path, story_file):
  path, _ = story_file
  d = _data_config(tmp_path, source="text", path=path, doc_separator="<|endoftext|>")
  data = load_data(d, None, seq_len=16)
  manifest_path = os.path.join(data.manifest["cache_dir"], "manifest.json")
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(DataError, match=r"was written by tokenizer 0123456789abcdef, but this run's tokenizer is "
                                      r"[0-9a-f]{16}; delete .* to rebuild it"):
    load_data(d, None, seq_len=16)


def test_workdir_tokenizer_is_reused_and_kind_checked(tmp_path, story_file):
  path, _ = story_file
  workdir = str(tmp_path / "run")
  d = _data_config(tmp_path, source="text", path=path, doc_separator="<|endoftext|>")
  first = load_data(d, workdir, seq_len=16)
  # A different corpus on resume still uses the run's tokenizer (and refuses what it cannot encode).
  d2 = _data_config(tmp_path, source="text", path=_write(tmp_path / "b.txt", "the cat sat on the mat. " * 50))
  second = load_data(d2, workdir, seq_len=16)
  assert tk.fingerprint(second.tokenizer) == tk.fingerprint(first.tokenizer)
  d3 = _data_config(tmp_path, source="text", path=_write(tmp_path / "c.txt", "QUITE NEW LETTERS " * 50))
  with pytest.raises(DataError, match="never seen: 'E', 'I', 'L'"):
    load_data(d3, workdir, seq_len=16)
  d.tokenizer = "bpe"
  with pytest.raises(DataError, match="is a char tokenizer but data.tokenizer=bpe"):
    load_data(d, workdir, seq_len=16)


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch, story_file):
  """A build cut short leaves only its resumable .partial-* directory, never a cache that looks complete."""
  path, _ = story_file
  d = _data_config(tmp_path, source="text", path=path, doc_separator="<|endoftext|>")
  real = prepare.encode_chunk

  def crash(tok, chunk):
    raise KeyboardInterrupt

  monkeypatch.setattr(prepare, "encode_chunk", crash)
  with pytest.raises(KeyboardInterrupt):
    load_data(d, None, seq_len=16)
  assert [p.startswith(".partial-") for p in os.listdir(tmp_path / "cache" / "tokens")] == [True]
  monkeypatch.setattr(prepare, "encode_chunk", real)
  data = load_data(d, None, seq_len=16)
  assert os.listdir(tmp_path / "cache" / "tokens") == [os.path.basename(data.manifest["cache_dir"])]
  # A cache directory without its manifest is incomplete: it is rebuilt, not used.
  os.remove(os.path.join(data.manifest["cache_dir"], "manifest.json"))
  os.remove(os.path.join(data.manifest["cache_dir"], "valid.npy"))
  again = load_data(d, None, seq_len=16)
  np.testing.assert_array_equal(again.valid, data.valid)


def test_tokenizing_in_several_processes_gives_the_same_tokens(tmp_path, monkeypatch, story_file):
  path, _ = story_file
  monkeypatch.setattr(prepare, "CHUNK_CHARS", 100)  # ~20 chunks through 2 workers, back in order
  one = load_data(_data_config(tmp_path / "a", source="text", path=path, doc_separator="<|endoftext|>"),
                  None, seq_len=16)
  two = load_data(_data_config(tmp_path / "b", source="text", path=path, doc_separator="<|endoftext|>",
                               num_proc=2), None, seq_len=16)
  np.testing.assert_array_equal(one.train, two.train)
  np.testing.assert_array_equal(one.valid, two.valid)
  np.testing.assert_array_equal(one.valid_doc_starts, two.valid_doc_starts)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_long_documents_tokenize_in_pieces_to_the_same_ids(tmp_path, monkeypatch, kind):
  rng = np.random.default_rng(1)
  text = "".join(f"{_words(rng, 6)}{rng.choice(['', ' ', '  '])}\n{rng.choice(['', ' ', chr(10)])}"
                 for _ in range(150))
  assert sources.split_long(text, 40) != [text] and "".join(sources.split_long(text, 40)) == text
  d = _data_config(tmp_path, source="text", path=_write(tmp_path / "a.txt", text), tokenizer=kind,
                   bpe_vocab_size=300)
  monkeypatch.setattr(sources, "PIECE_CHARS", 40)
  data = load_data(d, None, seq_len=16)
  cut = int(len(text) * 0.9)
  eot = tk.eot_id(data.tokenizer)
  assert data.train.tolist() == tk.encode(data.tokenizer, text[:cut]) + [eot]
  assert data.valid.tolist() == tk.encode(data.tokenizer, text[cut:]) + [eot]


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared Tiny Shakespeare not present")
def test_tiny_shakespeare_char(tmp_path):
  d = _data_config(tmp_path, source="text", path=SHAKESPEARE)
  data = load_data(d, None, seq_len=256)
  assert tk.vocab_size(data.tokenizer) == 65 + 2  # and <|endoftext|>, <|unk|>
  assert (len(data.train), len(data.valid)) == (1_003_854 + 1, 111_540 + 1)  # nanoGPT's split, + EOT


# --- stories and the entropy floor ---------------------------------------------------------------


def _fake_generate_stories(num_stories, seed, grammar="default"):
  rng = np.random.default_rng(seed)
  texts = [_words(rng, int(rng.integers(3, 40))).capitalize() + "." for _ in range(num_stories)]
  logps = -np.array([len(t) * 0.7 + 1.0 for t in texts], np.float64)
  return texts, logps


@pytest.fixture
def fake_stories(monkeypatch):
  module = types.ModuleType("jaxformer.data.stories")
  module.generate_stories = _fake_generate_stories
  monkeypatch.setitem(sys.modules, "jaxformer.data.stories", module)
  monkeypatch.setattr(jaxformer.data, "stories", module, raising=False)
  return module


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_entropy_floor_is_nats_over_tokens_with_eot(tmp_path, fake_stories, kind):
  d = _data_config(tmp_path, source="stories", num_stories=50, stories_seed=7, tokenizer=kind,
                   bpe_vocab_size=300)
  data = load_data(d, None, seq_len=8)
  texts, logps = _fake_generate_stories(50, 7)
  valid_texts, valid_logps = texts[45:], logps[45:]
  tokens = sum(len(tk.encode(data.tokenizer, t)) + 1 for t in valid_texts)
  assert data.entropy_floor == pytest.approx(-valid_logps.sum() / tokens, rel=1e-12)
  assert data.manifest["entropy_floor"]["tokens"] == tokens == len(data.valid)
  assert data.valid.tolist() == _stream(data.tokenizer, valid_texts)
  np.testing.assert_array_equal(data.valid_doc_logps, valid_logps)

  # The validation set scores the first stories only; its floor covers exactly those.
  windows = batches.doc_windows(data.valid_doc_starts, len(data.valid), seq_len=8)
  fits_two = sum(w[0] < 2 for w in windows)
  vs = validation_set(data, num_batches=1, batch_size=fits_two, seq_len=8)
  assert vs.num_docs == 2
  scored = valid_texts[:vs.num_docs]
  scored_tokens = sum(len(tk.encode(data.tokenizer, t)) + 1 for t in scored)
  assert sum(b["weights"].sum() for b in vs.batches) == scored_tokens
  assert vs.entropy_floor == pytest.approx(-valid_logps[:vs.num_docs].sum() / scored_tokens, rel=1e-12)
  full = validation_set(data, num_batches=100, batch_size=4, seq_len=8)
  assert full.num_docs == 5 and full.entropy_floor == pytest.approx(data.entropy_floor)


def test_stories_cache_skips_generation(tmp_path, fake_stories, monkeypatch):
  d = _data_config(tmp_path, source="stories", num_stories=30)
  first = load_data(d, None, seq_len=8)
  monkeypatch.setattr(fake_stories, "generate_stories", None)
  again = load_data(d, None, seq_len=8)
  assert again.entropy_floor == first.entropy_floor
  np.testing.assert_array_equal(again.valid_doc_logps, first.valid_doc_logps)


def test_built_in_stories_end_to_end(tmp_path):
  stories = pytest.importorskip("jaxformer.data.stories")
  d = _data_config(tmp_path, source="stories", num_stories=60, stories_seed=3)
  data = load_data(d, None, seq_len=16)
  texts, logps = stories.generate_stories(60, 3)
  assert data.valid.tolist() == _stream(data.tokenizer, texts[54:])
  tokens = sum(len(tk.encode(data.tokenizer, t)) + 1 for t in texts[54:])
  assert data.entropy_floor == pytest.approx(-np.sum(logps[54:]) / tokens, rel=1e-12)
  assert 0 < data.entropy_floor < np.log(tk.vocab_size(data.tokenizer))


# --- batches -------------------------------------------------------------------------------------


def test_train_batches_are_a_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint16)
  kw = dict(batch_size=8, seq_len=16)
  run = [batches.train_batch(tokens, seed=3, step=s, **kw) for s in range(6)]
  resumed = [batches.train_batch(tokens, seed=3, step=s, **kw) for s in range(3, 6)]
  for a, b in zip(run[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(run[0]["inputs"], run[1]["inputs"])
  other_seed = batches.train_batch(tokens, seed=4, step=0, **kw)
  assert not np.array_equal(run[0]["inputs"], other_seed["inputs"])
  b = run[0]
  assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
  assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (8, 16)
  # tokens[i] == i, so a window is consecutive integers and targets are inputs + 1.
  np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
  np.testing.assert_array_equal(b["inputs"], b["inputs"][:, :1] + np.arange(16))
  assert (b["weights"] == 1).all()


def test_train_starts_cover_the_whole_array():
  starts = np.concatenate([batches.train_starts(20, seed=0, step=s, batch_size=64, seq_len=4)
                           for s in range(20)])
  assert starts.min() == 0 and starts.max() == 20 - 4 - 1


def test_a_process_reads_exactly_its_rows_of_the_global_batch():
  tokens = np.arange(5_000, dtype=np.uint16)
  kw = dict(seed=1, step=9, batch_size=8, seq_len=12)
  whole = batches.train_batch(tokens, **kw)
  for rows in (np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]), np.array([1, 3, 6]), np.arange(8)):
    part = batches.train_batch(tokens, rows=rows, **kw)
    for k in whole:
      np.testing.assert_array_equal(part[k], whole[k][rows])


def test_train_batch_from_memmap(tmp_path):
  path = str(tmp_path / "t.npy")
  np.save(path, np.arange(3_000, dtype=np.uint16))
  tokens = np.load(path, mmap_mode="r")
  b = batches.train_batch(tokens, seed=0, step=0, batch_size=4, seq_len=8)
  assert type(b["inputs"]) is np.ndarray
  np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)


def test_plain_valid_batches_are_fixed_and_spread_out():
  tokens = np.arange(50_000, dtype=np.uint16) % 60_000
  kw = dict(num_batches=3, batch_size=4, seq_len=32, document_aligned=False)
  a = batches.valid_batches(tokens, None, **kw)
  b = batches.valid_batches(tokens, None, **kw)
  assert len(a) == 3
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  starts = np.concatenate([x["inputs"][:, 0] for x in a]).astype(np.int64)
  assert starts[0] == 0 and starts[-1] == 50_000 - 33
  assert (np.diff(starts) >= 32).all()
  for x in a:
    np.testing.assert_array_equal(x["targets"], x["inputs"] + 1)


def test_plain_valid_batches_on_a_short_array_are_consecutive_and_padded():
  tokens = np.arange(100, dtype=np.uint16)
  out = batches.valid_batches(tokens, None, num_batches=4, batch_size=2, seq_len=30, document_aligned=False)
  assert len(out) == 2  # (100 - 1) // 30 = 3 windows
  assert out[0]["inputs"][:, 0].tolist() == [0, 30] and out[1]["inputs"][0, 0] == 60
  assert out[1]["weights"][0].all() and not out[1]["weights"][1].any()


def _toy_docs(lengths, eot=0):
  """A validation stream: document d is tokens 100*(d+1)+k, each followed by EOT."""
  tokens, starts = [], []
  for d, n in enumerate(lengths):
    starts.append(len(tokens))
    tokens += [100 * (d + 1) + k for k in range(n)] + [eot]
  return np.array(tokens, np.uint16), np.array(starts, np.int64)


@pytest.mark.parametrize("seq_len", [4, 8, 16])
def test_aligned_valid_batches_score_every_token_once(seq_len):
  lengths = [3, 30, 7, 15, 1, 16, 40]
  tokens, starts = _toy_docs(lengths)
  ends = np.append(starts[1:], len(tokens))
  out = batches.valid_batches(tokens, starts, num_batches=50, batch_size=4, seq_len=seq_len,
                              document_aligned=True, eot_id=0)
  scored = []
  for b in out:
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
      if not w.any():
        continue
      first = int(np.argmax(w > 0))
      # Which document: the first scored target (or an input before it) names it.
      doc = int(max(tgt[first], inp[first]) // 100 - 1) if max(tgt[first], inp[first]) else None
      for j in np.nonzero(w)[0]:
        # Reconstruct the target's position from its value: documents hold distinct values, EOT ends them.
        if tgt[j] == 0:
          pos = int(ends[doc] - 1)
        else:
          doc = int(tgt[j] // 100 - 1)
          pos = int(starts[doc] + tgt[j] % 100)
        scored.append(pos)
        assert tokens[pos] == tgt[j]
        # The input before a target is the token before it, or the EOT before its document.
        assert inp[j] == (tokens[pos - 1] if pos > 0 else 0)
        # Inputs are the document itself (or the EOT before it), never another document.
        assert all(x == 0 or x // 100 - 1 == doc for x in inp[:j + 1])
  assert sorted(scored) == list(range(len(tokens)))


def test_aligned_valid_first_row_predicts_the_first_token_after_eot():
  tokens, starts = _toy_docs([5, 6], eot=0)
  out = batches.valid_batches(tokens, starts, num_batches=1, batch_size=2, seq_len=8,
                              document_aligned=True, eot_id=0)
  b = out[0]
  assert b["inputs"][0].tolist() == [0, 100, 101, 102, 103, 104, 0, 0]
  assert b["targets"][0].tolist() == [100, 101, 102, 103, 104, 0, 0, 0]
  assert b["weights"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
  assert b["inputs"][1].tolist() == [0, 200, 201, 202, 203, 204, 205, 0]
  assert b["weights"][1].tolist() == [1] * 7 + [0]


def test_aligned_long_document_continues_with_context():
  tokens, starts = _toy_docs([20], eot=0)  # 21 targets
  windows = batches.doc_windows(starts, len(tokens), seq_len=8)
  assert [(w[2], w[3], w[4]) for w in windows] == [(0, 1, 8), (4, 9, 12), (8, 13, 16), (12, 17, 20),
                                                   (13, 21, 21)]
  out = batches.valid_batches(tokens, starts, num_batches=2, batch_size=4, seq_len=8,
                              document_aligned=True, eot_id=0)
  second = out[0]
  assert second["inputs"][1].tolist() == list(range(103, 111))  # s[4:12] = tokens[3:11]
  assert second["weights"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_aligned_valid_keeps_whole_documents_that_fit():
  tokens, starts = _toy_docs([5, 20, 5], eot=0)
  kw = dict(batch_size=2, seq_len=8)
  # Windows per doc: 1, 5 (21 targets: 8 then 4 + 4 + 4 + 1), 1.
  assert [batches.num_scored_docs(starts, len(tokens), num_batches=n, **kw) for n in (1, 2, 3, 4)] == [1, 1, 2, 3]
  out = batches.valid_batches(tokens, starts, num_batches=2, document_aligned=True, eot_id=0, **kw)
  assert len(out) == 1 and out[0]["weights"].sum() == 6
  again = batches.valid_batches(tokens, starts, num_batches=2, document_aligned=True, eot_id=0, **kw)
  for k in out[0]:
    np.testing.assert_array_equal(out[0][k], again[0][k])


def test_entropy_floor_helper():
  assert batches.entropy_floor(np.array([-2.0, -4.0]), np.array([2, 4])) == pytest.approx(1.0)
  assert batches.doc_lengths(np.array([0, 3, 7]), 10).tolist() == [3, 4, 3]
