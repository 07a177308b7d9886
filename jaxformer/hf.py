"""GPT-2 in the Hugging Face layout: import (`hf:gpt2`, or a local folder) and export.

A folder holds `config.json` (GPT2Config), `model.safetensors` and the tokenizer
(`tokenizer.json`, or `vocab.json` + `merges.txt`). HF's GPT-2 keeps its linear
layers as Conv1D, kernels (in, out) like ours; `c_attn` packs q, k, v along its
output, heads inside each; the head is tied to the token embedding. `names` is the
one mapping, used both ways.

On import the token table is padded with zero rows to a multiple of
model.vocab_multiple (64: GPT-2's 50257 ids to 50304, and the head's matmul then
tiles, 1.22x faster on an H200); the padded ids are never scored or sampled.
Export writes the tokenizer's rows only.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxformer import config as config_lib
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.config import ConfigError
from jaxformer.model import ModelConfig

PREFIX = "hf:"
WEIGHTS = "model.safetensors"
# GPT2Config.activation_function <-> model.activation ("gelu_pytorch_tanh" is the same function).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def is_hf(source: str) -> bool:
  return str(source).startswith(PREFIX)


def resolve(source: str) -> str:
  """The local folder of `source`: `hf:NAME` through huggingface_hub (cached; HF_HUB_OFFLINE is
  respected), or a folder in the HF layout as it is."""
  if not is_hf(source):
    missing = [f for f in ("config.json", WEIGHTS) if not os.path.isfile(os.path.join(source, f))]
    if missing:
      raise ConfigError(f"{source} is not a GPT-2 folder in the Hugging Face layout (no {', '.join(missing)}); "
                        "give hf:gpt2 or a folder with config.json, model.safetensors and tokenizer.json.")
    return source
  repo = source[len(PREFIX):]
  import huggingface_hub  # imported here: only imports need the hub
  try:
    return huggingface_hub.snapshot_download(
        repo, allow_patterns=["config.json", WEIGHTS, "tokenizer.json", "vocab.json", "merges.txt"])
  except Exception as err:  # offline, no cache, unknown name: all end here
    why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    raise ConfigError(
        f"could not get {repo} from the Hugging Face hub ({why}); without the network, put its config.json, "
        f"model.safetensors and tokenizer.json (or vocab.json and merges.txt) in a folder and give that folder "
        f"instead of {source}.") from None


def read_config(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


def model_values(hf: dict, vocab_multiple: int) -> dict:
  """config.model values (dotted keys) for an HF GPT2Config, V padded to `vocab_multiple`."""
  if hf.get("model_type", "gpt2") != "gpt2":
    raise ConfigError(f"the checkpoint is a {hf.get('model_type')!r} model; only GPT-2 (model_type gpt2) imports.")
  act = hf.get("activation_function", "gelu_new")
  if act not in ACTIVATIONS:
    raise ConfigError(f"GPT-2 activation {act!r} has no counterpart here; known: {', '.join(ACTIVATIONS)}.")
  C = hf["n_embd"]
  inner = hf.get("n_inner") or 4 * C
  if inner % C:
    raise ConfigError(f"n_inner={inner} is not a multiple of n_embd={C}; model.mlp_ratio must be a whole number.")
  if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or not hf.get(
      "scale_attn_weights", True):
    raise ConfigError("the checkpoint scales attention another way than GPT-2 (scale_attn_*, reorder_and_upcast_"
                      "attn); only GPT-2's 1/sqrt(head_dim) imports.")
  if not hf.get("tie_word_embeddings", True):
    raise ConfigError("the checkpoint's head is not tied to its embedding; only tied GPT-2 heads import.")
  return {"model.num_layers": hf["n_layer"], "model.num_heads": hf["n_head"], "model.embed_dim": C,
          "model.max_len": hf["n_positions"], "model.vocab_multiple": vocab_multiple,
          "model.vocab_size": config_lib.padded_vocab_size(hf["vocab_size"], vocab_multiple),
          "model.mlp_ratio": inner // C, "model.pos_encoding": "learned", "model.activation": ACTIVATIONS[act],
          "model.use_bias": True, "model.tie_embeddings": True, "model.sliding_window": 0,
          "model.ln_eps": float(hf.get("layer_norm_epsilon", 1e-5))}


def load_tokenizer(folder: str) -> Tokenizer:
  """GPT-2's byte-level BPE from `tokenizer.json`, else from `vocab.json` + `merges.txt`."""
  path = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(path):
    tok = tokenizer_lib.load_tokenizer(path)
  elif all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
    # What GPT2TokenizerFast builds from the two files: bytes to symbols, no prefix space.
    tok = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  else:
    raise ConfigError(f"{folder} has no tokenizer: put GPT-2's tokenizer.json (or vocab.json and merges.txt) there.")
  if tok.token_to_id(tokenizer_lib.EOT) is None:
    raise ConfigError(f"the tokenizer in {folder} has no {tokenizer_lib.EOT} token; it is not GPT-2's.")
  tok.add_special_tokens([tokenizer_lib.EOT])  # already in the vocab: marks it special, as HF does
  return tok


