"""Will it fit? Compiles a config's train step (and sampling loop) for a TPU slice or GPU hosts on this host.

python scripts/compile.py --config=configs/gpt2.py --topology=v5e:2x2 \
    --config.train.batch_size=256 --config.mesh.data=1 --config.mesh.fsdp=4
python scripts/compile.py --config=configs/gpt2.py --topology=h100:8 \
    --config.train.batch_size=256 --config.mesh.data=1 --config.mesh.fsdp=8

No TPU or GPU needed: libtpu (pip install -e '.[tpu]') compiles for the slice's abstract
devices, the CUDA plugin and cuDNN (pip install -e '.[gpu-compile]') for NVIDIA cards
(a100, h100, h200; KIND:GPUS or KIND:HOSTSxGPUS). Prints one JSON object: memory per
chip from the compiled executable and whether it fits, FLOPs (compiled vs closed form),
collectives by kind, and on TPU a roofline estimate of step time, tokens/s and MFU;
see jaxformer/aot.py.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only compiles; no TPU or GPU backend is started

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxformer import aot, cli  # noqa: E402
from jaxformer import config as config_lib  # noqa: E402

with cli.flag_errors():  # ml_collections reads the --config.KEY overrides here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "gpt2.py"),
      "A config file with get_config().", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "The TPU slice, as libtpu names it (v5e:4x4, v5p:2x2x1, ...), "
                                 "or NVIDIA GPUs: h100:8 (one host), h100:2x8 (two), a100, h200.")
_DECODE = flags.DEFINE_bool("decode", True, "Also compile the sampling loop (8 rows, replicated parameters).")


def main(argv):
  cli.flags_only(argv)
  config_lib.validate(_CONFIG.value)  # before libtpu or the CUDA plugin builds the devices
  result = aot.report(_CONFIG.value, _TOPOLOGY.value, decode=_DECODE.value)
  result["config"] = flags.FLAGS["config"].config_filename
  print(json.dumps(result, indent=2), flush=True)
  if not result["fits"]:
    print(result["advice"], file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.main(main)
