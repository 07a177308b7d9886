"""Accelerator paths on the CPU: per-platform defaults, the splash kernel (in Pallas's interpreter),
remat policies, and the real train step compiled for TPU slices through libtpu (no TPU needed).
"""

import functools
import importlib
import itertools
import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import aot, chips
from jaxformer import config as config_lib
from jaxformer import model as M
from jaxformer.kernels import attention

import multihost


def preset(name: str, **overrides):
  return config_lib.apply_overrides(importlib.import_module(f"configs.{name}").get_config(), overrides)


@pytest.mark.parametrize("platform,kernels,dtype", [
    ("cpu", "cpu", "float32"), ("gpu", "cudnn", "bfloat16"), ("tpu", "splash", "bfloat16")])
def test_auto_picks_each_platforms_fast_path(platform, kernels, dtype):
  ex = config_lib.execution(preset("gpt2"), platform)
  assert (ex.kernels, ex.dtype, ex.param_dtype) == (kernels, dtype, "float32")
  # Explicit values win; cuDNN takes 16-bit inputs only, so auto on a float32 GPU run is XLA's kernel.
  assert config_lib.execution(preset("gpt2", **{"compute.kernels": "xla"}), platform).kernels == "xla"
  assert config_lib.execution(preset("gpt2", **{"compute.dtype": "float32"}), "gpu").kernels == "xla"


def test_old_run_folders_remat_flag_becomes_a_policy(tmp_path):
  c = preset("tiny")
  values = json.loads(c.to_json())
  values["compute"]["remat"] = True  # as config.json files before remat took a policy
  (tmp_path / "config.json").write_text(json.dumps(values))
  assert config_lib.load_config_json(str(tmp_path / "config.json")).compute.remat == "full"
  with pytest.raises(config_lib.ConfigError, match="compute.remat must be one of none, full"):
    config_lib.validate(preset("tiny", **{"compute.remat": "everything"}))


@pytest.mark.parametrize("window", [0, 48])
def test_splash_kernel_matches_plain_attention(window):
  """The TPU kernel itself, run by Pallas's interpreter: outputs and gradients, causal and windowed."""
  B, T, H, D = 2, 384, 2, 32  # three 128-position blocks: the kernel skips the masked ones
  qkv, g = (jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(0)),
                                                     [(B, T, 3, H, D), (B, T, H, D)]))
  ours = lambda qkv: attention.splash_attention(qkv, window=window, rope_base=10000.0)
  ref = lambda qkv: M.plain_attention(*attention._split_rotated(qkv, 10000.0), window=window)[0]
  np.testing.assert_allclose(jax.jit(ours)(qkv), ref(qkv), rtol=2e-5, atol=2e-5)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(qkv)
  np.testing.assert_allclose(jax.jit(lambda: grad(ours))(), grad(ref), rtol=1e-4, atol=1e-4)
  # Its own FLOP count: 6 of 9 (query, key) block pairs are causal; a 48-wide window leaves the 3
  # diagonal ones and the 2 it reaches back into.
  pairs = 6 if window == 0 else 5
  assert attention.splash_flops(B, T, H, D, window) == pairs * 9 * 2 * 128 * 128 * D * B * H


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "save_attention_out", "save_qkv_attention_out"])
def test_remat_policies_give_the_same_gradients(policy):
  c = config_lib.base_config()
  c.model.update(vocab_size=64, num_layers=2, num_heads=4, embed_dim=32, max_len=32)
  cfg = config_lib.model_config(c)
  params = M.init_params(cfg, jax.random.key(0))
  x = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)

  def grads(ex):
    grad = jax.grad(lambda p: jnp.mean(M.Transformer(cfg, ex).apply({"params": p}, x) ** 2))
    return jax.jit(grad)(params), str(jax.make_jaxpr(grad)(params))

  ref, plain = grads(M.Execution(kernels="cpu"))
  got, program = grads(M.Execution(kernels="cpu", remat=policy))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, ref)
  # The policy is in the program (its name, or its saved names), not dropped on the way.
  marker = getattr(M.REMAT[policy], "__name__", None) or repr(M.REMAT[policy])
  assert marker in program and "policy=" not in plain, marker


