"""Forgetting: SmolLM2-135M-Instruct as a causal LM on movie-review sentences, LoRA vs full fine-tuning.

  python experiments/run_forgetting.py [--out PATH] [--chat-prompts N] [KEY=VALUE ...]

Trains LoRA and full fine-tuning on the same movie-review sentences with the same steps
and batch (experiments/configs/smollm2_causal_lm.yaml, train.max_steps raised to 80
here) and scores the base model and both fine-tuned models on three held-out sets:

* movies: packed 64-token blocks of the movie-review test sentences (in-domain);
* nyt: the same for New York Times editorial sentences. Same lower-cased,
  space-tokenised format as the training text, other topic (out-of-domain, same format);
* chat: SmolLM2-Instruct's own chat format. A fixed list of generic user prompts
  (CHAT_PROMPTS, nothing about movies), each rendered with the tokenizer's chat template,
  followed by the base model's greedy reply (at most 48 new tokens, the end-of-turn token
  included when the model emitted it). A model is scored by the mean NLL / perplexity of
  those reply tokens given the prompt. The base model scores its own greedy replies well;
  a model that lost its instruction-following behaviour scores them worse
  (out-of-domain, different format).

The chat set is generated once from the base model and cached next to the results
(forgetting_chat_set.json, with the prompts, rendered prompts, reply text and token ids).
Results go to experiments/results/forgetting.{json,md,png}; partial results are written
after every stage, and a finished stage is not repeated (delete the json to start over;
a json from a different setup is refused rather than mixed in). A hand-written
forgetting_reading.md beside the json, if present, is copied into the md.

Smoke test of the whole path on a temporary results path:

  python experiments/run_forgetting.py --out /tmp/fgt/forgetting.json --chat-prompts 4 \\
      train.max_steps=2 data.max_eval_examples=16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "smollm2_causal_lm.yaml"
OUT = ROOT / "results" / "forgetting.json"
EARLIER = ROOT / "results" / "forgetting_40steps.json"
STEPS = 80  # 120 (3x the first run) did not fit the time available on the shared 2-core machine
CHAT_NEW_TOKENS = 48
METHODS = {
    "lora": ["method.name=lora", "train.lr=1e-3"],
    "full": ["method.name=full", "train.lr=1e-4"],
}
NAMES = ("base", "lora", "full")

# Generic instruction-following requests, written for this experiment. Short factual,
# how-to and writing tasks; none mention films or reviews.
CHAT_PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Explain what a prime number is.",
    "How do I boil an egg so the yolk stays soft?",
    "What is the capital of Australia?",
    "Write a short haiku about the ocean.",
    "Why is the sky blue?",
    "List four common fruits that are high in vitamin C.",
    "How many days are there in a leap year?",
    "What does a thermometer measure?",
    "Suggest a name for a small bakery.",
    "Explain the difference between weather and climate.",
    "How can I make my houseplants last longer?",
    "What is photosynthesis?",
    "Give me a simple recipe for a green salad.",
    "Translate 'good morning' into Spanish.",
    "What are the three primary colours?",
    "How do I change a flat bicycle tyre?",
    "Summarise what a computer's CPU does in two sentences.",
    "What is the boiling point of water at sea level?",
    "Write a polite email line asking a colleague for a meeting.",
    "Name three planets in our solar system.",
    "What is the difference between a virus and a bacterium?",
    "How should I prepare for a job interview?",
    "Explain what gravity is to a ten-year-old.",
    "What is 15 multiplied by 4?",
    "Give two reasons why regular exercise is healthy.",
    "What is a noun? Give an example.",
    "How do bees make honey?",
    "Suggest a short morning routine for a busy person.",
    "What causes the seasons on Earth?",
    "Write one sentence describing a rainy day.",
    "What is the largest ocean on Earth?",
    "How do I save money on groceries?",
    "Explain what a recipe's 'preheat the oven' step means.",
    "What language is spoken in Brazil?",
    "Give me a fun fact about octopuses.",
    "How can I fall asleep faster at night?",
    "What is the main job of the heart?",
    "Describe how to plant a tomato seedling.",
    "What is the freezing point of water in Fahrenheit?",
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every run")
  ap.add_argument("--out", type=Path, default=OUT, help="results json (md/png beside it)")
  ap.add_argument("--chat-prompts", type=int, default=len(CHAT_PROMPTS),
                  help="use only the first N chat prompts (smoke tests)")
  args = ap.parse_args()

  from jlora.cli import enable_compilation_cache
  from jlora.config import load_config
  from jlora.train import load_run, train

  enable_compilation_cache()
  out_path: Path = args.out
  chat_path = out_path.with_name(out_path.stem + "_chat_set.json")
  runs_tag = "" if out_path == OUT else "-" + out_path.parent.name
  overrides = [f"train.max_steps={STEPS}", *args.overrides]
  base_cfg = load_config(CONFIG, ["train.progress=false", *overrides])
  setup = {
      "model": base_cfg.model.name, "block_tokens": base_cfg.data.max_length,
      "eval_sentences_per_domain": base_cfg.data.max_eval_examples,
      "steps": base_cfg.train.max_steps, "batch_size": base_cfg.train.batch_size,
      "lora": {"rank": base_cfg.method.rank, "alpha": base_cfg.method.alpha,
               "targets": list(base_cfg.method.targets)},
      "in_domain": "movies (test split)", "out_of_domain_same_format": "nyt (test split)",
      "out_of_domain_chat": f"{args.chat_prompts} generic chat prompts + base greedy replies "
                            f"(<= {CHAT_NEW_TOKENS} new tokens), reply tokens scored",
      "overrides": args.overrides,
  }
  res = json.loads(out_path.read_text()) if out_path.exists() else {}
  if res and res.get("setup") != setup:
    same_but_steps = {**res.get("setup", {}), "steps": setup["steps"]} == setup
    if not (same_but_steps and not any(n in res for n in METHODS)):
      raise SystemExit(f"{out_path} holds results of another setup:\n  {res.get('setup')}\n"
                       f"this run is\n  {setup}\ndelete it (or pass --out) to start over")
    # only the step count changed and no method has finished: the base results still hold
  res["setup"] = setup
  res.setdefault("machine", machine())

  if "base" not in res or "chat" not in res["base"]:
    run = load_run(cfg=base_cfg, base=True)
    chat = chat_set(run, chat_path, args.chat_prompts)
    t0 = time.perf_counter()
    res["base"] = {**eval_corpora(run), "chat": score_chat(run, chat)}
    res["base"]["eval_seconds"] = time.perf_counter() - t0
    save(res, out_path)
  chat = json.loads(chat_path.read_text())
  for name, extra in METHODS.items():
    if name in res:
      continue
    cfg = load_config(CONFIG, [f"output_dir=runs/forgetting{runs_tag}-{name}", "resume=false",
                               "train.progress=false", *extra, *overrides])
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = train(cfg)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    run = load_run(out.output_dir)
    t1 = time.perf_counter()
    nyt = eval_corpora(run, ("nyt",))["nyt"]
    res[name] = {
        "movies": out.metrics["test"], "movies_validation": out.metrics["validation"],
        "nyt": nyt, "chat": score_chat(run, chat), "lr": cfg.train.lr,
        "trainable_params": out.trainable_params, "total_params": out.total_params,
        "train_seconds": out.train_seconds, "train_and_eval_wall_seconds": wall,
        "cpu_seconds": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "extra_eval_seconds": time.perf_counter() - t1,
        "saved_bytes": out.adapter_bytes, "steps": out.step,
    }
    save(res, out_path)
  save(res, out_path)


def machine() -> dict:
  try:
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if ln.startswith("Model name")), platform.processor())
  except OSError:
    cpu = platform.processor()
  import jax
  return {"cpu": cpu, "cpus": os.cpu_count(), "shared": True, "jax": jax.__version__,
          "backend": jax.default_backend(),
          "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def eval_corpora(run, domains=("movies", "nyt")) -> dict:
  from jlora.train import evaluate_run
  return {d: evaluate_run(run, "test", data_overrides={"domain": d}) for d in domains}


# ---- the chat set ------------------------------------------------------------------------


def chat_set(run, path: Path, n: int) -> dict:
  """Generates (once) the base model's greedy replies to the first n CHAT_PROMPTS."""
  prompts = CHAT_PROMPTS[:n]
  if path.exists():
    cached = json.loads(path.read_text())
    if [r["prompt"] for r in cached["rows"]] != prompts:
      raise SystemExit(f"{path} was made from other prompts; delete it to regenerate")
    return cached
  import jlora
  from jlora.generate import generate
  tok, cfg = run.tokenizer, run.model
  ids = []
  for p in prompts:
    enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                  tokenize=True)
    ids.append([int(t) for t in (enc["input_ids"] if hasattr(enc, "keys") else enc)])
  t0 = time.perf_counter()
  out = generate(jlora.merge(run.tree), cfg, ids, max_new_tokens=CHAT_NEW_TOKENS)
  seconds = time.perf_counter() - t0
  eos = set(cfg.eos_token_ids)
  rows = []
  for p, pid, row in zip(prompts, ids, out.tolist()):
    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # keep the eos
    reply = [int(t) for t in row[:cut]]
    rows.append({"prompt": p, "prompt_text": tok.decode(pid), "prompt_ids": pid,
                 "response": tok.decode(reply, skip_special_tokens=True), "response_ids": reply,
                 "ended_with_eos": reply[-1] in eos})
  data = {
      "about": "Greedy (temperature 0) replies of the BASE model (packaged SmolLM2-135M-Instruct "
               "Q4_1 GGUF, dequantised to float32) to generic prompts rendered with its chat "
               f"template; at most {CHAT_NEW_TOKENS} new tokens, the end-of-turn token kept when "
               "emitted. Scored as response tokens given the prompt.",
      "model": run.config.model.name, "max_new_tokens": CHAT_NEW_TOKENS, "greedy": True,
      "eos_token_ids": sorted(eos), "generate_seconds": seconds, "rows": rows,
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1) + "\n")
  return data


