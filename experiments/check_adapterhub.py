"""jlora's bottleneck adapters against AdapterHub's on all-MiniLM-L6-v2, with the same weights.

  python experiments/check_adapterhub.py --venv /tmp/ahvenv

AdapterHub (the ``adapters`` package, 1.3.0) needs transformers ~4.57 and so cannot be
installed beside the transformers 5 that jlora's tests use; it runs in its own virtual
environment, made once with

  python -m venv /tmp/ahvenv && /tmp/ahvenv/bin/pip install torch==2.13.0 \\
      transformers==4.57.6 adapters==1.3.0 safetensors numpy

This script runs itself under that venv's Python (``--reference``): it loads MiniLM's
safetensors folder into a torch ``BertModel``, adds an AdapterHub adapter, draws every adapter
weight at random (N(0, 0.1), so the adapters change the output a lot), and saves the hidden
states of a few real sentences with the adapter weights. Then, in this environment, the same
weights go into ``jlora.adapter_rules`` leaves (``jlora.from_adapterhub``, which folds the
layer's bias into ``bias_down``) on ``jlora.models.load("all-minilm-l6-v2")`` and the hidden
states are compared.

Configs compared:
  houlsby   AdapterHub's ``DoubleSeqBnConfig`` (Houlsby: after attention and after the FFN,
            swish, reduction 16) = jlora.adapter_rules("bert", "houlsby").
  pfeiffer  Pfeiffer's placement (after the FFN only, relu, reduction 16) in the same form,
            ``SeqBnConfig(original_ln_before=False)``  = jlora.adapter_rules("bert", "pfeiffer").
AdapterHub's own ``SeqBnConfig`` default (``original_ln_before=True``) runs the adapter on
``LayerNorm(h + residual)`` and adds the residual a second time; that form is not a function
of the dense layer's output alone and jlora does not reproduce it (see docs/method_bottleneck.md).

Writes experiments/results/adapterhub_parity.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SENTENCES = ["a gorgeous, witty, seductive movie.",
             "the plot is nothing but boilerplate clichés from start to finish,",
             "it's a charming and often affecting journey."]
CONFIGS = ("houlsby", "pfeiffer")


def reference(model_dir: str, out: str) -> None:  # runs under the AdapterHub venv
  import adapters
  import torch
  from adapters import DoubleSeqBnConfig, SeqBnConfig
  from transformers import AutoTokenizer, BertModel

  tok = AutoTokenizer.from_pretrained(model_dir)
  enc = tok(SENTENCES, padding=True, return_tensors="pt")
  saved = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
  for name in CONFIGS:
    model = BertModel.from_pretrained(model_dir).eval()
    adapters.init(model)
    cfg = DoubleSeqBnConfig() if name == "houlsby" else SeqBnConfig(original_ln_before=False)
    model.add_adapter("a", config=cfg)
    model.set_active_adapters("a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if ".adapters.a." in pname:
          p.copy_(0.1 * torch.randn(p.shape, generator=g))
          saved[f"{name}/{pname}"] = p.numpy().copy()
        elif pname.endswith("output.dense.bias"):
          saved[f"{name}/{pname}"] = p.numpy().copy()
      hidden = model(**enc).last_hidden_state
    saved[f"{name}/hidden"] = hidden.numpy()
  np.savez(out, **saved)


def _adapter_tensors(ref, name: str, n_layers: int):
  """``{(module, layer): (down_w, down_b, up_w, up_b, layer_bias)}`` from the saved npz."""
  out = {}
  for i in range(n_layers):
    for module, torch_mod in (("layers/attention/output/dense", f"encoder.layer.{i}.attention.output"),
                              ("layers/output/dense", f"encoder.layer.{i}.output")):
      pre = f"{name}/{torch_mod}.adapters.a."
      if pre + "adapter_up.weight" not in ref:
        continue
      out[(module, i)] = (ref[pre + "adapter_down.0.weight"], ref[pre + "adapter_down.0.bias"],
                          ref[pre + "adapter_up.weight"], ref[pre + "adapter_up.bias"],
                          ref[f"{name}/{torch_mod}.dense.bias"])
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--venv", default="/tmp/ahvenv", help="the AdapterHub virtual environment")
  ap.add_argument("--reference", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "adapterhub_parity.txt"))
  args = ap.parse_args()
  if args.reference:
    reference(*args.reference)
    return

  import jax
  import jax.numpy as jnp
  import jlora
  import jlora.models

  model_dir, _ = jlora.models.resolve("all-minilm-l6-v2")
  with tempfile.TemporaryDirectory() as tmp:
    npz = Path(tmp) / "ref.npz"
    py = Path(args.venv) / "bin" / "python"
    subprocess.run([str(py), __file__, "--reference", str(model_dir), str(npz)], check=True)
    ref = dict(np.load(npz))
    ah_versions = subprocess.run([str(py), "-c", "import adapters, transformers, torch; print("
                                  "adapters.__version__, transformers.__version__, torch.__version__)"],
                                 check=True, capture_output=True, text=True).stdout.split()

  model, params, _ = jlora.models.load("all-minilm-l6-v2", task="base")
  n_layers = model.config.num_hidden_layers
  lines = [f"jlora bottleneck adapters vs AdapterHub adapters {ah_versions[0]} (transformers "
           f"{ah_versions[1]}, torch {ah_versions[2]}) on all-MiniLM-L6-v2, {len(SENTENCES)} "
           "real sentences, every adapter weight random N(0, 0.1); float32 CPU", ""]
  result = {}
  for name in CONFIGS:
    tree = jlora.wrap(params, jlora.adapter_rules("bert", name), key=jax.random.key(0))
    for (module, layer), (dw, db, uw, ub, lb) in _adapter_tensors(ref, name, n_layers).items():
      node = tree
      for part in module.split("/"):
        node = node[part]
      node["kernel"] = jlora.from_adapterhub(node["kernel"], dw, db, uw, ub, lb, layer=layer)
    fwd = jax.jit(jlora.lora(lambda p, i, m: model.apply({"params": p}, i, m)))
    out = fwd(tree, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
    hidden = np.asarray(out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out))
    want = ref[f"{name}/hidden"]
    keep = ref["attention_mask"].astype(bool)
    base = np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(
        params, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))[0])
    diff = float(np.abs(hidden - want)[keep].max())
    moved = float(np.abs(base - want)[keep].max())
    s = jlora.summary(tree)
    result[name] = {"max_abs_diff": diff, "adapter_effect": moved, "trainable": s.trainable}
    lines.append(f"{name:9s} max |jlora - AdapterHub| = {diff:.2e} over real tokens "
                 f"(the adapters move the hidden states by up to {moved:.2f}); "
                 f"{s.trainable:,} adapter parameters")
  text = "\n".join(lines) + "\n"
  print(text, end="")
  Path(args.out).write_text(text + "\n" + json.dumps(result, indent=1) + "\n")
  if any(r["max_abs_diff"] > 2e-4 for r in result.values()):
    sys.exit("parity FAILED (tolerance 2e-4)")


if __name__ == "__main__":
  main()
