"""LoRA rank sweep on the default job, and the subspace similarity of the r=8 and r=64 adapters.

  python experiments/run_rank_sweep.py [--ranks 1,2,4,8,16,64]

The default job (all-MiniLM-L6-v2 on the packaged movie-review sentences, LoRA on every
layer's query and value kernels plus the classifier head trained in full, 1 epoch, batch 32,
lr 2e-3, seed 0) is run at each rank with alpha = 2 * rank, so the LoRA scale alpha / r stays 2
(the default job itself is r=8, alpha=16: the r=8 entry *is* the default job). Runs go to
runs/rank-qv-r<r> (a finished run is read back, not repeated; delete it to re-run).

Then, in the spirit of the LoRA paper's Figure 3, for every adapted matrix (query and value
of layers 0..5) the input-side factor ``a`` (jlora stores a LoRA leaf of a stacked BERT kernel
as ``a``: (layers, d_in, r) and ``b``: (layers, r, d_out); the update is
``(alpha / r) * a @ b``) of the r=8 run and of the r=64 run are compared:

  U8, U64 = left singular vectors of a_8 (d_in x 8) and a_64 (d_in x 64)
  phi(i, j) = ||U8[:, :i]^T U64[:, :j]||_F^2 / min(i, j),  i = 1..8, j = 1..64

phi is 1 when the top-i directions of one lie inside the top-j directions of the other and 0
when they are orthogonal. Two reference points make it readable:

* random: the same phi for two independent Gaussian subspaces of R^384 (mean over 50
  draws); its expectation is max(i, j) / 384.
* init: ``a`` is initialised at random (Kaiming-uniform) and ``b`` at zero, and one epoch is
  only 266 steps, so ``a`` may still be close to its initial value. The script rebuilds each
  run's initial adapters (the trainer's ``jlora.wrap`` with the same seed) and reports
  ||a - a0|| / ||a0|| and phi(a_8 trained, a_8 init).

Because of that second point, the same phi is also computed for the learned update itself,
dW = a @ b (b starts at zero, so dW is entirely learned): its top left-singular vectors
(the input side, R^384) and top right-singular vectors (the output side).

Writes experiments/results/rank_sweep.json, rank_sweep.md and rank_sweep.png. Needs
matplotlib for the figure (not a jlora dependency: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lora_runs import RUNS, machine, run_or_load, today  # noqa: E402

ROOT = Path(__file__).resolve().parent
RANKS = (1, 2, 4, 8, 16, 64)
TARGETS = "query,value"
N_RANDOM = 50


def overrides(rank: int) -> list[str]:
  return [f"method.targets={TARGETS}", f"method.rank={rank}", f"method.alpha={2 * rank}", "train.lr=2e-3"]  # the default job's lr when measured (now 4e-3 at alpha = r)


def run_name(rank: int) -> str:
  return f"rank-qv-r{rank}"


# ---- subspace similarity -----------------------------------------------------------------------

def lora_factors(tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{"layers/value/kernel": (a, b)}`` for every LoRA leaf of a wrapped tree (host arrays)."""
  import jax  # noqa: PLC0415
  import jlora  # noqa: PLC0415
  from jlora._paths import path_str  # noqa: PLC0415

  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.is_adapted)[0]:
    if jlora.is_adapted(leaf) and hasattr(leaf, "a") and hasattr(leaf, "b"):
      out[path_str(kp)] = (np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64))
  return out


def trained_and_init(run_dir: Path):
  """The trained LoRA factors of a run and the ones the trainer started from."""
  import jax  # noqa: PLC0415
  import jlora  # noqa: PLC0415
  from jlora.config import load_config  # noqa: PLC0415
  from jlora.train import build_rules, load_run  # noqa: PLC0415

  run = load_run(run_dir)
  trained = lora_factors(run.tree)
  cfg = load_config(run_dir / "config.yaml")
  base = load_run(run_dir, base=True).tree  # the plain params the trainer wrapped
  init_tree = jlora.wrap(base, build_rules(cfg, base, run.family), key=jax.random.key(cfg.train.seed))
  init = lora_factors(init_tree)
  return trained, init


