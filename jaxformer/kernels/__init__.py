"""The fast kernels the model can run on, chosen by `Execution.kernels`.

  "reference": none of these; the guide written out with stock Flax layers.
  "cpu":       blocked attention (attention.py), GELU through erf, the MLP's
               recomputed activation and LayerNorm's own VJP (layers.py).
  "xla":       jax.nn.dot_product_attention with XLA's kernel (attention.py).
  "cudnn":     the same with cuDNN flash attention (GPU, bfloat16/float16).

`Execution.matmul_dtype` adds mixed-precision dense layers (matmul.py) to any
of them. Every kernel matches the reference to float rounding and leaves the
parameters as they are; what each buys is in its module's docstring and in
docs/performance.md.
"""

from jaxformer.kernels import attention
from jaxformer.kernels import layers
from jaxformer.kernels import matmul