def score_chat(run, chat: dict, batch_size: int = 8) -> dict:
  """Mean NLL / perplexity of the reply tokens given each chat prompt, plus per-prompt NLLs."""
  import jax
  import jax.numpy as jnp

  import jlora
  params = jlora.merge(run.tree)
  seqs = [r["prompt_ids"] + r["response_ids"] for r in chat["rows"]]
  width = -(-max(len(s) for s in seqs) // 16) * 16
  ids = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  labels = np.full((len(seqs), width), -100, np.int32)
  for i, (r, s) in enumerate(zip(chat["rows"], seqs)):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
    n_p = len(r["prompt_ids"])
    labels[i, n_p - 1:len(s) - 1] = s[n_p:]  # position t predicts token t + 1

  @jax.jit
  def per_row(p, x, m, y):
    logits = run.forward(p, {"input_ids": x, "attention_mask": m}, True, None)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = y != -100
    tok = jnp.take_along_axis(logp, jnp.where(valid, y, 0)[..., None], -1)[..., 0]
    hit = (logits.argmax(-1) == y) & valid
    return -(tok * valid).sum(-1), valid.sum(-1), hit.sum(-1)

  nll, count, hits = [], [], []
  for s in range(0, len(seqs), batch_size):
    sl = slice(s, s + batch_size)
    x, m, y = ids[sl], mask[sl], labels[sl]
    k = batch_size - len(x)
    if k:  # keep one shape, one compile; padded rows have no targets
      x, m, y = (np.concatenate([a, np.full((k, width), v, np.int32)])
                 for a, v in ((x, 0), (m, 0), (y, -100)))
    a, b, c = (np.asarray(v) for v in per_row(params, x, m, y))
    n = batch_size - k
    nll += a[:n].tolist()
    count += b[:n].tolist()
    hits += c[:n].tolist()
  total = float(sum(count))
  loss = float(sum(nll)) / total
  return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": total,
          "top1_agreement": float(sum(hits)) / total,
          "per_prompt_nll": [float(v) for v in nll], "per_prompt_tokens": [int(v) for v in count]}


