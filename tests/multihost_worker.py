"""One process of a multi-host test (tests/test_multihost.py): trains a list of meshes in turn.

python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS CACHE OUT SPEC_JSON
SPEC_JSON: {"runs": {name: overrides}, "refuse": [overrides, ...]}. Prints RESULT {...} on
process 0, and REFUSED <sentence> for each refused config on every process.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from jaxformer import config as config_lib, runs, train  # noqa: E402
from jaxformer.config import ConfigError  # noqa: E402
import multihost  # noqa: E402


def main(process_id, num_processes, port, devices, cache, out, spec):
  place = {"mesh.cpu_devices": devices, "data.cache_dir": cache}
  if num_processes > 1:
    place.update(multihost.distributed(port, num_processes, process_id))
  quiet = lambda *_: None
  result = {}
  for name, overrides in spec["runs"].items():
    c = config_lib.apply_overrides(default.get_config(), {**multihost.TINY, **overrides, **place})
    summary = train.train_and_evaluate(c, os.path.join(out, name), log=quiet)
    rows = runs.read_metrics(os.path.join(out, name))
    result[name] = {"losses": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
                    "eval_loss": summary["eval_loss"]}
  for overrides in spec.get("refuse", []):
    c = config_lib.apply_overrides(default.get_config(), {**multihost.TINY, **overrides, **place})
    try:
      train.train_and_evaluate(c, os.path.join(out, "refused"), log=quiet)
    except ConfigError as err:
      print(f"REFUSED {err}", flush=True)
  if process_id == 0:
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4], a[5], json.loads(a[6]))
