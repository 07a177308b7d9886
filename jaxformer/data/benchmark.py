"""The data preparation benchmark (scripts/benchmark_data.py): jaxformer's streaming preparation
vs nanoGPT's prepare.py approach (datasets.map with num_proc), throughput and peak memory of the
whole process tree, each side in a fresh process.
"""

import glob
import json
import multiprocessing
import os
import time

import numpy as np
import tokenizers

from jaxformer import tokenizer as tokenizer_lib


def local_documents(shakespeare: str, tinystories: str) -> tuple[list[str], str]:
  """Distinct documents of real text found on this machine, and a sentence saying what they are.

  TinyStories stories, Tiny Shakespeare in ~4 KB runs of speeches, and as many
  bytes again of Python standard-library modules (code: a long tail of rare
  words, so the corpus is not all easy prose).
  """
  import sysconfig  # pylint: disable=g-import-not-at-top
  with open(tinystories, encoding="utf-8") as f:
    stories = [d.strip() for d in f.read().split(tokenizer_lib.EOT) if d.strip()]
  with open(shakespeare, encoding="utf-8") as f:
    speeches = f.read().split("\n\n")
  scenes, current = [], []
  for speech in speeches:
    current.append(speech)
    if sum(map(len, current)) > 4000:
      scenes.append("\n\n".join(current))
      current = []
  prose = stories + scenes
  code_bytes = sum(len(d.encode()) for d in prose)
  stdlib = sysconfig.get_paths()["stdlib"]
  code = []
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "site-packages", "idlelib", "__pycache__"))
    for name in sorted(files):
      if name.endswith(".py") and code_bytes > 0:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
          module = f.read()
        if module.strip():
          code.append(module)
          code_bytes -= len(module.encode())
  docs = prose + code
  what = (f"{len(stories)} TinyStories stories ({tinystories}), {len(scenes)} ~4 KB runs of Tiny Shakespeare "
          f"({shakespeare}) and as many bytes of Python {sysconfig.get_python_version()} standard-library code "
          f"({len(code)} modules): {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB of distinct text (half prose, "
          "half code), repeated in a fresh shuffled order until the corpus is full")
  return docs, what