# ------------------------------------------------------------------- compiled for TPU slices


@pytest.fixture(scope="module")
def gpt2_on_v5e():
  """GPT-2 small (124M, T=1024) at a global batch of 256 on 4 v5e chips, fully sharded (FSDP)."""
  c = preset("gpt2", **{"train.batch_size": 256, "train.micro_batch_size": 64,
                        "mesh.data": 1, "mesh.fsdp": 4})
  return aot.report(c, "v5e:2x2", decode=False)


def test_gpt2_fits_four_v5e_chips_with_splash_and_its_flops_match_the_closed_form(gpt2_on_v5e):
  r = gpt2_on_v5e
  assert r["device_kind"] == "TPU v5 lite" and r["chip"]["name"] == "TPU v5e" and r["devices"] == 4
  assert r["execution"] == {"kernels": "splash", "dtype": "bfloat16", "param_dtype": "float32", "remat": "none"}
  assert r["fits"] and r["headroom"] >= 0.10, r["memory_gib_per_device"]
  mem = r["memory_gib_per_device"]
  # Parameters and AdamW's two moments, float32, a quarter each on 4 chips (the biases and
  # LayerNorm vectors, 0.2% of them, whole on every chip).
  assert mem["params"] == pytest.approx(124_475_904 * 4 / 4 / 2 ** 30, rel=3e-3)
  assert mem["optimizer_state"] == pytest.approx(2 * mem["params"], rel=1e-3)
  f = r["flops_per_device"]
  assert f["attention_kernel"] > 0  # the kernel's own count, added to what XLA sees
  assert 0.95 <= f["compiled_over_closed_form"] <= 1.05, f
  assert 0 < r["roofline"]["mfu"] <= 1 and r["roofline"]["step_s_overlapped"] > 0


def test_gpt2_fsdp_step_moves_parameters_and_gradients_the_fsdp_way(gpt2_on_v5e):
  found = gpt2_on_v5e["collectives"]
  L = 12
  # The activations stay in their rows' layout: nothing is transposed between devices.
  assert "all-to-all" not in found, found
  # FSDP splits 4L + 2 matrices over the chips: per block qkv, the attention projection, the
  # MLP's fc and proj; the embedding table (also the tied head) and the position table. The
  # embedding table is gathered once per step (outside the micro-batch loop), the position
  # table once; a block's matrices for its forward pass, and again for its backward pass
  # unless XLA keeps them. So between 4L + 2 and 8L + 2.
  gathers = found["all-gather"]["count"]
  assert 4 * L + 2 <= gathers <= 8 * L + 2, found
  # A matrix's summed gradient is wanted by its own shard only. The TPU compiler reduce-scatters
  # the MLP's two matrices of every block (2/3 of the block's weights), whole bf16 matrices in,
  # a quarter out, once per micro-batch: 2L arrays.
  C = 768
  assert found["reduce-scatter"] == {"count": 2 * L, "bytes": L * 2 * C * 4 * C * 2}, found
  # The attention's matrices it all-reduces whole and then slices (it lays their gradients out
  # with C innermost, H and D being shorter than its 128-wide tiles, and does not scatter along
  # an inner axis; pinning them as (C, 3·H·D) matrices makes them reduce-scatter but costs
  # relayout copies of the activations, 17% more bytes accessed). So are the vectors, which
  # FSDP does not split, and the tables: the embedding table twice (its lookup's and its tied
  # head's partial sums, which XLA reduces apart), the position table once.
  attention = L * (C * 3 * C + C * C)
  tables = 2 * 50304 * C + 1024 * C
  assert found["all-reduce"]["bytes"] <= 2 * (attention + tables) * 1.01, found
  assert found["all-reduce"]["bytes"] >= 2 * (attention + tables), found


