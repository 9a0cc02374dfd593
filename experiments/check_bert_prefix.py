"""jlora's prefix tuning on BERT against PEFT 0.21's, both ways, with the same weights.

  python experiments/check_bert_prefix.py --venv /tmp/ahvenv

PEFT runs prefix tuning on BERT only with transformers 4 (transformers 5's BertModel takes no
``past_key_values``; PEFT raises "Model does not support past key values"), so PEFT runs in
its own virtual environment (the one of experiments/check_adapterhub.py, plus PEFT):

  /tmp/ahvenv/bin/pip install torch==2.13.0 transformers==4.57.6 "peft==0.21.*" safetensors numpy

Under that venv's Python (``--reference``) this script builds a small random
BertForSequenceClassification (2 layers, 32 wide; every weight perturbed), saves it, wraps it
in PEFT prefix tuning (SEQ_CLS, 4 virtual tokens; direct and ``prefix_projection=True``) with
random prefix weights and a changed head, saves the adapters and the logits of a padded batch.
Here ``jlora.load_peft`` puts each adapter on ``jlora.models.load(<folder>)`` and the logits are
compared; then jlora's own ``save_peft`` of a jlora-made prefix is loaded back by PEFT
(``--peft-logits``) and its logits compared with jlora's.

Writes experiments/results/bert_prefix_parity.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

IDS = np.array([[2, 11, 25, 7, 30, 3], [2, 14, 9, 3, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


def reference(out: str) -> None:  # under the venv: transformers 4.57 + PEFT
  import peft
  import torch
  import transformers

  out = Path(out)
  cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=48,
                                max_position_embeddings=32, num_labels=3)
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(cfg).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  model.save_pretrained(out / "base")
  logits = {}
  for name, proj in (("direct", False), ("projection", True)):
    base = transformers.BertForSequenceClassification.from_pretrained(out / "base").eval()
    pc = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=proj,
                                 encoder_hidden_size=20)
    pm = peft.get_peft_model(base, pc).eval()
    with torch.no_grad():
      for n, p in pm.named_parameters():
        if p.requires_grad:  # the prefix encoder and the head (modules_to_save)
          p.copy_(0.5 * torch.randn(p.shape, generator=g))
      logits[name] = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    pm.save_pretrained(out / name)
  np.savez(out / "logits.npz", **logits)


def peft_logits(base_dir: str, adapter_dir: str, out: str) -> None:  # under the venv
  import peft
  import torch
  import transformers

  base = transformers.BertForSequenceClassification.from_pretrained(base_dir).eval()
  pm = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    np.save(out, pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--venv", default="/tmp/ahvenv")
  ap.add_argument("--reference", metavar="OUT", help=argparse.SUPPRESS)
  ap.add_argument("--peft-logits", nargs=3, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bert_prefix_parity.txt"))
  args = ap.parse_args()
  if args.reference:
    reference(args.reference)
    return
  if args.peft_logits:
    peft_logits(*args.peft_logits)
    return

  import jax
  import jlora
  import jlora.models

  py = str(Path(args.venv) / "bin" / "python")
  versions = subprocess.run([py, "-c", "import peft, transformers, torch; print(peft.__version__, "
                             "transformers.__version__, torch.__version__)"],
                            check=True, capture_output=True, text=True).stdout.split()
  lines = [f"jlora prefix tuning on BERT vs PEFT {versions[0]} (transformers {versions[1]}, torch "
           f"{versions[2]}): a random 2-layer BertForSequenceClassification, 4 virtual tokens, a "
           "padded batch of 2; float32 CPU", ""]
  result = {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    subprocess.run([py, __file__, "--reference", str(tmp)], check=True)
    want = dict(np.load(tmp / "logits.npz"))
    model, params, _ = jlora.models.load(tmp / "base", task="classification", with_tokenizer=False)
    run = jax.jit(jlora.lora(lambda p: model.apply({"params": p}, IDS, MASK)))
    for name in ("direct", "projection"):
      tree = jlora.load_peft(tmp / name, params)
      got = np.asarray(run(tree))
      base = np.asarray(run(params))
      d = float(np.abs(got - want[name]).max())
      result[f"load_{name}"] = d
      lines.append(f"PEFT -> jlora ({name:10s}): max |jlora - PEFT| logits = {d:.2e} "
                   f"(the prefix moves them by {np.abs(base - want[name]).max():.2f})")
    tree = jlora.add_prefix(params, jlora.PrefixTuning(4, projection=16), key=jax.random.key(5),
                            config=model.config)
    tree["classifier"] = {k: jlora.FullWeight(v + 0.3) for k, v in params["classifier"].items()}
    ours = np.asarray(run(tree))
    jlora.save_peft(tmp / "jlora", tree)
    subprocess.run([py, __file__, "--peft-logits", str(tmp / "base"), str(tmp / "jlora"),
                    str(tmp / "peft.npy")], check=True)
    d = float(np.abs(np.load(tmp / "peft.npy") - ours).max())
    result["save_projection"] = d
    lines.append(f"jlora -> PEFT (projection): max |PEFT - jlora| logits = {d:.2e}")
  text = "\n".join(lines) + "\n"
  print(text, end="")
  Path(args.out).write_text(text + "\n" + json.dumps(result, indent=1) + "\n")
  if max(result.values()) > 2e-4:
    sys.exit("parity FAILED (tolerance 2e-4)")


if __name__ == "__main__":
  main()
