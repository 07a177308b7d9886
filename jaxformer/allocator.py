"""glibc malloc settings for XLA:CPU: reuse large buffers, and give compiler memory back.

XLA:CPU allocates every intermediate buffer afresh. Above glibc's mmap threshold
(32 MB at most, by default) each allocation is a new mmap whose pages fault in
on first touch and go back to the OS on free, every step: a 33 MB elementwise op
then runs ~6x slower than on reused memory. Raising the mmap and trim thresholds
keeps freed buffers in the heap for the next step.

Compiling a train step leaves a few hundred MB of freed compiler memory spread
over the heap, which glibc never returns by itself; `malloc_trim` after each
XLA compilation (a jax.monitoring listener) gives it back.

Applied by the entry points that want it (scripts/train.py, scripts/benchmark.py,
the test session), never as a side effect of importing the library; glibc only;
set JAXFORMER_MALLOC=0 to skip. glibc's own MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ variables take precedence.
"""

import ctypes
import ctypes.util
import os
import sys

import jax

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes: buffers below 1 GiB come from (and return to) the heap

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_applied = None
_libc = None


def configure() -> bool:
  """Sets the thresholds and the after-compile trim (once); True when they are in effect."""
  global _applied, _libc
  if _applied is not None:
    return _applied
  _applied = False
  if not sys.platform.startswith("linux") or os.environ.get("JAXFORMER_MALLOC", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt, libc.malloc_trim.argtypes = libc.mallopt, [ctypes.c_size_t]
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  _libc = libc
  jax.monitoring.register_event_duration_secs_listener(_after_compile)
  if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  _applied = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
  return _applied


def release_free_memory() -> None:
  """Returns freed heap pages to the OS (glibc malloc_trim)."""
  if _libc is not None:
    _libc.malloc_trim(0)


def _after_compile(event: str, duration: float, **_) -> None:
  del duration
  if event == _COMPILE_EVENT:
    release_free_memory()