def test_collectives_are_counted_by_array_and_by_fusion():
  # Shaped like the TPU compiler's HLO: two all-reduce-scatter fusions that both carry
  # channel 1 (the combiner's), one of them over a tuple of two matrices; an all-gather split
  # into two async pieces sharing a channel; a plain all-reduce of a tuple of vectors.
  hlo = """
%all-reduce-scatter.8.clone.1 (input_0: bf16[768,768], input_1: bf16[768,3,768]) -> (bf16[768,192]) {
  %all-reduce.1 = (bf16[768,768]{0,1}, bf16[768,3,768]{2,0,1}) all-reduce(%input_0, %input_1), channel_id=1
}
%all-reduce-scatter.9.clone.1 (input_0: bf16[768,3072]) -> bf16[192,3072] {
  %all-reduce.2 = bf16[768,3072]{1,0} all-reduce(%input_0), channel_id=1
}
%async_collective_fusion.1 (param_0: bf16[192,3072]) -> bf16[768,3072] {
  %all-gather.3 = bf16[768,3072]{1,0} all-gather(%param_0), channel_id=7, dimensions={0}
}
%async_collective_fusion.2 (param_0: bf16[192,3072]) -> bf16[768,3072] {
  %all-gather.4 = bf16[768,3072]{1,0} all-gather(%param_0), channel_id=7, dimensions={0}
}
ENTRY %main (p: f32[768]) -> f32[768] {
  %all-reduce.5 = (f32[768]{0}, f32[3072]{0}) all-reduce(%a, %b), channel_id=9
}
"""
  assert aot.collectives(hlo) == {
      "reduce-scatter": {"count": 3, "bytes": 2 * (768 * 768 + 768 * 3 * 768 + 768 * 3072)},
      "all-gather": {"count": 1, "bytes": 2 * 768 * 3072},
      "all-reduce": {"count": 2, "bytes": 4 * (768 + 3072)}}


def test_relayouts_count_large_transposes_and_copies():
  # Lines from compiled steps: the H200's GPT-2 step transposing a (B, T, C) matmul output
  # into (T, C, B) (while its residual stream was laid out B-minor), and the TPU splash
  # kernel's lane-padded logsumexp copied to another layout. Small or async copies and other
  # ops are not relayouts.
  hlo = """
  %transpose.633.3 = bf16[1024,768,64]{2,1,0} transpose(%bitcast.205.3), dimensions={1,2,0}
  %copy.1450 = f32[16,12,1024,128]{2,3,1,0:T(8,128)S(1)} copy(%get-tuple-element.11682)
  %copy.7 = bf16[768,3]{0,1} copy(%p)
  %copy-start.23 = (bf16[16,1024,768]{2,1,0}, bf16[16,1024,768]{2,1,0}, u32[]) copy-start(%x)
  %add.116.1 = bf16[1024,768,64]{2,1,0} add(%param_0.3638, %transpose.633.3)
"""
  assert aot.relayouts(hlo) == {"count": 2, "bytes": 1024 * 768 * 64 * 2 + 16 * 12 * 1024 * 128 * 4}
  assert aot.relayouts(hlo, min_elements=1) == {"count": 3, "bytes": 1024 * 768 * 64 * 2 + 16 * 12 * 1024 * 128 * 4
                                                + 768 * 3 * 2}


def test_hlo_bytes_is_the_cost_analysis_count_and_scales_the_loop():
  """aot.hlo_bytes, the GPU estimate's memory term, counts as XLA's cost analysis does (a loop body
  once) on a compiled CPU program; given the loop's trips it counts the body that many times."""
  def f(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w) * 2 + 1, None), x, None, length=3)[0].sum()
  compiled = jax.jit(f).lower(jnp.ones((256, 512)), jnp.ones((512, 512))).compile()
  hlo, xla = compiled.as_text(), compiled.cost_analysis()["bytes accessed"]
  assert abs(aot.hlo_bytes(hlo) - xla) / xla < 1e-3, (aot.hlo_bytes(hlo), xla)
  body = (aot.hlo_bytes(hlo, loop_trips=3) - aot.hlo_bytes(hlo)) / 2
  assert 4 * (2 * 256 * 512 + 512 * 512) <= body < 2 * xla  # at least the matmul's operands and result


