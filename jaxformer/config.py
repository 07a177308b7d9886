"""Every config default in one place, and validation before anything compiles.

Config files in `configs/` start from `base_config()` and change values only.
"""

import dataclasses
import json
import math
import re

import jax
import ml_collections
from etils import epath

from jaxformer import tokenizer as tokenizer_lib
from jaxformer.model import REMAT, Execution, ModelConfig

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
KERNELS = ("auto", "cpu", "reference", "xla", "cudnn", "splash")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")
# compute.kernels/dtype "auto", by the platform the step runs on: each one's fast path.
AUTO_KERNELS = {"cpu": "cpu", "gpu": "cudnn", "tpu": "splash"}
AUTO_DTYPES = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- model: the architecture of the guide (B, T, C, V, H, D = C // H): what a checkpoint is.
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0            # 0: take it from the tokenizer, padded to vocab_multiple
  m.vocab_multiple = 64       # padding V to a multiple of 64 gives faster matmuls (padded ids are never scored)
  # GPT-2's init: the residual output projections ~ N(0, 0.02 / sqrt(2 * num_layers)). Off by default:
  # on the tiny preset's 600 quick-start steps it gave validation loss 0.860 against 0.732 without.
  m.scaled_residual_init = False
  m.num_layers = 4
  m.num_heads = 4
  m.embed_dim = 128           # C
  m.mlp_ratio = 4             # hidden width of the feed-forward is mlp_ratio * C
  m.max_len = 256             # the longest sequence the model accepts (T_max)
  m.pos_encoding = "learned"  # learned | sinusoidal | rope
  m.rope_base = 10000.0
  m.sliding_window = 0        # 0: full causal attention; W > 0: each token sees the last W tokens
  m.activation = "gelu"       # gelu (exact, erf) | gelu_tanh (GPT-2) | relu
  m.use_bias = True
  m.tie_embeddings = True     # the output head reuses the token embedding matrix
  m.ln_eps = 1e-5             # GPT-2 / PyTorch; Flax's own default is 1e-6
  # Regularisation: used in training only, free to change on resume or fine-tune.
  m.dropout = 0.0             # residual and embedding dropout
  m.attn_dropout = 0.0        # dropout on the attention weights

  # --- compute: how the model is computed. Never part of a checkpoint: free to change
  # on resume or fine-tune; results agree up to float rounding.
  x = c.compute = ml_collections.ConfigDict()
  # auto: each platform's fast path: cpu on CPUs, cudnn on GPUs, splash on TPUs.
  # cpu: our CPU kernels (blocked attention, hand-written LayerNorm/GELU/MLP backward passes);
  # reference: the guide written out with stock Flax layers; xla: jax.nn.dot_product_attention;
  # cudnn: its cuDNN flash-attention kernel (GPU, bfloat16/float16); splash: the Pallas
  # splash-attention kernel (TPU). See jaxformer/kernels/.
  x.kernels = "auto"          # auto | cpu | reference | xla | cudnn | splash
  x.dtype = "auto"            # compute dtype; auto: float32 on CPUs, bfloat16 on GPUs and TPUs
  x.param_dtype = "float32"   # parameters and optimizer state
  # Matmul operands: "" = the compute dtype; "bfloat16" rounds the operands of the dense
  # layers' and blocked attention's matmuls to bfloat16 and sums in float32 (~2x faster
  # matmuls on CPUs with AVX512-BF16); everything else stays in the compute dtype.
  x.matmul_dtype = ""
  # Rematerialisation: what each block keeps for the backward pass (the rest is recomputed).
  # none: everything; full: only its input; dots_saveable: matmul outputs; save_attention_out:
  # the attention output; save_qkv_attention_out: that and the q/k/v projection (model.REMAT).
  x.remat = "none"

  # --- data: source -> tokenizer -> token arrays -> batches.
  d = c.data = ml_collections.ConfigDict()
  d.source = "stories"        # stories | text | hf
  d.path = ""                 # local file(s) for source=text ("a.txt" or "a.txt,b.jsonl")
  d.hf_name = ""              # hub dataset name for source=hf
  d.hf_config = ""
  d.hf_revision = ""          # pin a revision for reproducibility
  d.hf_split_train = "train"
  d.hf_split_valid = "validation"
  d.hf_streaming = False      # stream the hub dataset instead of downloading it to memory-mapped Arrow first
  d.text_field = "text"
  d.doc_separator = ""        # split one .txt file into documents on this string ("" = one doc)
  d.valid_fraction = 0.1      # held out when the source has no validation split
  d.num_stories = 20000       # size of the built-in stories corpus (train + validation)
  d.stories_seed = 1234
  d.tokenizer = "char"        # char | bpe | byte (256 byte ids + EOT: any UTF-8 text, nothing to train)
  # Characters a char tokenizer has never seen (in evaluation text, prompts, fine-tuning data):
  # error = refuse, naming them; unk = map them to <|unk|> and report how many.
  d.unknown_chars = "error"
  d.bpe_vocab_size = 5000
  d.tokenizer_sample_chars = 200_000_000  # BPE learns from at most this much training text, spread over all of it
  d.cache_dir = ""            # "" = ~/.cache/jaxformer
  d.num_proc = 1              # tokenizing processes (1: the calling process, with the tokenizer's threads)
  d.num_valid_batches = 8     # fixed validation batches, the same at every evaluation

  # --- training.
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 32           # global B: rows per optimizer step, split over the data x fsdp mesh axes
  # Gradient accumulation: the step runs its B rows as sequential micro-batches of this
  # many rows (global), gradients weighted by their tokens; the result does not depend on
  # it (dropout masks are drawn per row) up to float rounding. Smaller saves memory.
  # 0 = auto: 4 rows per device on CPU (a micro-batch's activations stay in cache), all B elsewhere.
  t.micro_batch_size = 0
  t.seq_len = 256             # T of a training window
  t.steps = 1000
  t.eval_every = 200
  t.log_every = 20
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  t.early_stopping_patience = 0   # evaluations without improvement before stopping; 0 = off
  t.nonfinite = "skip"        # skip | stop: what a NaN/Inf loss or gradient does
  t.init_from = ""            # fine-tune from: another run's workdir, hf:gpt2 (-medium, -large, -xl) or a GPT-2 folder
  t.num_samples = 3           # samples printed at the end of a run
  t.sample_tokens = 200
  t.profile_steps = ""        # "START,END": a JAX profiler trace of those steps in WORKDIR/profile

  # --- optimizer (AdamW) and schedule.
  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-3
  o.schedule = "cosine"       # cosine | linear | constant (all after linear warmup)
  o.warmup_steps = 100
  o.min_lr_ratio = 0.1        # the floor of the decay, as a fraction of lr
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.decay_embeddings = False  # weight decay on matrices only by default
  o.clip_norm = 1.0           # global-norm clipping; 0 = off

  # --- device mesh: data x fsdp x tensor must equal the device count (or 1x1x1).
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1              # -1: all devices not used by the other axes
  mesh.fsdp = 1
  mesh.tensor = 1
  # XLA devices a CPU-only host is split into, one shard of the batch each, run side by
  # side: on 2 cores this trains ~18% faster than one device (docs/performance.md).
  # 0 = auto: one per core (at most 8) when the mesh is the default and the count
  # divides train.batch_size. Takes effect only before JAX starts; accelerators ignore it.
  mesh.cpu_devices = 0

  # --- multi-host (jax.distributed.initialize); empty = single process or auto-detect.
  dist = c.distributed = ml_collections.ConfigDict()
  dist.enabled = False
  dist.coordinator_address = ""
  dist.num_processes = 0
  dist.process_id = -1
  return c


class ConfigError(ValueError):
  """A config value is wrong; the message names the field and the fix."""


def validate_model(m) -> None:
  """Checks the model section; raises ConfigError with one clear sentence."""
  for name in ("num_layers", "num_heads", "embed_dim", "max_len", "mlp_ratio"):
    if int(m[name]) <= 0:
      raise ConfigError(f"model.{name} must be positive, got {m[name]}.")
  if m.vocab_size < 0:
    raise ConfigError(f"model.vocab_size must be positive (or 0 to take it from the tokenizer), got {m.vocab_size}.")
  if m.embed_dim % m.num_heads:
    raise ConfigError(
        f"model.embed_dim ({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads}); "
        "change one of them.")
  if m.pos_encoding not in POS_ENCODINGS:
    raise ConfigError(f"model.pos_encoding must be one of {', '.join(POS_ENCODINGS)}, got {m.pos_encoding!r}.")
  if m.activation not in ACTIVATIONS:
    raise ConfigError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}.")
  if m.pos_encoding == "sinusoidal" and m.embed_dim % 2:
    raise ConfigError(f"model.embed_dim ({m.embed_dim}) must be even for sinusoidal positions (sin/cos pairs).")
  if m.pos_encoding == "rope" and (m.embed_dim // m.num_heads) % 2:
    raise ConfigError(
        f"the head dim embed_dim/num_heads = {m.embed_dim // m.num_heads} must be even for rope; "
        "change model.embed_dim or model.num_heads.")
  for name in ("dropout", "attn_dropout"):
    if not 0.0 <= m[name] < 1.0:
      raise ConfigError(f"model.{name} must be in [0, 1), got {m[name]}.")
  if m.sliding_window < 0:
    raise ConfigError(f"model.sliding_window must be >= 0 (0 = off), got {m.sliding_window}.")
  if m.ln_eps <= 0:
    raise ConfigError(f"model.ln_eps must be positive, got {m.ln_eps}.")


def validate_compute(x, m) -> None:
  """Checks the compute section against the model it runs; one sentence per failure."""
  if x.kernels not in KERNELS:
    raise ConfigError(f"compute.kernels must be one of {', '.join(KERNELS)}, got {x.kernels!r}.")
  if x.dtype not in ("auto",) + DTYPES:
    raise ConfigError(f"compute.dtype must be one of auto, {', '.join(DTYPES)}, got {x.dtype!r}.")
  if x.param_dtype not in DTYPES:
    raise ConfigError(f"compute.param_dtype must be one of {', '.join(DTYPES)}, got {x.param_dtype!r}.")
  if x.remat not in REMAT:
    raise ConfigError(f"compute.remat must be one of {', '.join(REMAT)}, got {x.remat!r}.")
  if x.matmul_dtype not in ("",) + DTYPES:
    raise ConfigError(f"compute.matmul_dtype must be '' or one of {', '.join(DTYPES)}, got {x.matmul_dtype!r}.")
  if x.kernels in ("xla", "cudnn", "splash") and m.attn_dropout > 0:
    raise ConfigError(
        f"compute.kernels={x.kernels!r} has no attention-weight dropout; set model.attn_dropout=0 "
        "or use compute.kernels='cpu' or 'reference'.")



def validate(c) -> None:
  """Checks the whole config before anything is built or compiled."""
  validate_model(c.model)
  validate_compute(c.compute, c.model)
  t, o = c.train, c.optim
  if t.seq_len > c.model.max_len:
    raise ConfigError(
        f"train.seq_len ({t.seq_len}) is longer than model.max_len ({c.model.max_len}); "
        "raise model.max_len or lower train.seq_len.")
  for name in ("batch_size", "seq_len", "steps", "eval_every", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    if int(t[name]) <= 0:
      raise ConfigError(f"train.{name} must be positive, got {t[name]}.")
  if t.micro_batch_size < 0 or (t.micro_batch_size and t.batch_size % t.micro_batch_size):
    raise ConfigError(
        f"train.micro_batch_size ({t.micro_batch_size}) must divide train.batch_size ({t.batch_size}) "
        "(or be 0: auto).")
  profile_steps(t)
  if t.nonfinite not in ("skip", "stop"):
    raise ConfigError(f"train.nonfinite must be 'skip' or 'stop', got {t.nonfinite!r}.")
  if t.early_stopping_patience < 0:
    raise ConfigError(f"train.early_stopping_patience must be >= 0 (0 = off), got {t.early_stopping_patience}.")
  if o.lr <= 0:
    raise ConfigError(f"optim.lr must be positive, got {o.lr}.")
  if o.schedule not in ("cosine", "linear", "constant"):
    raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {o.schedule!r}.")
  if o.warmup_steps < 0:
    raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
  if not (0 <= o.clip_norm < math.inf and 0 <= o.weight_decay < math.inf):
    raise ConfigError("optim.clip_norm and optim.weight_decay must be finite and >= 0.")
  if not (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0):  # AdamW divides by 1 - b**t
    raise ConfigError(f"optim.b1 and optim.b2 must be in [0, 1), got {o.b1} and {o.b2}.")
  if not o.eps > 0:  # a parameter whose gradient is always 0 (padded vocabulary rows) would get 0/0
    raise ConfigError(f"optim.eps must be positive, got {o.eps}.")
  if c.data.source not in ("stories", "text", "hf"):
    raise ConfigError(f"data.source must be stories, text or hf, got {c.data.source!r}.")
  if c.data.path and c.data.source != "text":  # only source=text reads data.path: it would be ignored
    raise ConfigError(
        f"data.path is set ({c.data.path!r}) but data.source is {c.data.source!r}, which ignores it; "
        "set data.source=text to train on the file, or data.path='' to use the other source.")
  if c.data.tokenizer not in tokenizer_lib.KINDS:
    raise ConfigError(f"data.tokenizer must be char, bpe or byte, got {c.data.tokenizer!r}.")
  if c.data.unknown_chars not in tokenizer_lib.UNKNOWN_POLICIES:
    raise ConfigError(f"data.unknown_chars must be error or unk, got {c.data.unknown_chars!r}.")
  if c.data.tokenizer == "bpe":
    try:
      tokenizer_lib.check_bpe_vocab_size(int(c.data.bpe_vocab_size))
    except tokenizer_lib.TokenizerError as err:
      raise ConfigError(str(err)) from None
  if int(c.data.tokenizer_sample_chars) < 1:
    raise ConfigError(f"data.tokenizer_sample_chars must be positive, got {c.data.tokenizer_sample_chars}.")
  if int(c.data.num_proc) < 1:
    raise ConfigError(f"data.num_proc must be at least 1, got {c.data.num_proc}.")
  if not 0.0 < c.data.valid_fraction < 1.0:
    raise ConfigError(f"data.valid_fraction must be in (0, 1), got {c.data.valid_fraction}.")
  for name in ("data", "fsdp", "tensor"):
    v = c.mesh[name]
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{name} must be positive (or -1 for data: all remaining devices), got {v}.")
  if c.mesh.cpu_devices < 0:
    raise ConfigError(f"mesh.cpu_devices must be >= 0 (0 = auto: one per core), got {c.mesh.cpu_devices}.")


def profile_steps(t) -> tuple[int, int] | None:
  """train.profile_steps "START,END" as (START, END), None when off; ConfigError when malformed."""
  if not t.profile_steps:
    return None
  try:
    first, last = (int(v) for v in str(t.profile_steps).split(","))
  except ValueError:
    first, last = 0, -1
  if not 0 <= first < last:
    raise ConfigError(f"train.profile_steps must be 'START,END' with 0 <= START < END, got {t.profile_steps!r}.")
  return first, last


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
  """Rounds V up so the head's matmul has friendly sizes; extra ids are never sampled."""
  return round_up(tokenizer_vocab, max(multiple, 1))


def model_config(config, vocab_size: int | None = None) -> ModelConfig:
  """The architecture from `config.model`; `vocab_size` (the padded V) fills a 0 there."""
  validate_model(config.model)
  fields = {f.name: config.model[f.name] for f in dataclasses.fields(ModelConfig)}
  if vocab_size is not None:
    fields["vocab_size"] = int(vocab_size)
  if fields["vocab_size"] <= 0:
    raise ConfigError("model.vocab_size is 0 and no tokenizer was given to take it from.")
  return ModelConfig(**fields)


def execution(config, platform: str | None = None, mesh=None) -> Execution:
  """How the model is computed: `config.compute` with "auto" resolved for `platform`, and dropout.

  `platform` ("cpu", "gpu", "tpu") defaults to JAX's backend; `mesh`, the train step's,
  lays out the activations and runs per-device kernels (splash) per device.
  """
  validate_compute(config.compute, config.model)
  x = config.compute
  platform = platform or jax.default_backend()
  dtype = AUTO_DTYPES.get(platform, "float32") if x.dtype == "auto" else x.dtype
  kernels = AUTO_KERNELS.get(platform, "xla") if x.kernels == "auto" else x.kernels
  if kernels == "cudnn" and dtype not in ("bfloat16", "float16"):
    if x.kernels != "auto":
      raise ConfigError(
          f"compute.kernels='cudnn' runs in bfloat16 or float16 only; set compute.dtype=bfloat16 "
          f"(compute.dtype={x.dtype!r} is {dtype} on {platform}).")
    kernels = "xla"  # auto on a GPU in float32: cuDNN's flash attention takes 16-bit inputs only
  return Execution(kernels=kernels, dtype=dtype, param_dtype=x.param_dtype, matmul_dtype=x.matmul_dtype,
                   remat=x.remat, dropout=config.model.dropout, attn_dropout=config.model.attn_dropout, mesh=mesh)


# Fields of run folders written before `compute` split from `model`, moved from model to compute.
_MOVED = ("dtype", "param_dtype", "matmul_dtype", "remat")
_OLD_KERNELS = {"blocked": "cpu", "plain": "reference", "dot_product": "xla", "cudnn": "cudnn"}


def _upgrade(values: dict) -> dict:
  """An older config.json's values in today's layout (runs keep loading after a rename)."""
  values = json.loads(json.dumps(values))
  model, compute = values.get("model", {}), values.setdefault("compute", {})
  for key in _MOVED:
    if key in model:
      compute[key] = model.pop(key)
  if "attention" in model:
    compute["kernels"] = _OLD_KERNELS[model.pop("attention")]
  if isinstance(compute.get("remat"), bool):  # remat was on/off before it took a policy
    compute["remat"] = "full" if compute["remat"] else "none"
  model.pop("micro_batch_rows", None)  # now train.micro_batch_size (auto by default)
  train = values.get("train", {})
  if "grad_accum" in train:  # batch_size was per micro-batch then
    accum = int(train.pop("grad_accum"))
    if accum > 1:
      train["micro_batch_size"] = int(train["batch_size"])
      train["batch_size"] = int(train["batch_size"]) * accum
  return values


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict,
                    what: str = "override") -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with the dotted `overrides` ({"optim.lr": 3e-3}) set.

  A key that names no field, a section or a value of the wrong type is a ConfigError
  whose sentence starts with `what` ("sweep axis") and the key.
  """
  config = config.copy_and_resolve_references()
  config.lock()  # locked, ml_collections refuses new fields instead of adding them
  fix = "fix the name in the sweep file" if what.startswith("sweep") else "fix the name"
  for key, value in overrides.items():
    where, section, is_parent = _section(config, key)
    if is_parent and isinstance(section.get(key.rsplit(".", 1)[-1]), ml_collections.ConfigDict):
      raise ConfigError(f"{what} {key!r} is a section, not a field; name one of its fields.")
    try:
      config.update_from_flattened_dict({key: value})
    except KeyError as err:
      # ml_collections' hint, e.g. 'Did you mean "lr" instead of "lrr"?', when it has one.
      hint = re.search(r'Did you mean ("[^"]*")', str(err))
      hint = f"; did you mean {hint.group(1)}?" if hint else ""
      raise ConfigError(f"{what} {key!r} names no config field ({where} has {', '.join(sorted(section))}"
                        f"{hint}); {fix}.") from None
    except TypeError as err:
      raise ConfigError(f"{what} {key!r}: the value {value!r} does not fit the field ({err}).") from None
  config.unlock()
  return config


def _section(config: ml_collections.ConfigDict, key: str) -> tuple[str, ml_collections.ConfigDict, bool]:
  """(name, section, whether it is the key's parent): the deepest section the dotted `key` reaches."""
  parts, node = key.split(".")[:-1], config
  for i, part in enumerate(parts):
    if not isinstance(node.get(part), ml_collections.ConfigDict):
      return ".".join(parts[:i]) or "the config", node, False
    node = node[part]
  return ".".join(parts) or "the config", node, True


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """A run's config.json back as a ConfigDict over the current defaults (new fields get defaults)."""
  file = epath.Path(path)  # local or in a bucket
  if not file.is_file():
    raise ConfigError(f"{path} does not exist; point at a run folder that holds config.json.")
  try:
    values = json.loads(file.read_text())
  except ValueError as err:
    raise ConfigError(f"{path} is not valid JSON ({err}); restore it from a copy, or start the run again "
                      "from its config file in a new --workdir.") from None
  values = _upgrade(values)
  config = base_config()
  unknown = _merge(config, values, "")
  if unknown:
    raise ConfigError(f"{path} has fields this version does not know: {', '.join(unknown)}.")
  return config


def _merge(config, values: dict, prefix: str) -> list:
  unknown = []
  for k, v in values.items():
    if k not in config:
      unknown.append(prefix + k)
    elif isinstance(v, dict):
      unknown += _merge(config[k], v, prefix + k + ".")
    else:
      config[k] = v
  return unknown
