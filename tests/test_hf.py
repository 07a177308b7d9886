"""GPT-2 in the Hugging Face layout: import, logits parity, tokenizer, export, fine-tuning.

The fixture (tests/fixtures/gpt2_tiny/: V=320, 64 positions, C=64, 2 layers, 4 heads,
biases and LayerNorms perturbed so that a mapping error moves the logits by 1 or more)
and HF's logits, loss and token ids for it were made once with torch 2.13.0 and
transformers by tests/fixtures/make_gpt2_tiny.py; these tests need neither.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open

from jaxformer import checkpoint, config as config_lib, hf, model as model_lib, runs, train
from jaxformer import tokenizer as tokenizer_lib
from jaxformer.config import ConfigError
from test_scripts import script
from test_train import assert_trees_equal, losses

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FOLDER = os.path.join(FIXTURES, "gpt2_tiny")
with open(os.path.join(FIXTURES, "gpt2_tiny_expected.json")) as f:
  EXPECTED = json.load(f)
ARRAYS = np.load(os.path.join(FIXTURES, "gpt2_tiny_expected.npz"))


@pytest.fixture(scope="module")
def imported():
  config, model, params, tok, _ = hf.load_model(FOLDER)
  return config, model, params, tok


def test_the_hf_config_picks_the_architecture(imported):
  _, model, _, _ = imported
  assert model.cfg == model_lib.ModelConfig(
      vocab_size=320, num_layers=2, num_heads=4, embed_dim=64, mlp_ratio=4, max_len=64, pos_encoding="learned",
      rope_base=10000.0, sliding_window=0, activation="gelu_tanh", use_bias=True, tie_embeddings=True, ln_eps=1e-5)


@pytest.mark.parametrize("kernels", ["cpu", "reference", "xla"])
def test_imported_logits_match_hf(imported, kernels):
  _, model, params, _ = imported
  model = model.clone(ex=dataclasses.replace(model.ex, kernels=kernels))
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ARRAYS["ids"]))
  np.testing.assert_allclose(logits, ARRAYS["logits"], atol=1e-4, rtol=0)
  assert (logits.argmax(-1) == ARRAYS["logits"].argmax(-1)).all()


def test_our_loss_on_hf_s_batch_is_hf_s_loss(imported):
  _, model, params, _ = imported
  ids = ARRAYS["ids"]
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones(ids[:, 1:].shape, np.float32)}
  loss, _ = train.cross_entropy(model.apply({"params": params}, batch["inputs"]), batch)
  assert float(loss) == pytest.approx(EXPECTED["loss"], abs=1e-4)


def test_the_tokenizer_from_vocab_and_merges_encodes_like_hf(tmp_path, imported):
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(FOLDER, name), tmp_path / name)
  for tok in (hf.load_tokenizer(str(tmp_path)), imported[3]):  # the two files; tokenizer.json
    ids = tokenizer_lib.encode(tok, EXPECTED["text"])
    assert ids == EXPECTED["text_ids"] == ARRAYS["text_ids"].tolist()
    assert tokenizer_lib.decode(tok, ids) == EXPECTED["text"]  # byte-exact, multi-byte characters included
    assert tokenizer_lib.eot_id(tok) == EXPECTED["eos_token_id"] == 319


def test_export_then_import_is_bitwise_and_looks_like_what_gpt2lmheadmodel_saves(tmp_path, imported):
  _, model, params, tok = imported
  hf.export(params, model.cfg, tok, str(tmp_path / "out"))
  _, model2, params2, tok2, _ = hf.load_model(str(tmp_path / "out"))
  assert model2.cfg == model.cfg and tok2.to_str() == tok.to_str()
  assert_trees_equal(params2, params)
  with safe_open(str(tmp_path / "out" / hf.WEIGHTS), framework="numpy") as f:
    ours = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert f.metadata() == EXPECTED["safetensors_metadata"]
  assert ours == {k: v for k, v in EXPECTED["param_names_shapes"].items()}
  with open(tmp_path / "out" / "config.json") as f, open(os.path.join(FOLDER, "config.json")) as g:
    exported, reference = json.load(f), json.load(g)
  assert set(exported) == set(reference) - {"transformers_version"}
  for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function",
              "layer_norm_epsilon", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
    assert exported[key] == reference[key], key
  assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))


def test_a_padded_import_scores_like_hf_and_exports_hf_s_rows(tmp_path, imported):
  # V padded to a multiple of 128: the fixture's 320 ids get 64 zero rows (GPT-2's 50257 get 47
  # with the default 64). The real ids' logits are HF's; export writes HF's 320 rows back.
  _, model, params, tok, _ = hf.load_model(FOLDER, vocab_multiple=128)
  assert model.cfg == dataclasses.replace(imported[1].cfg, vocab_size=384)
  table = np.asarray(params["embed"]["embedding"])
  np.testing.assert_array_equal(table[:320], np.asarray(imported[2]["embed"]["embedding"]))
  assert not table[320:].any()
  logits = np.asarray(model.apply({"params": params}, ARRAYS["ids"]))
  np.testing.assert_allclose(logits[..., :320], ARRAYS["logits"], atol=1e-4, rtol=0)
  assert hf.export(params, model.cfg, tok, str(tmp_path / "out")) == 320
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["vocab_size"] == 320
  _, model2, params2, _, _ = hf.load_model(str(tmp_path / "out"), vocab_multiple=1)
  assert model2.cfg == imported[1].cfg
  assert_trees_equal(params2, imported[2])


def test_a_checkpoint_with_more_ids_than_the_model_is_refused(imported):
  small = dataclasses.replace(imported[1].cfg, vocab_size=256)
  abstract = jax.eval_shape(lambda: model_lib.init_params(small, jax.random.key(0)))
  with pytest.raises(ConfigError, match="has 320 token ids, more than model.vocab_size=256"):
    hf.load_params(FOLDER, small, abstract)


def test_export_refuses_what_gpt2_cannot_express(imported):
  _, model, _, _ = imported
  for change, word in (({"pos_encoding": "rope"}, "pos_encoding=rope"), ({"tie_embeddings": False}, "tie_embeddings"),
                       ({"use_bias": False}, "use_bias"), ({"sliding_window": 16}, "sliding_window")):
    with pytest.raises(ConfigError, match=f"cannot be written as GPT-2: model.{word}"):
      hf.check_exportable(dataclasses.replace(model.cfg, **change))


def test_bad_sources_are_one_sentence(tmp_path):
  with pytest.raises(ConfigError, match="not a GPT-2 folder in the Hugging Face layout"):
    hf.resolve(str(tmp_path))
  # Offline (tests set HF_HUB_OFFLINE=1) with nothing cached: which files to put where.
  with pytest.raises(ConfigError, match="put its config.json, model.safetensors and tokenizer.json"):
    hf.resolve("hf:gpt2-this-does-not-exist")


def test_fine_tuning_from_the_fixture_resumes_bitwise(tmp_path):
  text = tmp_path / "corpus.txt"
  text.write_text((EXPECTED["text"] + "\n") * 40)

  def config(steps):
    c = config_lib.base_config()
    c.train.init_from = FOLDER
    c.data.update(dict(source="text", path=str(text), tokenizer="bpe", cache_dir=str(tmp_path / "cache"),
                       num_valid_batches=1))
    c.model.max_len = 64
    c.model.vocab_multiple = 128  # the fixture's 320 ids padded to 384, as GPT-2's 50257 to 50304
    c.train.update(dict(batch_size=4, seq_len=32, steps=steps, eval_every=2, checkpoint_every=1, log_every=1,
                        num_samples=0))
    c.optim.update(dict(lr=1e-3, warmup_steps=0))
    return c

  messages = []
  train.train_and_evaluate(config(4), str(tmp_path / "straight"), log=messages.append)
  assert any("fine-tuning from" in m and "GPT-2 weights" in m for m in messages), messages
  straight = runs.read_config(str(tmp_path / "straight"))
  assert (straight.model.num_layers, straight.model.embed_dim, straight.model.activation) == (2, 64, "gelu_tanh")
  assert straight.model.vocab_size == 384
  assert tokenizer_lib.fingerprint(runs.read_tokenizer(str(tmp_path / "straight"))) == \
      tokenizer_lib.fingerprint(hf.load_tokenizer(FOLDER))
  first = losses(tmp_path / "straight")[1]
  assert 0 < first < EXPECTED["loss"] + 2  # starts from the imported weights: near HF's loss, not log V
  train.train_and_evaluate(config(4), str(tmp_path / "resumed"), log=lambda *_: None, stop_at=2)
  train.train_and_evaluate(config(4), str(tmp_path / "resumed"), log=lambda *_: None)
  assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
  assert_trees_equal(checkpoint.load_run(str(tmp_path / "resumed"))[2],
                     checkpoint.load_run(str(tmp_path / "straight"))[2])


def test_sample_and_export_scripts(tmp_path):
  out = script("sample.py", f"--model={FOLDER}", "--prompt=Hello", "--temperature=0", "--max_new_tokens=8",
               "--num_samples=2")
  assert out.returncode == 0, out.stderr[-2000:]
  samples = out.stdout.split("---")
  assert "gpt2_tiny" in samples[1] and samples[2] == samples[4] and "Hello" in samples[2]  # greedy: the same twice
  out = script("sample.py", "--prompt=Hello")
  assert out.returncode == 1 and "give one of --workdir" in out.stderr
  out = script("export.py", f"--workdir={tmp_path / 'absent'}", f"--out={tmp_path / 'x'}")
  assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_import_lays_each_device_s_shard_only(tmp_path):
  # 4 CPU devices in a process of its own, an fsdp mesh: every device holds a quarter of
  # each matrix (make_array_from_callback hands it only its own slice).
  code = f"""
import jax
jax.config.update("jax_num_cpu_devices", 4)
import ml_collections
from jaxformer import hf, sharding
mesh = sharding.make_mesh(ml_collections.ConfigDict({{"data": 1, "fsdp": 4, "tensor": 1}}))
_, model, params, _, _ = hf.load_model({FOLDER!r}, mesh)
wte = params["embed"]["embedding"]
print(wte.shape, sorted({{s.data.shape for s in wte.addressable_shards}}), len(wte.addressable_shards))
"""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "(320, 64) [(320, 16)] 4"