def test_large_preset_fits_v5p_with_fsdp_tensor_and_remat():
  c = preset("large", **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "compute.remat": "save_attention_out",
                         "train.batch_size": 64})
  r = aot.report(c, "v5p:2x2x1", decode=False)
  assert r["chip"]["name"] == "TPU v5p" and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert r["fits"] and r["execution"]["remat"] == "save_attention_out", r


def test_a_config_that_does_not_fit_gets_one_sentence_naming_the_term_and_the_knob():
  c = preset("gpt2", **{"train.batch_size": 512, "mesh.data": 1, "mesh.fsdp": 4, "model.num_layers": 2})
  r = aot.report(c, "v5e:2x2", decode=False)
  assert not r["fits"]
  assert r["advice"].startswith("does not fit: ")
  assert "the largest term is temporaries" in r["advice"] and "compute.remat=full" in r["advice"], r["advice"]


def test_compile_script_prints_json_and_refuses_unknown_topologies():
  args = ["--config=configs/tiny.py", "--topology=v5e:2x2", "--config.mesh.data=4"]
  out = subprocess.run(multihost.script("compile.py", *args), capture_output=True, text=True, timeout=600,
                       cwd=multihost.ROOT, env=multihost.env())
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout)
  assert r["fits"] and r["decode"]["bytes_per_device"] > 0 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "E0000" not in out.stderr, out.stderr[-3000:]  # libtpu's noise
  bad = subprocess.run(multihost.script("compile.py", "--topology=v9z:1x1"), capture_output=True, text=True,
                       timeout=300, cwd=multihost.ROOT, env=multihost.env())
  assert bad.returncode == 1 and "is not a TPU slice libtpu knows" in bad.stderr.splitlines()[-1], bad.stderr


def test_scripts_keep_jax_off_an_absent_tpu():
  """With libtpu installed (as here) on a host without TPU chips, scripts start JAX on the CPU, quietly."""
  code = ("from jaxformer import cli; cli.skip_absent_tpu(); import jax; "
          "print(jax.config.jax_platforms, jax.default_backend())")
  env = {k: v for k, v in multihost.env().items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=multihost.ROOT, env=env)
  assert out.returncode == 0 and out.stdout.split() == ["cpu", "cpu"], out.stderr[-2000:]
  assert "libtpu" not in out.stderr and "TPU" not in out.stderr, out.stderr[-2000:]


# --- NVIDIA GPUs, compiled here through the CUDA plugin (the gpu-compile extra; not in CI's dev install) ---

needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                       reason="needs the CUDA plugin and cuDNN: pip install -e '.[gpu-compile]'")


def test_gpu_topologies_are_named_kind_and_count_and_need_the_plugin():
  for bad in ("h100:0", "h100:x8", "h100:2x"):
    with pytest.raises(config_lib.ConfigError, match="a GPU topology is KIND:GPUS or KIND:HOSTSxGPUS"):
      aot.topology_devices(bad)
  if importlib.util.find_spec("jax_cuda12_plugin") is None:  # CI: the sentence says how to get it
    with pytest.raises(config_lib.ConfigError, match=r"needs the CUDA plugin and cuDNN: pip install -e '\.\[gpu-compile\]'"):
      aot.topology_devices("h100:8")
  else:
    devices = aot.topology_devices("h200:2x4")
    assert len(devices) == 8 and sorted({d.process_index for d in devices}) == [0, 1]
    assert chips.find(devices[0].device_kind).name == "H200 SXM"


