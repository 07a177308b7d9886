"""Plots: the numbers behind them (attention weights, loss curves) and that each command writes a PNG."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import config as config_lib, model as model_lib, plots
from test_runs import fake_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_model(kernels, **changes):
  c = config_lib.base_config()
  c.model.update(dict(num_layers=2, num_heads=2, embed_dim=32, max_len=32, **changes))
  c.compute.kernels = kernels
  return model_lib.Transformer(config_lib.model_config(c, 64), config_lib.execution(c))


def allowed(T, window):
  """Causal (and sliding-window) attention, written out: query q sees keys k <= q, the last `window` of them."""
  q, k = np.arange(T)[:, None], np.arange(T)[None, :]
  return (k <= q) & ((q - k < window) if window else True)


@pytest.mark.parametrize("changes", [{}, {"pos_encoding": "rope", "sliding_window": 4},
                                     {"pos_encoding": "sinusoidal", "use_bias": False}])
def test_attention_weights_are_the_ones_the_model_uses(changes):
  model = micro_model("cpu", **changes)  # a run trained with the CPU kernels; the plot uses the reference ones
  params = model_lib.init_params(model.cfg, jax.random.key(0), model.ex)
  ids = np.array([63, 5, 9, 2, 7, 7, 1, 30, 12, 4])
  weights = plots.attention_weights(params, model, ids)  # (L, H, T, T)
  T = len(ids)
  assert weights.shape == (2, 2, T, T)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  mask = allowed(T, model.cfg.sliding_window)
  assert np.all(weights[..., ~mask] == 0) and np.all(weights[..., mask] > 0)
  # weights @ v through the output projection is the attention layer's output.
  capture = lambda p, x: model.apply(
      {"params": p}, x, mutable=["intermediates"], capture_intermediates=lambda mdl, _: mdl.name in ("qkv", "attn"))
  _, state = jax.jit(capture)(params, jnp.asarray(ids)[None])
  for i in range(model.cfg.num_layers):
    layer = state["intermediates"][f"block_{i}"]["attn"]
    v = layer["qkv"]["__call__"][0][0, :, 2]  # (T, H, D)
    proj = params[f"block_{i}"]["attn"]["proj"]
    y = jnp.einsum("hqk,khd->qhd", weights[i], v)
    y = jnp.einsum("qhd,hdc->qc", y, proj["kernel"]) + proj.get("bias", 0.0)
    np.testing.assert_allclose(y, layer["__call__"][0][0], atol=2e-5)


def test_loss_curves_against_steps_tokens_and_time(tmp_path):
  d = str(tmp_path / "run")
  fake_run(d, steps=8, total=8, evals={4: 3.0, 8: 2.5}, floor=0.5, train_every=2, tps=64.0)
  steps = plots.loss_curves(d, "step")
  np.testing.assert_array_equal(steps["train"][0], [2, 4, 6, 8])
  np.testing.assert_array_equal(steps["eval"][0], [4, 8])
  np.testing.assert_array_equal(steps["eval"][1], [3.0, 2.5])
  assert steps["floor"] == 0.5
  np.testing.assert_array_equal(plots.loss_curves(d, "tokens")["eval"][0], [4 * 32, 8 * 32])  # B=4, T=8
  # 2 steps of 32 tokens at 64 tokens/s: one second per logged window.
  np.testing.assert_allclose(plots.loss_curves(d, "time")["train"][0], [1, 2, 3, 4])
  with pytest.raises(ValueError, match="x must be one of"):
    plots.loss_curves(d, "epochs")
  with pytest.raises(FileNotFoundError, match="has no config.json or no metrics.jsonl"):
    plots.loss_curves(str(tmp_path / "nothing"), "step")


def test_every_plot_writes_a_png(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  fake_run(a, steps=8, total=8, evals={4: 3.0, 8: 2.5}, floor=0.5)
  fake_run(b, steps=6, total=8, evals={4: 3.2})
  c = config_lib.base_config()
  rows = [{"optim.lr": lr, "model.activation": act, "best_eval_loss": loss}
          for lr, act, loss in ((1e-3, "gelu", 2.0), (1e-2, "gelu", 1.8), (1e-3, "relu", 2.1), (1e-2, "relu", None))]
  weights = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 3, 5))  # (L, H, T, T)
  outputs = [
      plots.plot_losses([a, b], str(tmp_path / "loss.png"), x="tokens"),
      plots.plot_losses([a], str(tmp_path / "loss_time.png"), x="time", log_y=True),
      plots.plot_schedule(c.optim, 200, str(tmp_path / "lr.png")),
      *(plots.plot_positions(model_lib.ModelConfig(
          vocab_size=64, num_layers=2, num_heads=2, embed_dim=32, mlp_ratio=4, max_len=64, pos_encoding=encoding,
          rope_base=10000.0, sliding_window=0, activation="gelu", use_bias=True, tie_embeddings=True, ln_eps=1e-5),
          str(tmp_path / f"positions_{encoding}.png"), np.random.default_rng(0).normal(size=(64, 32)))
        for encoding in ("sinusoidal", "rope", "learned")),
      plots.plot_attention(weights, ["<eot>", "a", "b", "·", "c"], str(tmp_path / "attention.png")),
      plots.plot_sweep(rows, ["model.activation", "optim.lr"], str(tmp_path / "nested" / "sweep.png")),
  ]
  for out in outputs:
    with open(out, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 1000


def test_plot_script(tmp_path):
  def plot(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "plot.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  out = plot("lr", f"--config={REPO}/configs/tiny.py", "--config.optim.warmup_steps=50")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "wrote plots/lr.png" and os.path.getsize(tmp_path / "plots" / "lr.png") > 1000
  out = plot("loss")
  assert out.returncode == 1 and out.stderr.strip() == "error: plot.py loss needs at least one --workdir=RUN."
  # A glob over a sweep folder keeps the run folders (results.md is not one).
  fake_run(str(tmp_path / "sweep" / "a"), steps=8, total=8, evals={4: 3.0, 8: 2.5})
  fake_run(str(tmp_path / "sweep" / "b"), steps=8, total=8, evals={4: 3.1, 8: 2.7})
  (tmp_path / "sweep" / "results.md").write_text("| a table |\n")
  out = plot("loss", "--workdir=sweep/*", "--x=tokens")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "wrote plots/loss.png" and os.path.getsize(tmp_path / "plots" / "loss.png") > 1000
  out = plot("positions", f"--workdir={tmp_path}")
  assert out.returncode == 1 and out.stderr.strip() == (
      f"error: {tmp_path} has no tokenizer.json; point --workdir at a run folder made by scripts/train.py.")
  # Positions follow the run's encoding: a learned table exists only in a trained run.
  out = plot("positions", f"--config={REPO}/configs/tiny.py", "--config.model.pos_encoding=rope")
  assert out.returncode == 0 and out.stdout.strip() == "wrote plots/positions.png", out.stderr
  out = plot("positions", f"--config={REPO}/configs/tiny.py", "--config.model.pos_encoding=learned")
  assert out.returncode == 1 and out.stderr.strip() == (
      "error: learned positions exist only in a trained run; pass --workdir=RUN instead of --config.")
