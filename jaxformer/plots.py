"""Figures of runs and models, each written to a PNG: losses, the LR schedule, attention, positions, sweeps.

matplotlib is an optional extra (`pip install 'jaxformer[plot]'`), imported on first use
with the file-only Agg backend. Data extraction is kept apart from drawing, so it is
testable without matplotlib. Run folders are read through runs.py.
"""

import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import checkpoint
from jaxformer import kernels
from jaxformer import model as model_lib
from jaxformer import optim
from jaxformer import runs
from jaxformer import tokenizer as tokenizer_lib


class PlotError(ValueError):
  """A plot that cannot be drawn from what was given; the message says what to change."""

X_AXES = ("step", "tokens", "time")
X_LABELS = {"step": "step", "tokens": "tokens seen",
            "time": "training time (s, from logged tokens/s; evaluation excluded)"}


MISSING = "plots need matplotlib; install it with pip install 'jaxformer[plot]'."


def available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(MISSING) from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, out: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120, bbox_inches="tight")
  _pyplot().close(fig)
  return out


# ---------------------------------------------------------------------------- losses


def loss_curves(run_dir: str, x: str = "step") -> dict:
  """{"train": (xs, losses), "eval": (xs, losses), "floor": float | None} of one run folder.

  x: step, tokens (step x batch_size x seq_len) or time (training seconds
  rebuilt from the tokens/s of each logged window, so evaluation and saving are left out).
  """
  if x not in X_AXES:
    raise PlotError(f"x must be one of {', '.join(X_AXES)}, got {x!r}.")
  config = runs.read_config(run_dir)
  rows = runs.read_metrics(run_dir)
  if config is None or not rows:
    raise FileNotFoundError(f"{run_dir} has no config.json or no metrics.jsonl rows; point at a run folder "
                            "made by scripts/train.py.")
  logged = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  per_step = runs.tokens_per_step(config)

  def to_x(steps):
    steps = np.asarray(steps, np.float64)
    if x == "step":
      return steps
    if x == "tokens":
      return steps * per_step
    timed = [r for r in logged if r.get("tokens_per_sec")]
    if not timed:
      raise PlotError(f"{run_dir} has no tokens_per_sec rows to rebuild training time from; use x=step.")
    s = np.array([0.0] + [r["step"] for r in timed])
    secs = np.concatenate([[0.0], np.cumsum(np.diff(s) * per_step / np.array([r["tokens_per_sec"] for r in timed]))])
    return np.interp(steps, s, secs)

  floor = next((r["eval/entropy_floor"] for r in reversed(evals) if "eval/entropy_floor" in r), None)
  return {"train": (to_x([r["step"] for r in logged]), np.array([r["train/loss"] for r in logged])),
          "eval": (to_x([r["step"] for r in evals]), np.array([r["eval/loss"] for r in evals])),
          "floor": floor}


def plot_losses(run_dirs: Sequence[str], out: str, x: str = "step", labels: Optional[Sequence[str]] = None,
                log_y: bool = False) -> str:
  """Training (thin) and validation (markers) loss of each run on one figure; entropy floors dashed."""
  plt = _pyplot()
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  fig, ax = plt.subplots(figsize=(8, 5))
  handles, floors = [], {}
  for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
    curves = loss_curves(run_dir, x)
    color = f"C{i % 10}"
    ax.plot(*curves["train"], color=color, alpha=0.45, linewidth=1)
    if len(curves["eval"][0]):
      ax.plot(*curves["eval"], color=color, marker="o", markersize=4, linewidth=1.8)
    handles.append(Line2D([], [], color=color, linewidth=1.8, label=label))
    if curves["floor"] is not None:
      floors.setdefault(round(curves["floor"], 4), color)
  handles += [Line2D([], [], color="gray", alpha=0.45, linewidth=1, label="training"),
              Line2D([], [], color="gray", marker="o", markersize=4, linewidth=1.8, label="validation")]
  for floor, color in floors.items():
    # Floors differ only between tokenizers (nats per token); one line per distinct floor.
    line = ax.axhline(floor, color=color if len(floors) > 1 else "black", linestyle="--", linewidth=1,
                      label=f"entropy floor {floor:.4f}")
    handles.append(line)
  ax.set_xlabel(X_LABELS[x])
  ax.set_ylabel("loss (nats per token)")
  if log_y:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.set_title("loss")
  return _save(fig, out)


# ---------------------------------------------------------------------------- schedule, positions


def plot_schedule(optim_cfg, total_steps: int, out: str) -> str:
  """The learning rate at every step, exactly as the optimizer computes it."""
  plt = _pyplot()
  steps = np.arange(total_steps + 1)
  lr = np.asarray(optim.schedule(optim_cfg, total_steps)(steps))
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, lr)
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate")
  ax.set_title(f"{optim_cfg.schedule} schedule: peak {optim_cfg.lr:g}, warmup {optim_cfg.warmup_steps}, "
               f"floor {optim_cfg.lr * optim_cfg.min_lr_ratio:g}")
  ax.grid(alpha=0.3)
  return _save(fig, out)