@needs_cuda_plugin
def test_gpt2_compiles_for_eight_h100s_with_cudnn_and_fsdp():
  r = aot.report(preset("gpt2", **{"model.num_layers": 2, "train.batch_size": 64, "mesh.data": 1, "mesh.fsdp": 8}),
                 "h100:8", decode=False)
  assert r["fits"] and r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["execution"]["kernels"] == "cudnn"
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["flops_per_device"].keys() == {"closed_form"}
  # Its estimate: the closed form's FLOPs, the HLO's own bytes, the collectives over NVLink.
  ro = r["roofline"]
  assert ro["compute_s"] == pytest.approx(r["flops_per_device"]["closed_form"] / 989e12)
  assert ro["memory_s"] > 0 and ro["network_s"] > 0 and 0 < ro["mfu_serial"] < ro["mfu"] <= 1
  # FSDP: parameters gathered, gradients reduce-scattered (XLA's GPU compiler combines them into
  # few large collectives), and never an all-to-all.
  assert {"all-gather", "reduce-scatter"} <= set(r["collectives"]) and "all-to-all" not in r["collectives"]
  assert 0 < r["memory_gib_per_device"]["total"] < 10
  # A GPU keeps a fifth of its memory free (the card's own workspaces); what does not fit says why.
  big = aot.report(preset("gpt2", **{"model.num_layers": 2, "train.batch_size": 512}), "a100:1", decode=False)
  assert not big["fits"] and "(keeping 20% free); the largest term is temporaries" in big["advice"], big["advice"]


@functools.lru_cache
def two_gpt2_blocks_on_one_gpu(B: int) -> str:
  """The compiled HLO of the B-row step of two GPT-2 blocks for one H100."""
  return aot.compile_train_step(preset("gpt2", **{"model.num_layers": 2, "train.batch_size": B}),
                                aot.topology_devices("h100:1"))["compiled"].as_text()


@needs_cuda_plugin
def test_the_gpu_step_keeps_rows_first_layout_without_a_gpu():
  """As test_gpu.py's test on a real card: compiled for an H100 here, the B=64 step of two GPT-2
  blocks holds no (T, C, B)-like array (the model before the per-token position lookup held 34)."""
  B = 64
  hlo = two_gpt2_blocks_on_one_gpu(B)
  assert "__cudnn$fmha" in hlo
  for shape in itertools.permutations((B, 1024, 768)):
    if shape != (B, 1024, 768):
      assert f"[{','.join(map(str, shape))}]" not in hlo, shape
  assert aot.relayouts(hlo)["count"] == 0


@needs_cuda_plugin
def test_the_gpu_steps_mlp_writes_one_4c_array_and_its_loss_reads_the_logits_twice():
  """The traffic cuts of docs/performance.md, in the compiled GPU step: the MLP's forward fusion
  writes act(h) alone (before DenseActivation it also wrote h + b or GELU's tanh: one fusion with
  two (B, T, 4C) outputs per block), and besides the matmuls two fusions read the (B, T, V) logits,
  the one-pass log-sum-exp and the gradient (jax.nn.logsumexp's max and sum made it three)."""
  B, T, F, V = 64, 1024, 3072, 50304
  hlo = two_gpt2_blocks_on_one_gpu(B)
  entry = hlo[hlo.index("\nENTRY"):]
  shapes = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) [\w\-]+\(", entry, re.M))
  two_4c, logits_reads = 0, 0
  for out, op, args, rest in re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) ([\w\-]+)\((.*?)\)(.*)$", entry, re.M):
    if op != "fusion" or "gemm_fusion" in rest:  # XLA's own elementwise and reduction fusions only
      continue
    two_4c += out.count(f"[{B},{T},{F}]") + out.count(f"[{B * T},{F}]") >= 2
    logits_reads += any(f"[{B},{T},{V}]" in shapes.get(a, "") or f"[{B * T},{V}]" in shapes.get(a, "")
                        for a in re.findall(r"%([\w.\-]+)", args))
  assert (two_4c, logits_reads) == (0, 2)