def basis(m: np.ndarray, side: str = "left") -> np.ndarray:
  """Orthonormal singular vectors of ``m``, by decreasing singular value (left: columns of m)."""
  u, _, vt = np.linalg.svd(m, full_matrices=False)
  return u if side == "left" else vt.T


def phi(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """phi[i-1, j-1] = ||u[:, :i]^T v[:, :j]||_F^2 / min(i, j)."""
  g = (u.T @ v) ** 2  # (ni, nj) squared overlaps
  cum = g.cumsum(0).cumsum(1)
  ni, nj = g.shape
  mins = np.minimum.outer(np.arange(1, ni + 1), np.arange(1, nj + 1))
  return cum / mins


def random_phi(d: int, ni: int, nj: int, draws: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  acc = np.zeros((ni, nj))
  for _ in range(draws):
    u = np.linalg.qr(rng.standard_normal((d, ni)))[0]
    v = np.linalg.qr(rng.standard_normal((d, nj)))[0]
    acc += phi(u, v)
  return acc / draws


def summarise(p: np.ndarray) -> dict:
  return {"phi_1_1": float(p[0, 0]), "phi_1_64": float(p[0, -1]), "phi_8_8": float(p[-1, 7]),
          "phi_8_64": float(p[-1, -1]), "max_over_j_phi_1_j": float(p[0].max())}


def subspace_analysis(r_lo: int = 8, r_hi: int = 64) -> dict:
  lo, lo0 = trained_and_init(RUNS / run_name(r_lo))
  hi, hi0 = trained_and_init(RUNS / run_name(r_hi))
  out: dict = {"r_lo": r_lo, "r_hi": r_hi, "matrices": {}, "heatmaps": {}}
  shapes = {}
  for path in sorted(lo):
    a8, b8 = lo[path]
    a64, b64 = hi[path]
    a8_0, b8_0 = lo0[path]
    a64_0, _ = hi0[path]
    shapes[path] = {"a": list(a8.shape), "b": list(b8.shape), "a_hi": list(a64.shape)}
    assert np.all(b8_0 == 0), "b is expected to start at zero"
    stacked = a8.ndim == 3
    layers = range(a8.shape[0]) if stacked else [None]
    for l in layers:
      sel = (lambda x: x[l]) if stacked else (lambda x: x)
      name = path.replace("layers/", "").replace("/kernel", "") + (f"[{l}]" if stacked else "")
      A8, A64, A8_0, A64_0 = sel(a8), sel(a64), sel(a8_0), sel(a64_0)
      dW8 = sel(a8) @ sel(b8)
      dW64 = sel(a64) @ sel(b64)
      p_a = phi(basis(A8)[:, :r_lo], basis(A64)[:, :r_hi])
      p_in = phi(basis(dW8)[:, :r_lo], basis(dW64)[:, :r_hi])
      p_out = phi(basis(dW8, "right")[:, :r_lo], basis(dW64, "right")[:, :r_hi])
      p_a_init = phi(basis(A8)[:, :r_lo], basis(A8_0)[:, :r_lo])
      out["matrices"][name] = {
          "a_factor": summarise(p_a),
          "delta_w_input_side": summarise(p_in),
          "delta_w_output_side": summarise(p_out),
          "a_rel_change_r8": float(np.linalg.norm(A8 - A8_0) / np.linalg.norm(A8_0)),
          "a_rel_change_r64": float(np.linalg.norm(A64 - A64_0) / np.linalg.norm(A64_0)),
          "phi_8_8_a8_trained_vs_a8_init": float(p_a_init[-1, -1]),
          "delta_w_fro_r8": float(np.linalg.norm(dW8)), "delta_w_fro_r64": float(np.linalg.norm(dW64)),
          "delta_w_r64_energy_in_top8": float(
              (np.linalg.svd(dW64, compute_uv=False)[:8] ** 2).sum() / (np.linalg.norm(dW64) ** 2)),
      }
      out["heatmaps"][name] = {"a_factor": p_a.tolist(), "delta_w_input_side": p_in.tolist()}
  d = next(iter(lo.values()))[0].shape[-2]
  rnd = random_phi(d, r_lo, r_hi, N_RANDOM)
  out["random"] = {"d": d, "draws": N_RANDOM, **summarise(rnd), "heatmap": rnd.tolist()}
  out["factor_shapes"] = shapes
  return out


# ---- report ------------------------------------------------------------------------------------

def binom_std(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n)


def write(rows: list[dict], sub: dict | None, n_eval: dict, missing: list[int] = ()) -> None:
  res = ROOT / "results"
  res.mkdir(parents=True, exist_ok=True)
  meta = {"machine": machine(), "date": today(), "targets": TARGETS, "alpha": "2 * rank",
          "job": "default job (experiments/configs/minilm_sentiment.yaml) with method.rank / "
                 "method.alpha overridden", "eval_rows": n_eval,
          "script": "experiments/run_rank_sweep.py",
          "ranks_not_run": list(missing)}
  (res / "rank_sweep.json").write_text(json.dumps(
      {"meta": meta, "runs": rows, "subspace": sub}, indent=1) + "\n")
  heat_layer = plot(rows, sub, res / "rank_sweep.png")

  sv = binom_std(rows[0]["test_accuracy"], n_eval["test"])
  accs = [r["test_accuracy"] for r in rows]
  L = [
      "# LoRA rank sweep: all-MiniLM-L6-v2 on movie-review sentiment", "",
      f"Produced by `python experiments/run_rank_sweep.py` on {meta['date']}; machine: "
      f"{meta['machine']}.", "",
      "Setup: the default job (packaged movie-review sentences, canonical split 8,513 train / "
      f"{n_eval['validation']:,} validation / {n_eval['test']:,} test; 1 epoch = 266 steps of batch 32, "
      "lr 2e-3 with 6% warmup, seed 0), LoRA on the query and value kernels of all 6 layers plus "
      "the classifier head (770 parameters) trained in full. Only the rank changes; "
      "**alpha = 2 x rank** throughout, so the update's scale alpha/r is 2 at every rank "
      "(r=8, alpha=16 is exactly the default job). One run (one seed) per rank. `train s` is "
      "wall time of the training steps (compile included) on a machine shared with another "
      "process (see the load averages), so it is only a rough cost indicator.", "",
      "| rank | alpha | trainable params | LoRA params (no head) | val acc | test acc | train s | "
      "load avg start / end |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    la = (f"{r.get('load_average_at_start', float('nan')):.1f} / "
          f"{r.get('load_average_at_end', float('nan')):.1f}")
    L.append(f"| {r['rank']} | {r['alpha']:g} | {r['trainable_params']:,} | "
             f"{r['trainable_params'] - 770:,} | {r['validation_accuracy']:.4f} | "
             f"{r['test_accuracy']:.4f} | {r['train_seconds']:.0f} | {la} |")
  if missing:
    L += ["", f"Not run (out of time on the shared machine): r = {', '.join(map(str, missing))}."]
  L += ["", f"Noise: with {n_eval['test']:,} test sentences the binomial standard error of one "
        f"accuracy is about {100 * sv:.1f} points (similar for validation) and a difference of two "
        f"such numbers about {100 * math.sqrt(2) * sv:.1f}; seed-to-seed variation was not measured "
        "(one seed per rank) and adds to that. The spread across ranks here is "
        f"{100 * (max(accs) - min(accs)):.1f} points (test).", ""]
  L += reading_accuracy(rows, sv)
  if sub is not None:
    L += subspace_md(sub, heat_layer)
  L += ["", "Figure: `rank_sweep.png` (left: accuracy vs trainable parameters, log x, with "
        "+-1 binomial standard error bars; right: phi heatmaps for "
        f"{heat_layer}, the last layer's value projection, one of the two matrices whose A phi(1,1) "
        "exceeds 0.5 (so a favourable example; the table has all 12), next to two random "
        "subspaces).", ""]
  (res / "rank_sweep.md").write_text("\n".join(L))


def reading_accuracy(rows: list[dict], sv: float) -> list[str]:
  by = {r["rank"]: r for r in rows}
  best = max(rows, key=lambda r: r["validation_accuracy"])
  lo = min(rows, key=lambda r: r["test_accuracy"])
  hi = max(rows, key=lambda r: r["test_accuracy"])
  within = (hi["test_accuracy"] - lo["test_accuracy"]) <= 2 * math.sqrt(2) * sv
  s = ["**Reading (accuracy).** "
       f"The best validation accuracy is at r={best['rank']} ({best['validation_accuracy']:.4f}); "
       f"test accuracy ranges from {lo['test_accuracy']:.4f} (r={lo['rank']}) to "
       f"{hi['test_accuracy']:.4f} (r={hi['rank']}). "]
  if within:
    s[0] += ("That whole range is within about two standard errors of a difference between two "
             "runs, so this sweep cannot tell the ranks apart: ")
  else:
    s[0] += "Part of that range exceeds two standard errors of a difference: "
  if 1 in by and 64 in by:
    s[0] += (f"r=1 ({by[1]['trainable_params']:,} trainable parameters) scores "
             f"{by[1]['test_accuracy']:.4f} on test against {by[64]['test_accuracy']:.4f} for r=64 "
             f"({by[64]['trainable_params']:,}), a {by[64]['trainable_params'] / by[1]['trainable_params']:.0f}x "
             "larger adapter. ")
  if 8 in by and 64 in by:
    s[0] += (f"A larger rank buys nothing here: r=64 scores {by[64]['test_accuracy']:.4f} test / "
             f"{by[64]['validation_accuracy']:.4f} validation against r=8's "
             f"{by[8]['test_accuracy']:.4f} / {by[8]['validation_accuracy']:.4f}. ")
  s[0] += ("That is consistent with the LoRA paper's observation that small ranks are competitive "
           "for query/value adaptation; whether the smallest ranks lose a point or two is not "
           "resolved at this noise level, and nothing here shows that rank is irrelevant in "
           "general (one seed, one short epoch, one easy binary task).")
  return s + [""]


def subspace_md(sub: dict, heat_layer: str) -> list[str]:
  rnd = sub["random"]
  L = ["## Subspace similarity of the r=8 and r=64 adapters", "",
       f"phi(i, j) = ||U8[:, :i]^T U64[:, :j]||_F^2 / min(i, j) between the top-i singular "
       f"directions of the r=8 run and the top-j of the r=64 run (i <= 8, j <= 64; d_in = d_out = "
       f"{rnd['d']}). Factor shapes as stored by jlora: "
       + "; ".join(f"`{k}`: a {v['a']}, b {v['b']} (r=64: a {v['a_hi']})"
                   for k, v in sub["factor_shapes"].items())
       + ". `A` = left singular vectors of the input-side factor a (its column space in R^384, the "
       "paper's row space of A); `dW in` / `dW out` = left / right singular vectors of the learned "
       "update a @ b. Random = two independent Gaussian subspaces of the same sizes, mean of "
       f"{rnd['draws']} draws (expected max(i, j) / {rnd['d']}).", "",
       "| matrix | A phi(1,1) | A phi(8,64) | dW in phi(1,1) | dW in phi(8,8) | dW in phi(8,64) | "
       "dW out phi(1,1) | dW out phi(8,64) | a moved: ||a-a0||/||a0|| r=8 / r=64 | "
       "phi(8,8) a8 vs its init | r=64 dW energy in top 8 |",
       "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, m in sub["matrices"].items():
    A, I, O = m["a_factor"], m["delta_w_input_side"], m["delta_w_output_side"]
    L.append(f"| {name} | {A['phi_1_1']:.3f} | {A['phi_8_64']:.3f} | {I['phi_1_1']:.3f} | "
             f"{I['phi_8_8']:.3f} | {I['phi_8_64']:.3f} | {O['phi_1_1']:.3f} | {O['phi_8_64']:.3f} | "
             f"{m['a_rel_change_r8']:.3f} / {m['a_rel_change_r64']:.3f} | "
             f"{m['phi_8_8_a8_trained_vs_a8_init']:.3f} | {m['delta_w_r64_energy_in_top8']:.3f} |")
  L.append(f"| random subspaces | {rnd['phi_1_1']:.3f} | {rnd['phi_8_64']:.3f} | "
           f"{rnd['phi_1_1']:.3f} | {rnd['phi_8_8']:.3f} | {rnd['phi_8_64']:.3f} | "
           f"{rnd['phi_1_1']:.3f} | {rnd['phi_8_64']:.3f} | | | |")
  L += ["", subspace_reading(sub), ""]
  return L


def subspace_reading(sub: dict) -> str:
  ms = list(sub["matrices"].values())
  rnd = sub["random"]
  med = lambda key, sub_key: float(np.median([m[key][sub_key] for m in ms]))  # noqa: E731
  moved8 = float(np.median([m["a_rel_change_r8"] for m in ms]))
  moved64 = float(np.median([m["a_rel_change_r64"] for m in ms]))
  same8 = float(np.median([m["phi_8_8_a8_trained_vs_a8_init"] for m in ms]))
  a11, a864 = med("a_factor", "phi_1_1"), med("a_factor", "phi_8_64")
  i11, i864 = med("delta_w_input_side", "phi_1_1"), med("delta_w_input_side", "phi_8_64")
  o11, o864 = med("delta_w_output_side", "phi_1_1"), med("delta_w_output_side", "phi_8_64")
  e8 = float(np.median([m["delta_w_r64_energy_in_top8"] for m in ms]))
  r11, r864 = rnd["phi_1_1"], rnd["phi_8_64"]

  def vs(x, r):
    return f"{x:.3f} (random {r:.3f}, {x / r:.1f}x)" if x < 10 * r else f"{x:.3f} ({x / r:.0f}x random)"

  a11s = [m["a_factor"]["phi_1_1"] for m in ms]

  txt = (f"**Reading (subspaces).** Medians over the {len(ms)} adapted matrices. Raw A factors: "
         f"phi(1,1) = {vs(a11, r11)}, phi(8,64) = {vs(a864, r864)}. The learned update "
         f"dW = a @ b, input side: phi(1,1) = {vs(i11, r11)}, phi(8,64) = {vs(i864, r864)}; output "
         f"side: phi(1,1) = {vs(o11, r11)}, phi(8,64) = {vs(o864, r864)}. "
         f"Caveat for the A columns: a starts random (Kaiming-uniform, different draws in the two "
         f"runs) and b at zero; after the 266 steps a has moved by a median {moved8:.2f} (r=8) / "
         f"{moved64:.2f} (r=64) of its initial norm, yet a_8 still shares phi(8,8) = {same8:.2f} "
         f"with its own initialisation (random: {rnd['phi_8_8']:.3f}), so part of each A subspace "
         "is still the initial random draw, which pulls the A-factor phi towards chance; the update "
         "dW (b starts at zero, so dW is entirely learned) gives values of the same size. The r=64 update keeps a median "
         f"{100 * e8:.0f}% of its squared Frobenius norm in its top 8 singular directions. ")
  txt += ("(At i = 8, j = 64 the A and dW-input columns coincide by construction: dW's input "
          "side spans the column space of a when b has full rank.) ")
  if max(i11, o11, a11) > 10 * r11:
    txt += ("So the single top direction learned at r=8 and the one learned at r=64 are far more "
            "aligned than two random directions (a median phi(1,1) of "
            f"{a11:.2f} for A, range {min(a11s):.2f} to {max(a11s):.2f}, against {r11:.3f}), and "
            "the r=64 update has most of its norm in 8 directions: qualitatively the paper's Figure-3 point "
            "that the top directions are shared across ranks and the extra ones add little. The "
            "overlap is weaker than the paper's (it reports phi > 0.5 in the top direction; here "
            f"{sum(x > 0.5 for x in a11s)} of {len(a11s)} matrices reach that), plausibly because "
            "a is still partly its random initialisation after one short epoch; one seed per "
            "rank, so the per-matrix values are not robust.")
  else:
    txt += ("The top directions of the two runs overlap little more than chance, so the paper's "
            "Figure-3 observation is not reproduced on this short job.")
  return txt


def plot(rows: list[dict], sub: dict | None, path: Path) -> str:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib is not installed: no figure (pip install matplotlib)")
    return "(no figure)"
  layer = "attention/self/value[5]"
  if sub is not None and layer not in sub["heatmaps"]:
    layer = next(iter(sub["heatmaps"]))
  ncol = 4 if sub is not None else 1
  fig, axes = plt.subplots(1, ncol, figsize=(5 * ncol, 4.2),
                           gridspec_kw={"width_ratios": [1.3] + [1] * (ncol - 1)})
  axes = np.atleast_1d(axes)
  ax = axes[0]
  x = [r["trainable_params"] for r in rows]
  for key, label, n in (("validation_accuracy", "validation", 1042), ("test_accuracy", "test", 1013)):
    y = [r[key] for r in rows]
    ax.errorbar(x, y, yerr=[binom_std(v, n) for v in y], marker="o", capsize=3, label=label)
  for r in rows:
    ax.annotate(f"r={r['rank']}", (r["trainable_params"], r["test_accuracy"]),
                textcoords="offset points", xytext=(4, -12), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters (LoRA q,v + 770 head), log scale")
  ax.set_ylabel("accuracy")
  ax.set_title("MiniLM sentiment: accuracy vs LoRA rank (alpha = 2r)")
  ax.legend()
  ax.grid(alpha=0.3)
  if sub is not None:
    short = layer.replace("attention/self/", "")
    maps = [("a_factor", f"A factor, {short}"), ("delta_w_input_side", f"dW=a@b input side, {short}"),
            (None, "random subspaces")]
    for ax, (key, title) in zip(axes[1:], maps):
      m = np.asarray(sub["random"]["heatmap"] if key is None else sub["heatmaps"][layer][key])
      im = ax.imshow(m, aspect="auto", vmin=0, vmax=1, cmap="viridis",
                     extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
      ax.set_xlabel("j (top-j directions of r=64)")
      ax.set_ylabel("i (top-i directions of r=8)")
      ax.set_title(f"phi(i, j): {title}", fontsize=9)
    fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
  else:
    fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return layer


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ranks", default=",".join(map(str, RANKS)))
  ap.add_argument("--no-subspace", action="store_true")
  ap.add_argument("--only-finished", action="store_true",
                  help="train nothing: report the ranks whose runs have finished")
  ap.add_argument("--keep-saved", action="store_true",
                  help="keep the rows (and the subspace analysis) of results/rank_sweep.json for "
                       "the ranks not in --ranks, e.g. to add one rank to a finished sweep whose "
                       "run folders are gone")
  args = ap.parse_args()
  ranks = [int(r) for r in args.ranks.split(",") if r]
  saved = json.loads((ROOT / "results" / "rank_sweep.json").read_text()) if args.keep_saved else None
  rows, missing = [], []
  for r in ranks:
    row = run_or_load(run_name(r), overrides(r), train_missing=not args.only_finished)
    if row is None:
      missing.append(r)
      continue
    rows.append(row)
    print(json.dumps(row), flush=True)
  if saved is not None:
    rows += [dict(r, kept_from="results/rank_sweep.json") for r in saved["runs"]
             if r["rank"] not in {x["rank"] for x in rows}]
    rows.sort(key=lambda r: r["rank"])
    missing = [r for r in missing if r not in {x["rank"] for x in rows}]
  ranks = [r["rank"] for r in rows]
  n_eval = {"validation": 1042, "test": 1013}
  sub = None
  if not args.no_subspace and 8 in ranks and 64 in ranks and (RUNS / run_name(8)).exists() and (
      RUNS / run_name(64)).exists():
    sub = subspace_analysis(8, 64)
  elif saved is not None:
    sub = saved.get("subspace")
  write(rows, sub, n_eval, missing)
  print(f"wrote {ROOT / 'results' / 'rank_sweep.md'}")


if __name__ == "__main__":
  main()
