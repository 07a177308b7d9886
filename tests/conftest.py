import atexit
import os
import shutil
import sys
import tempfile

# Tests import the config files as `configs.<name>` and must never reach the network.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run on the CPU. With libtpu installed (the tpu extra, for the TPU compile tests) every
# JAX process would otherwise probe for a TPU, contend for libtpu's lock file and print warnings;
# compiling for a TPU topology needs no TPU backend. Subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ helpers such as sharding_worker
# The scripts the tests run share one compilation cache (cli.compilation_cache), made for this
# session and removed after it, never the user's ~/.cache: a test that resumes, samples or
# evaluates a run loads the steps compiled before. With a size bound JAX locks the folder, so
# many processes share it safely.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxformer-test-xla-")
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(1 << 30)
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# In-process tests run on one CPU device, whichever test starts JAX first (train_and_evaluate's
# auto mesh.cpu_devices would otherwise split this process); multi-device tests run in
# processes of their own (test_sharding.py).
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 1)
jax.config.update("jax_enable_compilation_cache", False)  # in-process tests compile as they always did

from jaxformer import allocator  # noqa: E402

allocator.configure()  # as scripts/train.py does: the tests' train steps reuse their buffers
