"""Config overrides through ml_collections' own API, and older run folders' configs."""

import json

import pytest

from jaxformer import config as config_lib
from jaxformer.config import ConfigError


def test_apply_overrides_sets_fields_on_a_copy():
  base = config_lib.base_config()
  c = config_lib.apply_overrides(base, {"optim.lr": 3, "train.steps": 40, "seed": 9, "data.path": "a.txt"})
  assert (c.optim.lr, c.train.steps, c.seed, c.data.path) == (3.0, 40, 9, "a.txt")
  assert isinstance(c.optim.lr, float)  # the field's type is kept
  assert (base.optim.lr, base.train.steps) == (1e-3, 1000)  # the original is untouched
  assert not c.is_locked
  c.optim.new_field = 1  # an unlocked copy, as apply_overrides always returned


@pytest.mark.parametrize("key, value, message", [
    ("optim.lrr", 1.0, "override 'optim.lrr' names no config field (optim has b1, b2, clip_norm, "
                       "decay_embeddings, eps, lr, min_lr_ratio, schedule, warmup_steps, weight_decay; "
                       "did you mean \"lr\"?); fix the name."),
    ("optimizer.lr", 1.0, "override 'optimizer.lr' names no config field (the config has "),
    ("optim.lr.x", 1.0, "override 'optim.lr.x' names no config field (optim has b1, "),
    ("optim", 1.0, "override 'optim' is a section, not a field; name one of its fields."),
    ("train.steps", 1.5, "override 'train.steps': the value 1.5 does not fit the field ("),
])
def test_apply_overrides_errors_are_one_sentence(key, value, message):
  with pytest.raises(ConfigError) as err:
    config_lib.apply_overrides(config_lib.base_config(), {key: value})
  assert str(err.value).startswith(message)
  assert "\n" not in str(err.value)


def test_sweep_overrides_say_where_to_fix_them():
  with pytest.raises(ConfigError, match=r"^sweep axis 'seedd' names no config field \(the config has .*seed.*; "
                                        r"did you mean \"seed\"\?\); fix the name in the sweep file\.$"):
    config_lib.apply_overrides(config_lib.base_config(), {"seedd": 1}, "sweep axis")


def test_a_config_json_from_before_the_compute_section_still_loads(tmp_path):
  """Run folders written before kernels/precision moved to `compute` keep loading, values mapped."""
  old = config_lib.base_config().to_dict()
  compute = old.pop("compute")
  old["model"].update(attention="plain", dtype="bfloat16", param_dtype="float32", matmul_dtype="",
                      remat=True, micro_batch_rows=4)
  old["train"].pop("micro_batch_size")
  old["train"]["grad_accum"], old["train"]["batch_size"] = 2, 16
  path = tmp_path / "config.json"
  path.write_text(json.dumps(old))
  c = config_lib.load_config_json(str(path))
  assert (c.compute.kernels, c.compute.dtype, c.compute.remat) == ("reference", "bfloat16", "full")
  assert compute["kernels"] == "auto" and c.compute.matmul_dtype == ""
  # grad_accum micro-batches of batch_size rows: now batch_size is the step's rows.
  assert (c.train.batch_size, c.train.micro_batch_size) == (32, 16)
  config_lib.validate(c)
  old["model"]["colour"] = "red"
  path.write_text(json.dumps(old))
  with pytest.raises(ConfigError, match="has fields this version does not know: model.colour"):
    config_lib.load_config_json(str(path))
