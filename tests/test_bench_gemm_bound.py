"""experiments/bench_gemm_bound.py's HLO reading: the dots it finds, their einsums and FLOPs."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _module():
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    spec = importlib.util.spec_from_file_location("bench_gemm_bound", EXPERIMENTS / "bench_gemm_bound.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
  finally:
    sys.path.remove(str(EXPERIMENTS))


def test_dots_in_hlo_finds_every_dot_with_its_dims_and_the_einsum_reproduces_it():
  bench = _module()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((2, 3, 4, 6)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 3, 9, 6)), jnp.float32)

  def f(x, w1, w2, q, k):
    h = jnp.tanh(x @ w1)                       # (8,6)x(6,5), contract 1/0
    g = jnp.tanh(x @ w1 * 2.0)                 # the same signature again (not CSE'd: tanh first)
    y = h @ w2.T + g @ w2.T                    # (8,5)x(7,5), contract 1/1, twice (or merged)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)    # batched, contract 3/3, batch 0,1
    return y.sum() + s.sum()

  compiled = jax.jit(f).lower(x, w1, w2, q, k).compile()
  sigs = bench.dots_in_hlo(compiled.as_text())
  args = {(8, 6): x, (6, 5): w1, (7, 5): w2, (2, 3, 4, 6): q, (2, 3, 9, 6): k}
  assert ((2, 3, 4, 6), (2, 3, 9, 6), (3,), (3,), (0, 1), (0, 1)) in sigs
  assert sum(sigs.values()) >= 3
  for sig in sigs:
    a = args.get(sig[0], np.ones(sig[0], np.float32))
    b = args.get(sig[1], np.ones(sig[1], np.float32))
    want = jax.lax.dot_general(a, b, ((sig[2], sig[3]), (sig[4], sig[5])))
    got = np.einsum(bench._einsum(sig), np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    # FLOPs: 2 x (product of output dims) x (product of contracted dims), brute force
    assert bench._flops(sig) == 2 * want.size * np.prod([sig[0][i] for i in sig[2]])


def test_dots_in_hlo_counts_every_dot_of_an_unrolled_chain():
  bench = _module()
  ws = [jnp.full((16, 16), 0.01 * (i + 1), jnp.float32) for i in range(5)]

  def f(x, ws):
    for w in ws:
      x = jnp.tanh(x @ w)
    return x

  x = jnp.ones((4, 16), jnp.float32)
  sigs = bench.dots_in_hlo(jax.jit(f).lower(x, ws).compile().as_text())
  assert sigs == {((4, 16), (16, 16), (1,), (0,), (), ()): 5}
