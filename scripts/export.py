"""Write a trained GPT-2-architecture run as a Hugging Face folder.

python scripts/export.py --workdir=RUN --out=DIR [--checkpoint=latest|best|STEP]

DIR gets config.json, model.safetensors and the tokenizer files, which
transformers.GPT2LMHeadModel.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR)
read. A run GPT-2 cannot express (RoPE, sinusoidal positions, no biases, an untied
head, ...) is refused with the difference named.
"""

from absl import flags, logging

from jaxformer import checkpoint, cli, hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder made by scripts/train.py.", required=True)
_OUT = flags.DEFINE_string("out", None, "Folder to write (made if absent).", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
flags.register_validator(_CHECKPOINT, cli.is_checkpoint, message=cli.CHECKPOINT_HELP)


def main(argv):
  cli.flags_only(argv)
  logging.set_verbosity(logging.ERROR)
  config, model, params, tok, step, _ = checkpoint.load_run(_WORKDIR.value, _CHECKPOINT.value)
  V = hf.export(params, model.cfg, tok, _OUT.value)
  print(f"wrote step {step} of {_WORKDIR.value} to {_OUT.value} (GPT-2, {model.cfg.num_layers} layers, "
        f"C={model.cfg.embed_dim}, V={V})")


if __name__ == "__main__":
  cli.main(main)
