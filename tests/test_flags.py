"""Fuzzing every script's flags: a bad flag, value, config key or argument is one `error:` line.

Each bad invocation must exit non-zero with exactly one non-empty line on stderr,
starting `error:` and naming what is wrong, no traceback, and leave a trained run
folder exactly as it was. The random choices come from a fixed seed.
"""

import os
import random
import subprocess
import sys
from multiprocessing.pool import ThreadPool

import pytest

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer import sweep
from jaxformer.config import ConfigError
from test_scripts import MICRO, ROOT

SEED = 20240611
TIMEOUT = 180  # one subprocess; a bad flag fails in seconds, a missed one may start real work

# Values that do not parse as the flag's type ("enum": a value outside an absl enum flag's choices).
BAD_VALUES = {int: ["abc", "1.5", "1e3", "", "ten", "0x1g"], float: ["abc", "1,5", "", "fast", "1e"],
              bool: ["maybe", "2", "yess", "on-ish"], "enum": ["epochs", "Step!", ""]}
WORDS = ("epochs", "learning_rate", "outdir", "verbose_level", "bogus", "model_size", "batchsize")
STRAY = ("extra", "train", "1000", "configs/tiny.py")

# Per script: `base`, arguments that point a good invocation at the run ({run}) or a scratch
# folder ({tmp}), so a bad flag that slipped through shows as a changed run or a started job;
# `typed`, flags and their types; `bad`, values out of range (or otherwise refused) as
# (argument, a word the error line must contain); `config`, the config flag, its keys and the
# base arguments under which its overrides are read.
TINY = os.path.join(ROOT, "configs", "tiny.py")
BASE_KEYS = sorted(sweep.flatten(config_lib.base_config()))
SCRIPTS = {
    "train.py": dict(
        base=["--workdir={run}"],
        typed={"--config.train.steps": int, "--config.optim.lr": float, "--config.model.use_bias": bool,
               "--config.train.batch_size": int, "--config.model.dropout": float},
        bad=[("--config.train.steps=-5", "train.steps"), ("--config.train.batch_size=0", "train.batch_size"),
             ("--config.optim.lr=-1", "optim.lr"), ("--config.model.dropout=1.5", "model.dropout"),
             ("--config.data.path=a.txt", "data.source")],
        config=("config", BASE_KEYS, ["--workdir={run}"])),
    "sample.py": dict(
        base=["--workdir={run}"],
        typed={"--num_samples": int, "--temperature": float, "--top_p": float, "--top_k": int, "--seed": int},
        bad=[("--temperature=-1", "temperature"), ("--top_p=2", "top_p"), ("--top_k=-2", "top_k"),
             ("--max_new_tokens=0", "max_new_tokens"), ("--num_samples=0", "num_samples"),
             ("--checkpoint=-1", "checkpoint"), ("--prompt_file={tmp}/absent.txt", "prompt_file")],
        config=("config", BASE_KEYS, ["--workdir={run}"])),
    "evaluate.py": dict(
        base=["--workdir={run}"],
        typed={"--config.train.batch_size": int, "--config.data.valid_fraction": float,
               "--config.train.seq_len": int},
        bad=[("--checkpoint=first", "checkpoint"), ("--checkpoint=1.5", "checkpoint"),
             ("--config.model.num_layers=9", "model.num_layers"), ("--config.train.batch_size=0", "batch_size")],
        config=("config", BASE_KEYS, ["--workdir={run}"])),
    "plot.py": dict(
        base=["loss", "--workdir={run}"],
        typed={"--log_y": bool, "--x": "enum"},
        bad=[("--checkpoint=abc", "checkpoint"), ("--checkpoint=-2", "checkpoint"), ("--x=epoch", "x")],
        config=("config", BASE_KEYS, ["lr", f"--config={TINY}"])),
    "results.py": dict(
        base=["--dry_run", "--corpora=stories", "--presets=tiny", "--workdir={tmp}/results"],
        typed={"--steps": int, "--lr": float, "--batch_size": int, "--dry_run": bool, "--parallel": int},
        bad=[("--steps=0", "steps"), ("--batch_size=0", "batch_size"), ("--seq_len=-1", "seq_len"),
             ("--lr=0", "lr"), ("--parallel=0", "parallel"), ("--presets=huge", "huge"),
             ("--corpora=wiki", "wiki"), ("--seq_len=100000", "seq_len")],
        config=None),
    "sweep.py": dict(
        base=[f"--sweep={ROOT}/configs/sweeps/lr_warmup.py", "--dry_run", "--workdir={tmp}/sweep"],
        typed={"--workers": int, "--dry_run": bool, "--sweep.num_trials": int, "--sweep.seed": int},
        bad=[("--workers=0", "workers"), ("--sweep.method=bayes", "method"),
             ("--sweep={tmp}/absent.py", "absent.py"), ("--sweep.config={tmp}/absent.py", "absent.py")],
        config=("sweep", ["config", "method", "num_trials", "seed"],
                [f"--sweep={ROOT}/configs/sweeps/lr_warmup.py", "--dry_run", "--workdir={tmp}/sweep"])),
    "benchmark.py": dict(
        base=["--config.model.num_layers=1", "--steps=1", "--warmup=0", "--repeats=1", "--nogenerate", "--quiet",
              "--peak_matmul=16"],
        typed={"--steps": int, "--warmup": int, "--gen_tokens": int, "--generate": bool,
               "--config.train.batch_size": int},
        bad=[("--steps=0", "steps"), ("--repeats=0", "repeats"), ("--warmup=-1", "warmup"),
             ("--gen_batch_sizes=0,8", "gen_batch_sizes"), ("--config.train.batch_size=0", "batch_size"),
             ("--config.train.seq_len=100000", "seq_len")],
        config=("config", BASE_KEYS, ["--steps=1", "--nogenerate", "--quiet"])),
    "compile.py": dict(
        base=[f"--config={TINY}", "--nodecode"],
        typed={"--config.train.batch_size": int, "--config.model.num_layers": int, "--decode": bool,
               "--config.optim.lr": float},
        bad=[("--config.train.batch_size=0", "batch_size"), ("--config.mesh.data=0", "mesh.data"),
             ("--config.model.num_heads=3", "num_heads"), ("--config.compute.kernels=fast", "kernels")],
        config=("config", BASE_KEYS, [f"--config={TINY}", "--nodecode"])),
}