def names(cfg: ModelConfig, vocab_size: int) -> dict[tuple, tuple[str, tuple]]:
  """{our parameter path: (HF tensor name, HF shape)} for a GPT-2 architecture of `vocab_size` ids.

  Our token table has cfg.vocab_size rows, the padded V; HF's has vocab_size, the first of them.
  """
  C, H, D, L = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.num_layers
  F = cfg.mlp_ratio * C
  out = {("embed", "embedding"): ("wte.weight", (vocab_size, C)),
         ("pos_embed",): ("wpe.weight", (cfg.max_len, C)),
         ("ln_f", "scale"): ("ln_f.weight", (C,)), ("ln_f", "bias"): ("ln_f.bias", (C,))}
  for i in range(L):
    b, h = f"block_{i}", f"h.{i}"
    out.update({
        (b, "ln1", "scale"): (f"{h}.ln_1.weight", (C,)), (b, "ln1", "bias"): (f"{h}.ln_1.bias", (C,)),
        (b, "attn", "qkv", "kernel"): (f"{h}.attn.c_attn.weight", (C, 3 * C)),  # ours (C, 3, H, D)
        (b, "attn", "qkv", "bias"): (f"{h}.attn.c_attn.bias", (3 * C,)),        # ours (3, H, D)
        (b, "attn", "proj", "kernel"): (f"{h}.attn.c_proj.weight", (C, C)),     # ours (H, D, C)
        (b, "attn", "proj", "bias"): (f"{h}.attn.c_proj.bias", (C,)),
        (b, "ln2", "scale"): (f"{h}.ln_2.weight", (C,)), (b, "ln2", "bias"): (f"{h}.ln_2.bias", (C,)),
        (b, "mlp", "fc", "kernel"): (f"{h}.mlp.c_fc.weight", (C, F)),
        (b, "mlp", "fc", "bias"): (f"{h}.mlp.c_fc.bias", (F,)),
        (b, "mlp", "proj", "kernel"): (f"{h}.mlp.c_proj.weight", (F, C)),
        (b, "mlp", "proj", "bias"): (f"{h}.mlp.c_proj.bias", (C,)),
    })
  return out


def _path(keypath) -> tuple:
  return tuple(k.key for k in keypath)


def load_params(folder: str, cfg: ModelConfig, abstract_params) -> Any:
  """The checkpoint's weights as our parameters, each laid out by its target's sharding.

  One tensor at a time is read on the host; each device receives only its own shard
  (jax.make_array_from_callback), so no device ever holds the whole model.
  """
  from safetensors import safe_open  # a dependency of the import path only
  V = read_config(folder)["vocab_size"]
  if V > cfg.vocab_size:
    raise ConfigError(f"{folder} has {V} token ids, more than model.vocab_size={cfg.vocab_size}; "
                      "leave model.vocab_size to the checkpoint's config.json.")
  mapping = names(cfg, V)
  with safe_open(os.path.join(folder, WEIGHTS), framework="numpy") as f:
    stored = {k.removeprefix("transformer."): k for k in f.keys()}
    missing = [hf for hf, _ in mapping.values() if hf not in stored]
    if missing:
      raise ConfigError(f"{folder}/{WEIGHTS} lacks {len(missing)} GPT-2 tensors (e.g. {missing[0]}); "
                        "its config.json does not describe these weights.")

    def load(keypath, target):
      hf_name, hf_shape = mapping[_path(keypath)]
      value = f.get_tensor(stored[hf_name])
      if value.shape != hf_shape:
        raise ConfigError(f"{hf_name} has shape {value.shape}, but config.json implies {hf_shape}.")
      if hf_name == "wte.weight":  # the padded ids' rows: zero, never scored or sampled
        value = np.pad(value, ((0, target.shape[0] - V), (0, 0)))
      value = np.ascontiguousarray(value.reshape(target.shape).astype(target.dtype))
      return jax.make_array_from_callback(target.shape, target.sharding, lambda index: value[index])

    return jax.tree_util.tree_map_with_path(load, abstract_params)


