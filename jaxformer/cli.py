"""What every script shares: bad flags and the project's own errors become one clear line and exit status 1.

Only errors whose message already names the problem and the fix are shortened:
a bad flag, config key, config file or argument; the project's error types (config,
data, tokenizer, checkpoint, training, sampling, plot, usage) and a missing or
unreadable path. Anything else is a bug and keeps its traceback.

A script defines its flags (a config flag with a default inside `with cli.flag_errors():`,
as ml_collections reads the --config.KEY overrides while defining it) and ends with
`cli.main(main)`.
"""

import contextlib
import glob
import importlib.util
import os
import re
import sys

import filelock
import jax
from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from jaxformer.checkpoint import CheckpointError
from jaxformer.config import ConfigError
from jaxformer.data import DataError
from jaxformer.plots import PlotError
from jaxformer.runs import RunFolderError
from jaxformer.sampling import SamplingError
from jaxformer.tokenizer import TokenizerError
from jaxformer.train import TrainingError


class UsageError(ValueError):
  """A bad command-line flag or argument; the message names it and the fix."""


CLEAR_ERRORS = (ConfigError, DataError, TokenizerError, CheckpointError, TrainingError, SamplingError,
                PlotError, UsageError, RunFolderError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
CHECKPOINT_HELP = "use latest, best or a step number."


def skip_absent_tpu() -> None:
  """Keeps JAX on the CPU where libtpu is installed (the dev and tpu extras) but no TPU chip is.

  JAX would otherwise probe for a TPU at start-up and print libtpu's warnings. Left
  alone: a JAX_PLATFORMS the user set, a host with TPU chips, a host with a GPU (a GPU
  plugin alone, as the gpu-compile extra installs it, is no GPU).
  """
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):  # NVIDIA or AMD GPUs
    return
  try:
    from jax._src import hardware_utils  # JAX's own check for TPU chips on the PCI bus
    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # a JAX without it: let JAX decide
    return
  if chips == 0:
    jax.config.update("jax_platforms", "cpu")


CACHE = os.path.join("~", ".cache", "jaxformer", "xla")  # beside the data cache's default
CACHE_BYTES = 2 << 30


def compilation_cache() -> str | None:
  """Keeps compiled steps and decode loops across runs; returns the folder, or None when off.

  A resumed, repeated or sampled run then loads its executables instead of compiling
  them again. The folder is JAX's persistent compilation cache: JAX_COMPILATION_CACHE_DIR
  when set (empty turns it off; on a pod, a bucket all hosts share, as JAX writes from
  process 0 only), else CACHE. A local folder holds at most CACHE_BYTES
  (JAX_COMPILATION_CACHE_MAX_SIZE), the least recently used entries evicted first; one
  that cannot be written is skipped, and the run compiles as before.
  """
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(CACHE))
  if not path:
    return None
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
      if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", CACHE_BYTES)
      if jax.config.jax_compilation_cache_max_size != -1:  # JAX writes -atime files only with a bound
        drop_torn_entries(path)
    except (OSError, filelock.Timeout):
      jax.config.update("jax_compilation_cache_dir", None)  # else JAX warns at every compile
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def drop_torn_entries(path: str) -> None:
  """Deletes the cache entries a killed process left half-written.

  Under the folder's lock, JAX writes an entry's `-cache` file, then its `-atime`
  file; a `-cache` file without its `-atime` is a write cut short (kill -9). JAX would
  fail to read it, warn and compile at every start, and never write it again.
  """
  with filelock.FileLock(os.path.join(path, ".lockfile"), timeout=10):
    names = set(os.listdir(path))
    for name in names:
      if name.endswith("-cache") and name[:-len("cache")] + "atime" not in names:
        os.remove(os.path.join(path, name))


def fail(message: str):
  """Prints `error: message` as the one line on stderr and exits with status 1.

  To the process's own stderr: after a failed checkpoint write, sys.stderr goes to the
  run's errors.log (checkpoint.quiet_background).
  """
  print(f"error: {message}", file=sys.__stderr__ or sys.stderr, flush=True)
  sys.exit(1)


def run(main, *args, **kwargs):
  """Calls main (JAX kept off an absent TPU); a CLEAR_ERRORS error prints as one line, no traceback."""
  skip_absent_tpu()
  try:
    return main(*args, **kwargs)
  except CLEAR_ERRORS + (app.UsageError,) as err:  # absl's would print the whole docstring
    fail(str(err))


def main(main_fn) -> None:
  """A script's entry point: absl's app.run, bad flags and the project's errors one `error:` line each."""
  app.run(lambda argv: run(main_fn, argv), flags_parser=parse_flags)


def flags_only(argv) -> None:
  """Refuses positional arguments in a script that takes flags only."""
  if len(argv) > 1:
    raise UsageError(f"unexpected argument {' '.join(argv[1:])!r}; give everything as --flag=value "
                     "(--helpshort lists the flags).")


def is_checkpoint(which: str) -> bool:
  """Whether a --checkpoint value is one checkpoint.restore_params takes: latest, best or a step."""
  return which in ("latest", "best") or (which.isascii() and which.isdigit())


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: absl's parsing, with a bad flag, config key or config file one `error:` line."""
  check_config_files(argv)
  with flag_errors(argv):
    argv = flags.FLAGS(argv)
  check_configs_loaded()
  return argv


def config_file_flags() -> list[str]:
  """The names of the flags that load a config file (config_flags.DEFINE_config_file)."""
  return [name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)]


def check_config_files(argv: list[str]) -> None:
  """A --config=FILE that is not a file fails here; ml_collections would defer it to the first access."""
  for name in config_file_flags():
    value = flag_value(argv, name)
    if value is not None and not os.path.isfile(value.split(":", 1)[0]):
      fail(f"--{name}={value}: no such file; give the path of a config file with get_config().")


