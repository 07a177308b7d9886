"""A throwaway Google Cloud Storage bucket for tests: `gcp-storage-emulator` in a subprocess on 127.0.0.1.

    with emulated_bucket() as root:   # root == "gs://test-bucket"; root.env: the variables set (subprocesses inherit them)
      epath.Path(root, "x.txt").write_text("hi")

or, as a pytest fixture: `from gcs_emulator import gcs_bucket` in the test module and take a `gcs_bucket` argument.

Clients it covers (all verified), and the variables they read:
  - etils.epath (fsspec -> gcsfs)           STORAGE_EMULATOR_HOST, FSSPEC_GS_TOKEN=anon,
                                             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (for subprocesses)
  - orbax CheckpointManager (tensorstore)    TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  - tensorboardX SummaryWriter("gs://...")   STORAGE_EMULATOR_HOST (google-cloud-storage); close it inside the block
Unlike a local disk: open(..., "a") overwrites (gcsfs warns), as on real GCS. Everything stays in the emulator's memory.
The server gets two patches: the `moveTo` call gcsfs renames with (unpatched: a 501, which gcsfs retries for ~30 s
before it falls back to copy + delete), and the `x-goog-generation` header on downloads, which real GCS sends and
tensorstore reads (without it a read that misses tensorstore's cache fails: "Malformed StorageGeneration").
Requires: pip install gcsfs gcp-storage-emulator
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus

import pytest


class Bucket(str):
  """The bucket's "gs://..." URL; `.env` holds the environment variables that point clients at the emulator."""
  env: dict


@contextlib.contextmanager
def emulated_bucket(bucket="test-bucket"):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
         "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.monotonic() + 30
    while True:  # the default bucket exists before the server answers
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1).close()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"gcp-storage-emulator did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    os.environ.update(env)
    _reset_fsspec()
    root = Bucket(f"gs://{bucket}")
    root.env = dict(env)
    yield root
  finally:
    if "tensorboardX.record_writer" in sys.modules:  # its GCS writer uploads again in __del__, at exit: after the
      sys.modules["tensorboardX.record_writer"].GCSRecordWriter.__del__ = lambda self: None  # server, 120 s of retries
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _reset_fsspec()
    proc.terminate()
    try:
      proc.wait(5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture
def gcs_bucket():
  with emulated_bucket() as root:
    yield root


def _reset_fsspec():
  """Points fsspec's "gs" at plain gcsfs with FSSPEC_GS_TOKEN and forgets cached file systems (etils keeps one).

  The class gcsfs exports when GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was unset at its import asks a gRPC API the emulator
  lacks for each bucket's layout: 60 s of retries a call.
  """
  import fsspec
  import fsspec.config
  import gcsfs.core
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  fsspec.config.conf.pop("gs", None)
  if os.environ.get("FSSPEC_GS_TOKEN"):
    fsspec.config.conf["gs"] = {"token": os.environ["FSSPEC_GS_TOKEN"]}
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  if "etils.epath.backend" in sys.modules:
    sys.modules["etils.epath.backend"].fsspec_backend._get_filesystem.cache_clear()


def _serve(port, bucket):
  """Runs the emulator in memory, with an added `moveTo` (rename) route."""
  from gcp_storage_emulator import __main__ as cli, server
  from gcp_storage_emulator.handlers import objects

  def move(request, response, storage, *args, **kwargs):
    p = request.params
    try:
      obj = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"], p["bucket_name"], p["dest_object_id"])
    except objects.NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    objects._delete(storage, p["bucket_name"], p["object_id"])
    response.json(obj)

  plain_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  objects.download = download  # objects.get calls it for ?alt=media, the path tensorstore reads through
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is plain_download:
        methods[method] = download
  route = r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
  server.HANDLERS = ((route, {"POST": move}),) + tuple(server.HANDLERS)
  cli.main(["start", "--host=127.0.0.1", f"--port={port}", "--in-memory", f"--default-bucket={bucket}", "--quiet"])


if __name__ == "__main__":
  _serve(int(sys.argv[1]), sys.argv[2])
