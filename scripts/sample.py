"""Write text with a trained run.

python scripts/sample.py --workdir=DIR | --model=hf:gpt2|HF_FOLDER [--prompt=TEXT | --prompt_file=FILE] [--num_samples=N]
    [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S] [--checkpoint=latest|best|STEP]
    [--config.mesh.KEY=VALUE] [--config.distributed.KEY=VALUE] [--config.data.unknown_chars=error|unk]

temperature=0 is greedy; top_k=0 and top_p=1.0 switch those filters off. An empty
prompt starts from the end-of-text token, as a new document does in training.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from jaxformer import checkpoint, cli, hf, sampling, tokenizer as tokenizer_lib
from jaxformer.config import base_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder made by scripts/train.py.")
_MODEL = flags.DEFINE_string("model", None, "Instead of a run: hf:gpt2 (hf:gpt2-medium, ...) or a GPT-2 folder in "
                             "the Hugging Face layout (config.json, model.safetensors, tokenizer.json).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (\"\" starts a new document).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file instead.")
_NUM = flags.DEFINE_integer("num_samples", 3, "How many samples of the prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 is off.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus: keep the smallest set with mass >= p; 1.0 is off.")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed and flags give the same text.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
flags.register_validator(_CHECKPOINT, cli.is_checkpoint, message=cli.CHECKPOINT_HELP)  # before any work
# Only the fields given on the command line are used: where to load the run (mesh.*, distributed.*)
# and what to do with prompt characters a char tokenizer has never seen (data.unknown_chars).
with cli.flag_errors():  # ml_collections reads the --config.KEY overrides here
  _CONFIG = config_flags.DEFINE_config_dict("config", base_config(), "Overrides: --config.mesh.*, "
                                            "--config.distributed.* (many hosts), --config.data.unknown_chars=unk.")


def main(argv):
  cli.flags_only(argv)
  cli.compilation_cache()  # the next call with the same shapes loads the compiled decode loop
  logging.set_verbosity(logging.ERROR)
  if _NUM.value < 1:
    raise cli.UsageError(f"--num_samples must be at least 1, got {_NUM.value}.")
  sampling.check_settings(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                          top_k=_TOP_K.value, top_p=_TOP_P.value)
  prompt = _PROMPT.value
  if _PROMPT_FILE.value:
    if not os.path.isfile(_PROMPT_FILE.value):
      raise cli.UsageError(f"--prompt_file={_PROMPT_FILE.value} does not exist; give a readable text file.")
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      prompt = f.read()
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  unknown = overrides.pop("data.unknown_chars", None)
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise cli.UsageError("give one of --workdir=RUN (a trained run) or --model=hf:gpt2 (or a GPT-2 folder).")
  if _MODEL.value:
    config, model, params, tok, _ = hf.load_model(_MODEL.value)
    step = _MODEL.value
  else:
    config, model, params, tok, step, _ = checkpoint.load_run(_WORKDIR.value, _CHECKPOINT.value, overrides)
  unknown = unknown or config.data.unknown_chars  # the flag, else the run's own policy
  if unknown not in tokenizer_lib.UNKNOWN_POLICIES:
    raise cli.UsageError(f"--config.data.unknown_chars={unknown}: use error or unk.")
  unseen = tokenizer_lib.unseen_chars(tok, prompt)
  texts = sampling.sample_text(
      params, model, tok, [prompt] * _NUM.value, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
      unknown_chars=unknown)
  if unseen:
    print(f"note: {sum(prompt.count(ch) for ch in unseen)} prompt characters "
          "the tokenizer has never seen were read as <|unk|>.")
  for i, text in enumerate(texts):
    print(f"--- sample {i + 1} of {len(texts)} ({'step ' if isinstance(step, int) else ''}{step}) ---")
    print(prompt + text)
  print("---")


if __name__ == "__main__":
  cli.main(main)