def check_configs_loaded() -> None:
  """A config file whose get_config() raised an OSError fails here, not at the config's first use."""
  for name in config_file_flags():
    try:
      hasattr(flags.FLAGS[name].value, "lock")  # ml_collections' stand-in for a failed load raises here
    except OSError as err:
      fail(f"--{name}={flags.FLAGS[name].config_filename}: {load_error(err)}")


def load_error(err: OSError) -> str:
  """The error a config file raised while loading, which ml_collections keeps as the cause."""
  return _last_line(str(err.__cause__ or err))


def flag_value(argv: list[str], name: str) -> str | None:
  """The last value argv gives flag `name` (--name=V or --name V), None if it gives none."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.S)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


@contextlib.contextmanager
def flag_errors(argv: list[str] | None = None):
  """Turns a bad flag, config key or config file into one `error:` line and exit status 1.

  Wraps flag parsing and the definition of config flags (ml_collections reads the
  --config.KEY overrides there). Errors it cannot pin on a flag keep their traceback.
  """
  try:
    yield
  except (flags.Error, KeyError, AttributeError, OSError) as err:
    message = flag_error_message(err, sys.argv if argv is None else argv)
    if message is None:
      raise
    fail(message)


def flag_error_message(err: Exception, argv: list[str]) -> str | None:
  """One sentence for a flag error, or None when it is not one (a bug: keep the traceback)."""
  if isinstance(err, flags.UnrecognizedFlagError):
    return unknown_flag_message(err)
  if isinstance(err, flags.Error):
    return bad_value_message(str(err))
  if isinstance(err, OSError):  # a config file ml_collections could not load
    return load_error(err)
  return config_key_message(err, argv)


def unknown_flag_message(err: flags.UnrecognizedFlagError) -> str:
  """`--name: no such flag; ...` with absl's suggestion where it has one."""
  name = err.flagname
  if "." in name and name.split(".")[0] in flags.FLAGS:  # an override of a config flag given no config
    return f"--{name}: there is no config to override; give --{name.split('.')[0]}=FILE before it."
  tip = re.search(r"Did you mean: (.*) \?", str(err))
  if tip:
    return f"--{name}: no such flag; did you mean --{tip.group(1).split(', ')[0]}?"
  return f"--{name}: no such flag; --helpshort lists the flags."


_FLAG = r"flag (--([^=\s]+)=.*?): "
# absl's and Python's words for a bad flag -> one sentence naming the fix (the first that matches).
_MESSAGES = (
    (r"flag (--[^=\s]+)=None: Flag \S+ must have a value other than None\.", r"\1 is required; give \1=VALUE."),
    (_FLAG + r".*invalid literal for int\(\).*", r"\1: not an integer; give a whole number."),
    (_FLAG + r".*could not convert string to float.*", r"\1: not a number; give one such as 0.5 or 1e-3."),
    (_FLAG + r".*Non-boolean argument.*", r"\1: not a boolean; give true or false."),
    (_FLAG + r"Overriding \w+ is not allowed\.", r"\1: --\2 takes no file here; give --\2.KEY=VALUE overrides."),
    (_FLAG + r"Failed to parse .* as a ConfigDict.*", r"--\2 is a section; set its fields: --\2.KEY=VALUE."),
    (_FLAG + r"value should be one of <(.*)>", r"\1: give one of \3."),
    (_FLAG + r"[-+\w.]+ is not (an? [\w -]+)", r"\1: give \3."),  # a bound: '0 is not a positive integer'
    (r"Missing value for flag (-\S+)", r"\1 has no value; give \1=VALUE."),
    (r"Found (\S+) in argv before a value for (\S+) was specified", r"\1 comes before \2=FILE; give \2=FILE first."),
    (_FLAG + r"(.*)", r"\1: \3"),  # absl's own words, e.g. a validator's message
)


def bad_value_message(text: str) -> str:
  """One sentence for a flags.Error: absl's 'flag --name=value: detail' reworded to name the fix."""
  lines = text.strip().splitlines() or ["bad flag"]
  if "Traceback" in text:  # a config file that raised: ml_collections puts its traceback in the message
    lines[0] = f"{lines[0].split(': Error whilst parsing', 1)[0]}: {_last_line(text)}"
  for pattern, fix in _MESSAGES:
    hit = re.fullmatch(pattern, lines[0])
    if hit:
      return hit.expand(fix)
  return f"{lines[0]}; --helpshort lists the flags."


def config_key_message(err: Exception, argv: list[str]) -> str | None:
  """`--config.a.b: no such config key; did you mean "c"?` for the override ml_collections could not find."""
  text = str(err)
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  lookup = re.search(r"Attempting to lookup: ([\w.]+)", text)  # a key below a value: steps.x
  if hint:
    key = hint.group(2)
  elif lookup:
    key = lookup.group(1).split(".")[-1]
  else:
    words = re.findall(r"\w+", text)
    key = words[0] if words else ""
  for arg in argv[1:]:
    m = re.match(r"--?(?:no)?(\w+(?:\.\w+)+)(=|$)", arg)
    if m and key in m.group(1).split(".")[1:]:
      name = m.group(1)
      what = "no such config key" if name.endswith("." + key) else f'no such config key "{key}"'
      fix = f'did you mean "{hint.group(1)}"?' if hint else "check its spelling against the config."
      return f"--{name}: {what}; {fix}"
  return None  # not a command-line override: a bug in a config file, which keeps its traceback


def _last_line(text: str) -> str:
  """The last non-empty line, without a traceback's 'module.Error: ' prefix."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  line = lines[-1] if lines else text
  return re.sub(r"^[\w.]*(Error|Exception): ", "", line)