def misspell(rng: random.Random, word: str, taken: set) -> str:
  """`word` with one letter dropped, doubled, swapped or replaced: a name that is not in `taken`."""
  while True:
    i = rng.randrange(len(word))
    edit = rng.choice(("drop", "double", "swap", "replace"))
    if edit == "drop":
      new = word[:i] + word[i + 1:]
    elif edit == "double":
      new = word[:i] + word[i] + word[i:]
    elif edit == "swap" and i + 1 < len(word):
      new = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    else:
      new = word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i + 1:]
    if new and new[0].isalpha() and new not in taken:
      return new


def wrong_type(rng, spec):
  flag, kind = rng.choice(sorted(spec["typed"].items(), key=lambda kv: kv[0]))
  return spec["base"] + [f"{flag}={rng.choice(BAD_VALUES[kind])}"], flag.lstrip("-")


def out_of_range(rng, spec):
  arg, word = rng.choice(spec["bad"])
  return spec["base"] + [arg], word


def unknown_flag(rng, spec):
  name = f"{rng.choice(WORDS)}_{rng.randrange(100)}"
  return spec["base"] + [f"--{name}={rng.randrange(10)}"], name


def stray_argument(rng, spec):
  word, args = rng.choice(STRAY), list(spec["base"])
  args.insert(rng.randrange(len(args) + 1), word)
  return args, word


def misspelt_key(rng, spec):
  flag, keys, base = spec["config"]
  parts = rng.choice(keys).split(".")
  i = rng.randrange(len(parts))  # a section's name or the field's
  siblings = {k.split(".")[i] for k in keys if k.split(".")[:i] == parts[:i] and len(k.split(".")) > i}
  name = ".".join(parts[:i] + [misspell(rng, parts[i], siblings)] + parts[i + 1:])
  return base + [f"--{flag}.{name}=1"], f"{flag}.{name}"


