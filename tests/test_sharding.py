"""Sharding equivalence on 8 fake CPU devices, in a process of its own."""

import json
import os
import subprocess
import sys

from jaxformer import train

HERE = os.path.dirname(os.path.abspath(__file__))


def test_meshes_agree_with_one_device_and_checkpoints_move_between_meshes(tmp_path):
  cache = str(tmp_path / "cache")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), cache, str(tmp_path)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])

  # The reference: the same run on this process's single device (mesh 1x1x1).
  import sharding_worker  # the worker's config, without its 8-device setup
  c = sharding_worker.config(cache, (1, 1, 1))
  train.train_and_evaluate(c, str(tmp_path / "single"), log=lambda *_: None)
  ref = {str(k): v for k, v in sharding_worker.losses(str(tmp_path / "single")).items()}
  assert len(ref) == 10
  for mesh in ("8x1x1", "2x4x1", "2x2x2", "moved"):
    got = result[mesh]
    assert sorted(got, key=int) == sorted(ref, key=int), mesh
    for step, loss in ref.items():
      assert abs(got[step] - loss) <= 1e-5 * abs(loss), (mesh, step, got[step], loss)
  assert "must be divisible by the data x fsdp mesh axes (8)" in result["errors"]["indivisible"]
  assert "does not match the 8 available devices" in result["errors"]["too_big"]