# ---- reporting ---------------------------------------------------------------------------


def _pct(new: float, old: float) -> str:
  return f"{100 * (new / old - 1):+.1f}%"


def paired(res: dict) -> dict | None:
  """LoRA vs full on the chat set, per prompt: who scores lower NLL, and a bootstrap interval."""
  if not all(n in res and "chat" in res[n] for n in ("lora", "full")):
    return None
  lo = np.asarray(res["lora"]["chat"]["per_prompt_nll"])
  fu = np.asarray(res["full"]["chat"]["per_prompt_nll"])
  n_tok = np.asarray(res["lora"]["chat"]["per_prompt_tokens"], float)
  rng = np.random.default_rng(0)
  boots = []
  for _ in range(2000):  # token-weighted mean NLL difference, prompts resampled
    i = rng.integers(0, len(lo), len(lo))
    boots.append((fu[i].sum() - lo[i].sum()) / n_tok[i].sum())
  return {"prompts_lora_lower_nll": int((lo < fu).sum()), "prompts": int(len(lo)),
          "mean_nll_full_minus_lora": float((fu.sum() - lo.sum()) / n_tok.sum()),
          "bootstrap_95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def save(res: dict, out_path: Path) -> None:
  out_path.parent.mkdir(parents=True, exist_ok=True)
  res["load_average"] = os.getloadavg()
  res["paired_chat"] = paired(res)
  out_path.write_text(json.dumps(res, indent=2) + "\n")
  s, mch = res.get("setup", {}), res.get("machine", {})
  base = res.get("base")
  lines = [
      "# Forgetting: SmolLM2-135M-Instruct, LoRA vs full fine-tuning on movie-review sentences",
      "",
      f"{s.get('steps')} steps of batch {s.get('batch_size')} x {s.get('block_tokens')}-token "
      f"blocks of movie-review sentences; LoRA r={s.get('lora', {}).get('rank')} "
      f"alpha={s.get('lora', {}).get('alpha')} on all 7 projections at lr "
      f"{res.get('lora', {}).get('lr', 1e-3):g}, full fine-tuning at lr "
      f"{res.get('full', {}).get('lr', 1e-4):g}. Produced by "
      "`python experiments/run_forgetting.py`"
      + (f" with overrides {s['overrides']}" if s.get("overrides") else "") + ". "
      f"Machine: {mch.get('cpu')}, {mch.get('cpus')} CPUs shared with other jobs, JAX "
      f"{mch.get('jax')} on {mch.get('backend')}; started {mch.get('date_utc')}.",
      "",
      "| model | trainable params | steps | movies ppl (in-domain) | change | NYT ppl (OOD, "
      "same format) | change | chat-reply ppl (OOD, chat format) | change | train wall s | "
      "CPU s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in NAMES:
    if name not in res:
      continue
    r = res[name]
    cells = []
    for dom in ("movies", "nyt", "chat"):
      v = r[dom]["perplexity"]
      cells += [f"{v:.2f}", _pct(v, base[dom]["perplexity"]) if base and name != "base" else ""]
    lines.append(
        f"| {name} | {r.get('trainable_params', 0):,} | {r.get('steps', 0)} | "
        + " | ".join(cells)
        + f" | {r.get('train_seconds', 0):.0f} | {r.get('cpu_seconds', 0):.0f} |")
  missing = [n for n in NAMES if n not in res]
  if missing:
    lines += ["", f"**Partial:** no result yet for {', '.join(missing)}."]
  if base and "chat" in base:
    agree = ", ".join(f"{n} {100 * res[n]['chat']['top1_agreement']:.0f}%"
                      for n in NAMES if n in res)
    lines += ["", f"Chat set: {len(base['chat']['per_prompt_nll'])} prompts, "
              f"{base['chat']['tokens']:.0f} scored reply tokens. Top-1 agreement with the base "
              f"model's greedy reply tokens: {agree}."]
  p = res.get("paired_chat")
  if p:
    lines += ["", f"Paired over chat prompts: LoRA has the lower reply NLL on "
              f"{p['prompts_lora_lower_nll']}/{p['prompts']} prompts; mean reply-token NLL "
              f"full minus LoRA = {p['mean_nll_full_minus_lora']:+.3f} nats (bootstrap 95% over "
              f"prompts {p['bootstrap_95'][0]:+.3f} to {p['bootstrap_95'][1]:+.3f})."]
  lines += [
      "",
      "Perplexity is exp(mean token NLL) under SmolLM2's tokenizer. Movies and NYT: packed "
      f"64-token blocks of a seeded random subset of {s.get('eval_sentences_per_domain')} "
      "sentences of each domain's test split (the last partial block kept); both corpora are "
      "lower-cased with punctuation split off by spaces, the format the models are trained "
      "on. Chat: the base model's own greedy replies (<= 48 new tokens, end-of-turn token "
      "included) to generic user prompts in SmolLM2-Instruct's chat template "
      "(`forgetting_chat_set.json`), reply tokens only. The base scores its own greedy output "
      "by construction, so its chat perplexity is low and any change in a fine-tuned model "
      "measures drift away from the base model's instruction-following behaviour. The same "
      "tokens are scored for every model. The packaged base is the Q4_1 GGUF dequantised to "
      "float32. 'train wall s' is the training loop's wall time (compile included) on the "
      "shared machine; 'CPU s' is the CPU time the training process used for training and its "
      "final movies evaluation.",
      "",
  ]
  reading = out_path.with_name(out_path.stem + "_reading.md")
  if reading.exists():
    lines += [reading.read_text().rstrip(), ""]
  earlier = out_path.with_name(out_path.stem + "_40steps.json")
  if earlier.exists():
    e = json.loads(earlier.read_text())
    lines += [
        "## Earlier result: 40 steps, movies vs NYT only",
        "",
        "The first version of this experiment (same config, 40 steps, no chat set; "
        "`forgetting_40steps.json`, `forgetting_40steps.png`):",
        "",
        "| model | trainable params | movies ppl | change | NYT ppl | change | train s | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in NAMES:
      if name in e:
        r = e[name]
        mv, ny = r["movies"]["perplexity"], r["nyt"]["perplexity"]
        dm = _pct(mv, e["base"]["movies"]["perplexity"]) if name != "base" else ""
        dn = _pct(ny, e["base"]["nyt"]["perplexity"]) if name != "base" else ""
        lines.append(f"| {name} | {r.get('trainable_params', 0):,} | {mv:.2f} | {dm} | "
                     f"{ny:.2f} | {dn} | {r.get('train_seconds', 0):.0f} | "
                     f"{r.get('cpu_seconds', 0):.0f} |")
    lines += [
        "",
        "Both perplexities fell for both methods, so it showed no forgetting: the NYT "
        "sentences share the training text's unusual format (lower-cased, space-separated "
        "punctuation), which both methods learn first. That is why the chat-format set "
        "above was added.",
        "",
    ]
  out_path.with_suffix(".md").write_text("\n".join(lines))
  plot(res, out_path)


def plot(res: dict, out_path: Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
    return
  names = [n for n in NAMES if n in res]
  doms = {"movies": "movies (in-domain)", "nyt": "NYT (OOD, same format)",
          "chat": "chat replies (OOD, chat format)"}
  fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
  for ax, (dom, title) in zip(axes, doms.items()):
    vals = [res[n][dom]["perplexity"] for n in names]
    bars = ax.bar(range(len(names)), vals, color=["#888888", "#1f77b4", "#d62728"][:len(names)])
    for b, v in zip(bars, vals):
      ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.1f}", (b.get_x() + b.get_width() / 2, v),
                  ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([{"base": "base", "lora": "LoRA", "full": "full FT"}[n] for n in names])
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)
  axes[0].set_ylabel("held-out perplexity")
  fig.suptitle(f"SmolLM2-135M-Instruct fine-tuned on movie sentences "
               f"({res.get('setup', {}).get('steps')} steps)", fontsize=10)
  fig.tight_layout()
  fig.savefig(out_path.with_suffix(".png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