def assemble_corpus(directory: str, target_bytes: int, docs: list[str], *, seed: int = 0,
                    file_bytes: int = 1 << 27) -> dict:
  """~target_bytes of document text as JSON lines files corpus-NNNNN.jsonl (each <= file_bytes)."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  text_bytes, num_docs, files, f, size = 0, 0, [], None, 0
  while text_bytes < target_bytes:
    for i in rng.permutation(len(docs)):
      if f is None or size >= file_bytes:
        if f:
          f.close()
        files.append(os.path.join(directory, f"corpus-{len(files):05d}.jsonl"))
        f, size = open(files[-1], "w", encoding="utf-8"), 0
      line = json.dumps({"text": docs[i]}) + "\n"
      f.write(line)
      size += len(line)
      text_bytes += len(docs[i].encode("utf-8"))
      num_docs += 1
      if text_bytes >= target_bytes:
        break
  f.close()
  return {"files": files, "documents": num_docs, "text_bytes": text_bytes,
          "file_bytes": sum(os.path.getsize(p) for p in files)}


def _measured(conn, fn, args) -> None:
  """Runs fn(*args) in this (fresh) process; sends back its result, seconds and memory peaks."""
  import resource  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  peak, done = {"pss": 0, "rss": 0}, threading.Event()

  def sample():  # the process tree's memory, every 0.2 s: PSS counts pages shared by workers once
    try:
      import psutil  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    me = psutil.Process()
    while not done.wait(0.2):
      pss = rss = 0
      for p in [me] + me.children(recursive=True):
        try:
          m = p.memory_full_info()
          pss, rss = pss + m.pss, rss + m.rss
        except psutil.Error:
          pass
      peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)

  def cpu():  # user + system seconds of this process and of its children that have ended
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  start, cpu_start, load_start = time.perf_counter(), cpu(), os.getloadavg()[0]
  result = fn(*args)
  seconds = time.perf_counter() - start
  done.set()
  thread.join()
  maxrss = {who: round(resource.getrusage(flag).ru_maxrss / 1024)  # KiB on Linux
            for who, flag in (("self_maxrss", resource.RUSAGE_SELF),
                              ("largest_child_maxrss", resource.RUSAGE_CHILDREN))}
  conn.send(dict(result, seconds=round(seconds, 2), cpu_seconds=round(cpu() - cpu_start, 2),
                 load_average=[round(load_start, 1), round(os.getloadavg()[0], 1)],
                 peak_rss_mb={"tree_pss_sampled": round(peak["pss"] / 2**20),
                              "tree_rss_sampled": round(peak["rss"] / 2**20), **maxrss}))


def measure(fn, *args) -> dict:
  """fn(*args) in a fresh spawned process, so its memory (workers included) is its own."""
  ctx = multiprocessing.get_context("spawn")
  ours, theirs = ctx.Pipe()
  process = ctx.Process(target=_measured, args=(theirs, fn, args))
  process.start()
  theirs.close()  # so that recv() fails, not hangs, if the process dies
  try:
    result = ours.recv()
  except EOFError:
    process.join()
    raise RuntimeError(f"the measured process died (exit code {process.exitcode})") from None
  process.join()
  return result


def _data_config(path: str, cache_dir: str, num_proc: int, vocab: int, sample_chars: int):
  from jaxformer import config as config_lib  # pylint: disable=g-import-not-at-top
  d = config_lib.base_config().data
  d.update(dict(source="text", path=path, tokenizer="bpe", bpe_vocab_size=vocab, cache_dir=cache_dir,
                num_proc=num_proc, tokenizer_sample_chars=sample_chars))
  return d


def bench_train_tokenizer(path: str, cache_dir: str, vocab: int, sample_chars: int, out: str) -> dict:
  from jaxformer.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  d = _data_config(path, cache_dir, 1, vocab, sample_chars)
  tok = pipeline._train_tokenizer(d, sources.load_source(d))  # pylint: disable=protected-access
  tok.save(out)
  return {"vocab_size": tokenizer_lib.vocab_size(tok)}


def bench_ours(path: str, cache_dir: str, workdir: str, num_proc: int) -> dict:
  """jaxformer's preparation (read, split, tokenize, write) with the run's tokenizer in `workdir`."""
  from jaxformer.data import pipeline  # pylint: disable=g-import-not-at-top
  # The workdir's tokenizer.json is used, so the vocabulary and sample settings are not read.
  data = pipeline.load_data(_data_config(path, cache_dir, num_proc, 0, 1), workdir, seq_len=1)
  return {"tokens": int(len(data.train) + len(data.valid)), "shards": data.manifest["shards"]}


def bench_nanogpt(files: list[str], tokenizer_path: str, out_dir: str, num_proc: int) -> dict:
  """nanoGPT's data/openwebtext/prepare.py with the same HF tokenizer: datasets.map(num_proc), then one memmap."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as in ours
  import datasets  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  dataset = datasets.load_dataset("json", data_files=files, split="train", cache_dir=os.path.join(out_dir, "hf"))
  load_s = time.perf_counter() - start
  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  eot = tokenizer_lib.eot_id(tok)

  def process(batch):
    ids = [e.ids + [eot] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
    return {"ids": ids, "len": [len(x) for x in ids]}

  tokenized = dataset.map(process, batched=True, remove_columns=["text"], num_proc=num_proc, desc="nanoGPT-style map")
  total = int(np.sum(tokenized["len"], dtype=np.uint64))
  arr = np.memmap(os.path.join(out_dir, "train.bin"), dtype=np.uint16, mode="w+", shape=(total,))
  idx = 0
  shards = min(1024, len(tokenized))
  for i in range(shards):  # as nanoGPT: 1024 contiguous shards, concatenated into the memmap
    batch = tokenized.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
    chunk = np.concatenate(batch["ids"])
    arr[idx:idx + len(chunk)] = chunk
    idx += len(chunk)
  arr.flush()
  return {"tokens": total, "arrow_load_seconds": round(load_s, 2)}


def benchmark(sizes_mb: list[int], *, shakespeare: str, tinystories: str, workdir: str, vocab: int = 16384,
              num_proc: int = 2, sample_chars: int = 200_000_000, baseline: bool = True) -> dict:
  """Per corpus size: BPE training, then jaxformer's preparation and nanoGPT's, on the same text and tokenizer."""
  import platform  # pylint: disable=g-import-not-at-top
  docs, what = local_documents(shakespeare, tinystories)
  runs = []
  for size in sizes_mb:
    root = os.path.join(workdir, f"{size}mb")
    corpus = assemble_corpus(os.path.join(root, "corpus"), size * 10**6, docs)
    del corpus["files"]
    path = os.path.join(root, "corpus", "*.jsonl")
    files = sorted(glob.glob(path))
    run_dir = os.path.join(root, "run")
    os.makedirs(run_dir, exist_ok=True)
    tok_path = os.path.join(run_dir, "tokenizer.json")
    train = measure(bench_train_tokenizer, path, os.path.join(root, "cache"), vocab, sample_chars, tok_path)
    row = {"corpus_mb": size, **corpus, "files": len(files), "tokenizer_training": train}
    cases = [("jaxformer", bench_ours, (path, os.path.join(root, "cache"), run_dir, num_proc))]
    if baseline:
      cases.append(("nanogpt_datasets_map", bench_nanogpt, (files, tok_path, os.path.join(root, "nanogpt"), num_proc)))
    for name, fn, args in cases:
      result = measure(fn, *args)
      seconds = result["seconds"] - result.get("arrow_load_seconds", 0.0)
      mb = corpus["text_bytes"] / 1e6
      # Wall-clock rates suffer from whatever else runs on the machine; MB per CPU second does not.
      row[name] = dict(result, tokenize_seconds=round(seconds, 2), mb_per_s=round(mb / seconds, 2),
                       mb_per_s_per_core=round(mb / seconds / num_proc, 2),
                       mb_per_cpu_second=round(mb / result["cpu_seconds"], 2))
    runs.append(row)
  return {"machine": {"cpu_cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                      "python": platform.python_version(), "tokenizers": tokenizers.__version__},
          "corpus_from": what, "tokenizer": f"byte-level BPE (GPT-2 pre-tokenizer), V={vocab}, trained on "
          f"data.tokenizer_sample_chars={sample_chars:,} characters of each corpus", "num_proc": num_proc,
          "runs": runs}
