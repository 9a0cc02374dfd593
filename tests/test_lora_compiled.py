"""The compiled LoRA training step: FLOPs against full fine-tuning, and no full-size delta W.

SmolLM2-135M widths (hidden 576, 9 / 3 heads, MLP 1536, vocab 49152, tied
embeddings), batch 4 x 128, every linear layer adapted at r=16. XLA's cost
analysis counts a ``while`` body once, so FLOPs are measured on steps whose
layer scan is fully unrolled (``lift(..., unroll=True)``) at 1 and 2 layers and
extrapolated linearly to 30 (``experiments/bench_flops.py`` checks the
extrapolation against a 30-layer compile).
"""

import optax
import pytest

import jlora
from jlora._hlo import abstract_llama_step
from jlora._rewrite import full_size_dots
from jlora.models.llama import LlamaConfig

pytestmark = pytest.mark.slow

LINEAR = "layers/{self_attn/{q,k,v,o}_proj,mlp/{gate,up,down}_proj}/kernel"


def _config(layers, **kw):
  base = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers,
              num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
              tie_word_embeddings=True)
  base.update(kw)
  return LlamaConfig(**base)


def _compiled_step(cfg, rules, *, unroll=False, merged=False):
  """jit(step).lower().compile() of one AdamW step; params are abstract (nothing allocated)."""
  step, args = abstract_llama_step(cfg, rules, jlora.optimizer(optax.adamw(1e-4)), unroll=unroll,
                                   merged=merged)
  return step.lower(*args).compile()


KERNELS = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


@pytest.fixture(scope="module")
def flops():
  out = {}
  for kind, rules in (("lora", {LINEAR: jlora.LoRA(16, stack_axes=1)}), ("full", {"**": jlora.Full()})):
    for layers in (1, 2):
      c = _compiled_step(_config(layers), rules, unroll=True)
      out[kind, layers] = c
  return out


def _per_30(flops, kind):
  f1 = flops[kind, 1].cost_analysis()["flops"]
  f2 = flops[kind, 2].cost_analysis()["flops"]
  return f1 + 29 * (f2 - f1), f2 - f1


def test_lora_step_flops_against_full_fine_tuning(flops):
  """No weight-gradient matmuls for frozen bases: a LoRA layer costs ~4 N tokens, not ~6 N.

  The whole step lands at 0.71x, not the issue's 0.70x: with this model's dense
  (unmasked-then-masked) attention, the tied head's forward and input gradient
  (2 x 29 GFLOP, paid by both) and the r=16 adapters on all seven matrices
  (~15 GFLOP), the floor is (4N + 2H + attention + adapters) / (6N + 3H +
  attention + AdamW) = 0.707. Measured numbers: experiments/results/bench_peft_flops.txt.
  """
  lora, lora_layer = _per_30(flops, "lora")
  full, full_layer = _per_30(flops, "full")
  n_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
  assert 5.8 < full_layer / (n_layer * 512) < 6.8          # x W, dx, dW: 6 N per token
  assert 3.8 < lora_layer / (n_layer * 512) < 4.8          # x W, dx only (+ attention, adapters)
  assert lora_layer <= 0.75 * full_layer
  head = 2 * 512 * 576 * 49152
  assert lora - 30 * lora_layer < 2.1 * head < full - 30 * full_layer   # tied head: 2 vs 3 matmuls
  assert lora <= 0.72 * full, (lora / 1e9, full / 1e9, lora / full)


def test_no_full_size_delta_w_in_the_compiled_lora_step(flops):
  # the real (scanned) step and the unrolled one
  scanned = _compiled_step(_config(2), {LINEAR: jlora.LoRA(16, stack_axes=1)})
  for compiled in (scanned, flops["lora", 2]):
    assert full_size_dots(compiled.as_text(), KERNELS) == []
  # the check can fail: full fine-tuning computes weight gradients of exactly those shapes
  assert len(full_size_dots(flops["full", 2].as_text(), KERNELS)) >= 7


def test_the_check_finds_a_merged_delta():
  cfg = _config(1, vocab_size=64, hidden_size=48, intermediate_size=80, num_heads=4, num_kv_heads=2)
  merged = _compiled_step(cfg, {"layers/mlp/up_proj/kernel": jlora.LoRA(4, stack_axes=1)}, merged=True)
  assert full_size_dots(merged.as_text(), [(48, 80)])
  lifted = _compiled_step(cfg, {"layers/mlp/up_proj/kernel": jlora.LoRA(4, stack_axes=1)})
  assert full_size_dots(lifted.as_text(), [(48, 80)]) == []