def fuzz_cases(seed: int = SEED) -> list:
  """(script, arguments, a word the error line must contain, kind): 2 per script, drawn from `seed`.

  A bad value (wrong type or out of range) and a bad name (unknown flag, stray argument or
  misspelt config key) each: every launch costs a JAX import, and CI has 2 cores.
  """
  rng, cases = random.Random(seed), []
  for script, spec in SCRIPTS.items():
    extra = [unknown_flag, stray_argument] + ([misspelt_key] if spec["config"] else [])
    for make in (rng.choice([wrong_type, out_of_range]), rng.choice(extra)):
      args, word = make(rng, spec)
      cases.append((script, args, word, make.__name__))
  return cases


# The issue's own examples, word for word.
PINNED = [("train.py", ["--workdir={run}", "--config.optim.lrr=1e-3"],
           'error: --config.optim.lrr: no such config key; did you mean "lr"?'),
          ("sample.py", ["--workdir={run}", "--checkpoint=abc"],
           "error: --checkpoint=abc: use latest, best or a step number.")]


def script(name, *args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], capture_output=True,
                        text=True, timeout=TIMEOUT, cwd=cwd, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def snapshot(folder: str) -> dict:
  """{path: (bytes, mtime)} of every file under `folder`."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[path] = (f.read(), os.stat(path).st_mtime_ns)
  return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-step run of the tiny model, and a scratch folder to run the scripts in."""
  tmp = tmp_path_factory.mktemp("flags")
  run = str(tmp / "run")
  out = script("train.py", f"--workdir={run}", "--config.train.steps=2", f"--config.data.cache_dir={tmp / 'cache'}",
               *MICRO, "--config.train.num_samples=0", cwd=tmp)
  assert out.returncode == 0, out.stderr[-2000:]
  return run, str(tmp)


def one_error_line(out) -> str | None:
  """What is wrong with a bad invocation's output, None when it is exactly one `error:` line."""
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  if out.returncode == 0:
    return "exited 0"
  if "Traceback" in out.stderr + out.stdout:
    return "printed a traceback"
  if len(lines) != 1 or not lines[0].startswith("error: "):
    return f"{len(lines)} lines on stderr"
  return None


def test_bad_flags_are_one_error_line_and_leave_the_run_alone(trained):
  run, tmp = trained
  before = snapshot(run)
  cases = [(s, [a.format(run=run, tmp=tmp) for a in args], word, None) for s, args, word, _ in fuzz_cases()]
  cases += [(s, [a.format(run=run, tmp=tmp) for a in args], None, line) for s, args, line in PINNED]
  with ThreadPool(2) as pool:  # CI has 2 cores; each launch is mostly JAX's import
    outs = pool.map(lambda case: script(case[0], *case[1], cwd=tmp), cases)
  failures = []
  for (name, args, word, exact), out in zip(cases, outs):
    problem = one_error_line(out)
    line = out.stderr.strip()
    if problem is None and exact is not None and line != exact:
      problem = f"expected {exact!r}"
    if problem is None and word is not None and word not in line:
      problem = f"the line does not name {word!r}"
    if problem:
      failures.append(f"{name} {' '.join(args)}: {problem} (rc {out.returncode}):\n{out.stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)
  assert snapshot(run) == before, "a bad invocation changed the run folder"


def test_the_fuzz_covers_every_script_and_kind_of_fault():
  cases = fuzz_cases()
  assert {c[0] for c in cases} == set(SCRIPTS) and len(cases) == 2 * len(SCRIPTS)
  assert {c[3] for c in cases} == {"wrong_type", "out_of_range", "unknown_flag", "stray_argument", "misspelt_key"}
  assert cases == fuzz_cases()  # the same seed gives the same cases


def test_checkpoint_flag_values():
  assert all(cli.is_checkpoint(v) for v in ("latest", "best", "0", "120"))
  assert not any(cli.is_checkpoint(v) for v in ("", "abc", "-1", "1.5", "Best", "²", " 3"))


def test_data_path_needs_source_text():
  c = config_lib.base_config()
  c.data.path = "corpus.txt"
  with pytest.raises(ConfigError, match=r"^data\.path is set .* data\.source is 'stories'.*data\.source=text"):
    config_lib.validate(c)
  c.data.source = "text"
  config_lib.validate(c)
