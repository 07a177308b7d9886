"""Data preparation benchmark: tokenizing throughput and peak memory, jaxformer vs nanoGPT's prepare.py.

For each corpus size, assembles that much text from local data (Tiny Shakespeare,
a TinyStories sample, Python's standard library) as JSON lines, trains a BPE
tokenizer on it, then times jaxformer's streaming preparation and nanoGPT's
datasets.map(num_proc) approach with the same tokenizer, each in a fresh process.
Prints one JSON object.

  python scripts/benchmark_data.py --sizes_mb=100,1000 --num_proc=2
"""

import json
import os
import tempfile

from absl import app
from absl import flags

from jaxformer.data import benchmark

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")

flags.DEFINE_list("sizes_mb", ["100", "1000"], "corpus sizes, MB of UTF-8 text")
flags.DEFINE_integer("num_proc", os.cpu_count() or 1, "tokenizing processes (data.num_proc), both sides")
flags.DEFINE_integer("vocab", 16384, "BPE vocabulary")
flags.DEFINE_integer("sample_chars", 200_000_000, "data.tokenizer_sample_chars")
flags.DEFINE_string("shakespeare", os.path.join(SHARED, "tinyshakespeare.txt"), "Tiny Shakespeare")
flags.DEFINE_string("tinystories", os.path.join(SHARED, "tinystories_sample.txt"), "TinyStories text")
flags.DEFINE_string("workdir", "", "where corpora and caches go (default: a temporary folder, removed)")
flags.DEFINE_bool("baseline", True, "also run nanoGPT's approach")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  with tempfile.TemporaryDirectory(prefix="jaxformer-bench-data-") as tmp:
    result = benchmark.benchmark([int(s) for s in FLAGS.sizes_mb], shakespeare=os.path.abspath(FLAGS.shakespeare),
                               tinystories=os.path.abspath(FLAGS.tinystories), workdir=FLAGS.workdir or tmp,
                               vocab=FLAGS.vocab, num_proc=FLAGS.num_proc, sample_chars=FLAGS.sample_chars,
                               baseline=FLAGS.baseline)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
