"""Training and generation throughput of a config, printed as one JSON object.

python scripts/benchmark.py --config=configs/tiny.py [--config.KEY=VALUE ...] [--steps=10]

Random tokens (V from the config, or 64 for the stories char vocabulary), the
real jit'd train step; see jaxformer/benchmark.py and docs/performance.md.
"""

import json
import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from jaxformer import allocator, benchmark, cli
from jaxformer import config as config_lib

with cli.flag_errors():  # ml_collections reads the --config.KEY overrides here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.py"),
      "A config file with get_config().", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per repeat.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after the first.", lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats of the timed steps (and of each generation run).", lower_bound=1)
_GENERATE = flags.DEFINE_bool("generate", True, "Also time generation at B=1 and B=8.")
_GEN_TOKENS = flags.DEFINE_integer("gen_tokens", 500, "New tokens per generation run.", lower_bound=1)
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt_len", 1, "Prompt length of the generation runs.", lower_bound=1)
_GEN_BATCH = flags.DEFINE_list("gen_batch_sizes", ["1", "8"], "Generation batch sizes.")
flags.register_validator(_GEN_BATCH, lambda sizes: all(s.isascii() and s.isdigit() and int(s) > 0 for s in sizes),
                         message="give positive whole numbers, comma-separated (1,8).")
_PEAK_N = flags.DEFINE_integer("peak_matmul", benchmark.CPU_PEAK_MATMUL,
                               "Size n of the n x n float32 matmul that measures a CPU's peak.", lower_bound=1)
_QUIET = flags.DEFINE_bool("quiet", False, "No progress lines on stderr.")


def main(argv):
  cli.flags_only(argv)
  config = _CONFIG.value
  config_lib.validate(config)
  malloc_set = allocator.configure()  # as scripts/train.py does
  jax.config.update("jax_enable_compilation_cache", False)  # compile_s times a compile, not a cache read
  log = (lambda _: None) if _QUIET.value else (lambda msg: print(msg, file=sys.stderr, flush=True))
  result = benchmark.benchmark(
      config, steps=_STEPS.value, warmup=_WARMUP.value, repeats=_REPEATS.value,
      generate=_GENERATE.value, gen_batch_sizes=tuple(int(b) for b in _GEN_BATCH.value),
      gen_prompt_len=_GEN_PROMPT.value, gen_new_tokens=_GEN_TOKENS.value,
      gen_repeats=_REPEATS.value, peak_matmul_n=_PEAK_N.value, log=log)
  result["config"] = flags.FLAGS["config"].config_filename
  result["malloc_thresholds_set"] = malloc_set
  print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
  cli.main(main)
