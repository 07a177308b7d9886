"""Accelerator data sheets: the numbers MFU and the roofline estimate of `compile.py` divide by.

One row per chip: dense bf16 peak FLOP/s (no sparsity), HBM capacity and
bandwidth, and the chip-to-chip bandwidth (TPU ICI / NVIDIA NVLink, both
directions added, as the sources state it), with where each figure comes from.
`device_kind` strings of JAX devices are matched by the `kinds` substrings.
"""

import dataclasses

GB, GiB = 1e9, 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  kinds: tuple[str, ...]   # lower-case substrings of jax.Device.device_kind
  bf16_flops: float        # dense peak FLOP/s per chip
  hbm_bytes: float
  hbm_bandwidth: float     # bytes/s
  link_bandwidth: float    # bytes/s per chip, bidirectional (ICI or NVLink)
  source: str


CHIPS = (
    Chip("TPU v4", ("tpu v4",), 275e12, 32 * GiB, 1200 * GB, 600 * GB,
         "cloud.google.com/tpu/docs/v4 (peak, HBM); ICI: 6 links x 50 GB/s each way, Jouppi et al., "
         "'TPU v4', ISCA 2023"),
    Chip("TPU v5e", ("tpu v5 lite", "tpu v5e"), 197e12, 16 * GB, 819 * GB, 400 * GB,
         "cloud.google.com/tpu/docs/v5e"),
    Chip("TPU v5p", ("tpu v5p", "tpu v5"), 459e12, 95 * GiB, 2765 * GB, 1200 * GB,
         "cloud.google.com/tpu/docs/v5p"),
    Chip("TPU v6e", ("tpu v6 lite", "tpu v6e", "tpu v6"), 918e12, 32 * GB, 1638 * GB, 800 * GB,
         "cloud.google.com/tpu/docs/v6e"),
    Chip("H100 SXM", ("h100",), 989e12, 80 * GB, 3350 * GB, 900 * GB,
         "nvidia.com/en-us/data-center/h100 (datasheet, SXM5; bf16 dense = half the sparse figure)"),
    Chip("H200 SXM", ("h200",), 989e12, 141 * GB, 4800 * GB, 900 * GB,
         "nvidia.com/en-us/data-center/h200 (datasheet, SXM; bf16 dense = half the sparse figure)"),
    Chip("A100 SXM 80GB", ("a100",), 312e12, 80 * GB, 2039 * GB, 600 * GB,
         "nvidia.com/en-us/data-center/a100 (datasheet, SXM4 80GB)"),
    Chip("L4", ("l4",), 121e12, 24 * GB, 300 * GB, 64 * GB,
         "nvidia.com/en-us/data-center/l4 (datasheet; no NVLink: PCIe Gen4 x16)"),
    Chip("A10", ("a10",), 125e12, 24 * GB, 600 * GB, 64 * GB,
         "nvidia.com/en-us/data-center/products/a10-gpu (datasheet; no NVLink: PCIe Gen4 x16)"),
    Chip("V100 SXM2", ("v100",), 125e12, 32 * GB, 900 * GB, 300 * GB,
         "nvidia.com/en-us/data-center/v100 (datasheet; fp16 tensor peak, no bf16)"),
)


def find(device_kind: str) -> Chip | None:
  """The chip whose data sheet matches a JAX device_kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
  kind = device_kind.lower()
  for chip in CHIPS:  # most specific names first within each family (v5 lite before v5)
    if any(k in kind for k in chip.kinds):
      return chip
  return None