def check_exportable(cfg: ModelConfig) -> None:
  """Refuses, naming the difference, an architecture GPT2LMHeadModel cannot express."""
  problems = []
  if cfg.pos_encoding != "learned":
    problems.append(f"model.pos_encoding={cfg.pos_encoding} (GPT-2 has learned positions)")
  if not cfg.tie_embeddings:
    problems.append("model.tie_embeddings=False (GPT-2's head is the token embedding)")
  if not cfg.use_bias:
    problems.append("model.use_bias=False (GPT-2 has biases)")
  if cfg.activation not in EXPORT_ACTIVATIONS:
    problems.append(f"model.activation={cfg.activation}")
  if cfg.sliding_window:
    problems.append(f"model.sliding_window={cfg.sliding_window} (GPT-2 attends to every earlier token)")
  if problems:
    raise ConfigError(f"this run cannot be written as GPT-2: {'; '.join(problems)}.")


def hf_config(cfg: ModelConfig, vocab_size: int, eot: int) -> dict:
  """GPT2Config's fields, as transformers writes them, for `cfg` with `vocab_size` ids."""
  return {"activation_function": EXPORT_ACTIVATIONS[cfg.activation], "add_cross_attention": False,
          "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.0, "bos_token_id": eot, "dtype": "float32",
          "embd_pdrop": 0.0, "eos_token_id": eot, "initializer_range": 0.02, "layer_norm_epsilon": cfg.ln_eps,
          "model_type": "gpt2", "n_embd": cfg.embed_dim, "n_head": cfg.num_heads,
          "n_inner": cfg.mlp_ratio * cfg.embed_dim, "n_layer": cfg.num_layers, "n_positions": cfg.max_len,
          "pad_token_id": None, "reorder_and_upcast_attn": False, "resid_pdrop": 0.0,
          "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "summary_activation": None,
          "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
          "summary_use_proj": True, "tie_word_embeddings": True, "use_cache": True,
          "vocab_size": vocab_size}


def export(params, cfg: ModelConfig, tok: Tokenizer, out_dir: str) -> int:
  """Writes `params` as an HF GPT-2 folder: config.json, model.safetensors, tokenizer files.

  Returns V as written: the tokenizer's ids, without the model's padding.
  """
  from safetensors.numpy import save_file
  check_exportable(cfg)
  V = min(tokenizer_lib.vocab_size(tok), cfg.vocab_size)  # the padded ids' rows stay behind
  mapping = names(cfg, V)
  tensors = {}
  for keypath, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    hf_name, hf_shape = mapping[_path(keypath)]
    value = np.asarray(jax.device_get(value), np.float32)
    tensors[f"transformer.{hf_name}"] = (value[:V] if hf_name == "wte.weight" else value).reshape(hf_shape)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  eot = tokenizer_lib.eot_id(tok)
  (out / "config.json").write_text(json.dumps(hf_config(cfg, V, eot), indent=2) + "\n")
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  bpe = tokenizer_lib.kind(tok) == "bpe"
  if bpe:  # GPT2Tokenizer (the slow one) reads these two
    tok.model.save(out_dir)
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2Tokenizer" if bpe else "PreTrainedTokenizerFast", "model_max_length": cfg.max_len,
       "add_prefix_space": False,
       "bos_token": tokenizer_lib.EOT, "eos_token": tokenizer_lib.EOT, "unk_token": tokenizer_lib.EOT},
      indent=2) + "\n")
  (out / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": tokenizer_lib.EOT, "eos_token": tokenizer_lib.EOT, "unk_token": tokenizer_lib.EOT}, indent=2) + "\n")
  return V


def load_model(source: str, mesh=None, vocab_multiple: int | None = None):
  """(config, model, params, tokenizer, mesh) of an HF GPT-2 (`hf:NAME` or a folder), ready to sample.

  V is padded to `vocab_multiple`, by default the base config's model.vocab_multiple.
  """
  from jaxformer import checkpoint, model as model_lib, sharding  # imported by train
  folder = resolve(source)
  base = config_lib.base_config()
  values = model_values(read_config(folder), vocab_multiple or base.model.vocab_multiple)
  config = config_lib.apply_overrides(base, {**values, "data.tokenizer": "bpe"}, source)
  model = model_lib.Transformer(config_lib.model_config(config), config_lib.execution(config))
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  abstract = checkpoint.abstract_like(
      jax.eval_shape(lambda: model_lib.init_params(model.cfg, jax.random.key(0), model.ex)),
      sharding.param_shardings(model.cfg, mesh))
  return config, model, load_params(folder, model.cfg, abstract), load_tokenizer(folder), mesh