def plot_positions(model_cfg, out: str, learned_table: Optional[np.ndarray] = None) -> str:
  """The model's own position encoding: the sinusoidal table, RoPE's rotations or a learned table.

  sinusoidal: PE (T_max, C) and a few of its columns. rope: the angle pos * theta_i
  each query/key channel pair turns by (as cos), and the wavelengths. learned: the
  run's table (T_max, C) and the cosine similarity between positions.
  """
  plt = _pyplot()
  T, C, encoding = model_cfg.max_len, model_cfg.embed_dim, model_cfg.pos_encoding
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  if encoding == "sinusoidal":
    table = model_lib.sinusoidal_table(T, C)  # (T_max, C)
    image = left.imshow(table, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    left.set_xlabel("channel (even: sin, odd: cos)")
    left.set_title(f"sinusoidal positional encoding, T_max={T}, C={C}")
    for d in sorted({2 * (C // 16), 2 * (C // 8), 2 * (C // 4), 2 * (3 * C // 8)}):
      right.plot(table[:, d], label=f"channel {d}", linewidth=1)
    right.set_xlabel("position")
    right.set_title("low channels turn fast, high channels slowly")
    right.legend(fontsize=7)
  elif encoding == "rope":
    D = model_cfg.head_dim
    angles = np.asarray(kernels.attention.rope_angles(T, D, model_cfg.rope_base))  # (T_max, D/2)
    image = left.imshow(np.cos(angles), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    left.set_xlabel(f"channel pair i (channel i with i + {D // 2})")
    left.set_title(f"RoPE: cos(pos * theta_i), D={D}, base={model_cfg.rope_base:g}")
    wavelength = 2 * np.pi / angles[1]  # positions per full turn of each pair
    right.semilogy(wavelength, marker=".", linewidth=1)
    right.axhline(T, color="gray", linestyle="--", linewidth=1, label=f"T_max = {T}")
    right.set_xlabel("channel pair i")
    right.set_ylabel("wavelength (positions per turn)")
    right.set_title("theta_i = base^(-2i/D): early pairs turn fast, late pairs slowly")
    right.legend(fontsize=7)
  else:
    if learned_table is None:
      raise ValueError("a learned position table exists only in a trained run; plot it with --workdir=RUN.")
    table = np.asarray(learned_table, np.float32)  # (T_max, C)
    limit = float(np.max(np.abs(table))) or 1.0
    image = left.imshow(table, aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit, interpolation="nearest")
    left.set_xlabel("channel")
    left.set_title(f"learned positional embeddings, T_max={T}, C={C}")
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    similarity = right.imshow(unit @ unit.T, cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    right.set_xlabel("position")
    right.set_title("cosine similarity between positions")
    fig.colorbar(similarity, ax=right)
  left.set_ylabel("position")
  fig.colorbar(image, ax=left)
  return _save(fig, out)


def position_encoding(workdir: str, which: str = "best"):
  """(ModelConfig, its learned (T_max, C) table or None) of checkpoint `which` of a trained run."""
  _, model, params, *_ = checkpoint.load_run(workdir, which)
  table = params.get("pos_embed")
  return model.cfg, None if table is None else np.asarray(jax.device_get(table))


# ---------------------------------------------------------------------------- attention


def attention_weights(params, model, ids) -> np.ndarray:
  """The softmax attention weights (L, H, T, T) of every layer and head of `model` for one token sequence.

  The model runs with its reference kernels, whose attention keeps each block's weights
  (`sow`, collection "intermediates"). Parameters do not depend on the kernels, so these
  are the weights of a run trained with any of them, up to float rounding.
  """
  reference = model.clone(ex=dataclasses.replace(model.ex, kernels="reference"))
  tokens = jnp.asarray(ids, jnp.int32)[None]  # (1, T)
  _, state = jax.jit(lambda p, x: reference.apply({"params": p}, x, mutable=["intermediates"]))(params, tokens)
  sown = state["intermediates"]
  # A sow keeps a tuple of what was sown; one call sows each block's (1, H, T, T) once.
  return np.stack([np.asarray(sown[f"block_{i}"]["attn"]["attention_weights"][0][0])
                   for i in range(model.cfg.num_layers)])


def token_labels(tokenizer, ids) -> list[str]:
  eot = tokenizer_lib.eot_id(tokenizer)
  labels = []
  for i in ids:
    text = "<eot>" if i == eot else tokenizer_lib.decode(tokenizer, [i])
    labels.append(text.replace("\n", "\\n").replace(" ", "·") or "?")
  return labels


def prompt_attention(workdir: str, prompt: str, which: str = "best"):
  """(weights (L, H, T, T), token labels) of a trained run for `prompt`, after an EOT as in training."""
  _, model, params, tok, _, _ = checkpoint.load_run(workdir, which)
  ids = [tokenizer_lib.eot_id(tok)] + tokenizer_lib.encode(tok, prompt)
  if len(ids) > model.cfg.max_len:
    raise PlotError(f"the prompt is {len(ids) - 1} tokens; the model sees at most {model.cfg.max_len - 1} "
                     "after the EOT. Shorten the prompt.")
  return attention_weights(params, model, ids), token_labels(tok, ids)


def plot_attention(weights: np.ndarray, labels: Sequence[str], out: str, title: str = "") -> str:
  """One panel per layer (rows) and head (columns): query positions down, key positions across."""
  plt = _pyplot()
  L, H, T, _ = weights.shape
  cell = 2.2 if T <= 24 else 3.2
  fig, axes = plt.subplots(L, H, figsize=(cell * H, cell * L), squeeze=False)
  ticks = T <= 48
  for layer in range(L):
    for head in range(H):
      ax = axes[layer][head]
      ax.imshow(weights[layer, head], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
      ax.set_title(f"layer {layer}, head {head}", fontsize=8)
      if ticks:
        ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
        ax.set_yticks(range(T), labels, fontsize=5)
      else:
        ax.set_xticks([])
        ax.set_yticks([])
  fig.suptitle(title or "attention weights (rows: queries, columns: keys)", fontsize=10)
  fig.tight_layout()
  return _save(fig, out)


# ---------------------------------------------------------------------------- sweeps


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(rows: list[dict], axes: list[str], out: str) -> str:
  """Best validation loss against each swept axis; points that share the other axes' values are joined.

  Pruned trials (a row whose status starts with "pruned") are crosses at the loss they had
  when stopped, never joined: that loss is not comparable with a finished run's.
  """
  plt = _pyplot()
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  scored = [r for r in rows if r.get("best_eval_loss") is not None]
  is_pruned = lambda r: str(r.get("status", "")).startswith("pruned")
  names = runs.short_keys(axes)
  fig, panels = plt.subplots(1, max(len(axes), 1), figsize=(5 * max(len(axes), 1), 4), squeeze=False)
  for ax, axis in zip(panels[0], axes):
    values = [r[axis] for r in scored]
    numeric = _numeric(values)
    categories = sorted({runs.format_value(v) for v in values}) if not numeric else []
    position = (lambda v: v) if numeric else (lambda v: categories.index(runs.format_value(v)))
    # Axes held at one value would only repeat themselves in every label.
    others = [a for a in axes if a != axis and len({runs.format_value(r[a]) for r in scored}) > 1]
    groups = {}
    for r in scored:
      groups.setdefault(tuple(runs.format_value(r[a]) for a in others), []).append(r)
    search = len(groups) > 10  # a random or TPE search: every trial its own group; one colour, unjoined
    if search:
      groups, others = {(): scored}, []
    for i, (key, members) in enumerate(sorted(groups.items())):
      members = sorted(members, key=lambda r: position(r[axis]))
      kept, pruned = [r for r in members if not is_pruned(r)], [r for r in members if is_pruned(r)]
      label = ",".join(f"{names[a]}={v}" for a, v in zip(others, key)) or None
      color = f"C{i % 10}"
      ax.plot([position(r[axis]) for r in kept], [r["best_eval_loss"] for r in kept], color=color,
              marker="o", linestyle="-" if len(kept) > 1 and not search else "none", label=label)
      ax.plot([position(r[axis]) for r in pruned], [r["best_eval_loss"] for r in pruned], color=color,
              marker="x", markersize=8, linestyle="none")
    if numeric and values and min(values) > 0 and max(values) >= 10 * min(values):
      ax.set_xscale("log")
    distinct = sorted(set(values)) if numeric else []
    if 0 < len(distinct) <= 8:  # a grid: tick exactly the values tried
      ax.minorticks_off()
      ax.set_xticks(distinct, [runs.format_value(v) for v in distinct])
    if categories:
      ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(names[axis])
    ax.set_ylabel("best validation loss")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] if others and 1 < len(groups) <= 10 else []
    if any(is_pruned(r) for r in scored):
      handles.append(Line2D([], [], color="gray", marker="x", linestyle="none", label="pruned (loss when stopped)"))
    if handles:
      ax.legend(handles=handles, fontsize=7)
  if not axes:
    panels[0][0].set_axis_off()
  n_pruned = sum(map(is_pruned, scored))
  fig.suptitle(f"{len(scored)} of {len(rows)} trials with a validation loss"
               + (f", {n_pruned} pruned" if n_pruned else ""), fontsize=9)
  fig.tight_layout()
  return _save(fig, out)
