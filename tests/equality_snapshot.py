"""Fixed-seed snapshot of a few training runs, to show a refactor changes no number (not collected by pytest).

    python tests/equality_snapshot.py OUT_DIR            # writes OUT_DIR/<run>.json, one per run
    python tests/equality_snapshot.py --compare A B      # exit 1 unless every snapshot in A equals B's

Runs (each in its own process, one CPU thread):
- cli:       the embedded default through `dash-fast train`, tiny.* shrunk, 3 steps, a checkpoint at 2 and 3
- cli_overlap: the same with overlap=True (rollouts sampled ahead, the learner's between-micro-batch hook)
- trl:       GRPOTrainer + GRPOConfig on a save_pretrained tiny model: two reward functions with
             normalize_then_sum, shuffle_dataset=False, mask_truncated_completions, minibatches x iterations,
             an eval set evaluated every 2 steps, every callback event recorded
- trl_variant: GRPOTrainer with TRL's cispo loss + adaptive entropy bonus, beta > 0 + sync_ref_model
- trl_stream: GRPOTrainer on a streamed (IterableDataset) train set
- ddp:       2 ranks under torchrun (gloo), the embedded default, 2 steps
- fsdp2:     2 ranks under torchrun, parallel=fsdp2 (its zero-loss padding micro-batches), 2 steps

Each snapshot holds the step records (metrics.jsonl / TRL's log_history), a sha256 of every weight tensor after
training, and of every tensor in every checkpoint's safetensors files plus its resume_state.json tree.
Dropped, since they legitimately differ run to run (on unchanged code too): wall-clock fields (any key with
`time`, `runtime`, `per_s` (tokens_per_s, *_per_second) or `wall` in its name), the temporary `output_dir`, and
the Python / NumPy global RNG states in resume_state.json (unseeded by the trainer). Everything else must be
equal bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

TIME_KEY = re.compile(r"time|runtime|per_s|wall")
TINY = ["tiny.hidden_size=32", "tiny.num_layers=1", "tiny.num_heads=2", "tiny.intermediate_size=64",
        "tiny.n_train=40", "tiny.n_test=8"]
CLI = ["sft.steps=60", "tiny.n_terms=2", "micro_batch_tokens=48", "prompts_per_step=4", "max_completion_tokens=8", "eval_examples=8", "eval_every=2",
       "save_steps=2", "cpu_threads=1", "learning_rate=1e-3", *TINY]


def scrub(obj):
    """`obj` without what legitimately differs run to run (recursively): wall-clock fields, the run's
    temporary output_dir, and the saved Python / NumPy global RNG states (the trainer seeds torch only, so
    those two are whatever the process drew at start-up); floats as their exact repr."""
    if isinstance(obj, dict):
        if "torch" in obj and set(obj) <= {"torch", "python", "numpy"}:  # a checkpoint's `rng` entry
            return {"torch": scrub(obj["torch"])}
        return {k: scrub(v) for k, v in obj.items() if not TIME_KEY.search(str(k)) and k != "output_dir"}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)
    return obj


def tensor_hash(t) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:24] \
        if t.numel() else f"{t.dtype}{list(t.shape)}:empty"


def checkpoint_hashes(out: str) -> dict:
    """Every tensor of every safetensors file under out/checkpoints, and each resume_state.json's tree."""
    from safetensors.torch import load_file

    root, result = os.path.join(out, "checkpoints"), {}
    if not os.path.isdir(root):
        return result
    for step in sorted(os.listdir(root)):
        folder = os.path.join(root, step)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".safetensors"):
                result[f"{step}/{name}"] = {k: tensor_hash(v) for k, v in sorted(load_file(path).items())}
            elif name == "resume_state.json":
                with open(path) as f:
                    result[f"{step}/{name}"] = scrub(json.load(f))
    return result


def final_weights(out: str) -> dict:
    from safetensors.torch import load_file

    root = os.path.join(out, "checkpoints")
    last = max(os.listdir(root), key=lambda s: int(s.split("-")[1]))
    return {k: tensor_hash(v) for k, v in sorted(load_file(os.path.join(root, last, "model.safetensors")).items())}


def metrics_records(out: str) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [scrub(json.loads(line)) for line in f]


# ---------------------------------------------------------------------------------------------- runs
def run_cli(out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dash_fast.cli", "train", "--output-dir", out, "--max-steps", "3", *CLI, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"records": metrics_records(out), "weights": final_weights(out), "checkpoints": checkpoint_hashes(out)}


def run_torchrun(out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dash_fast.cli", "train", "--output-dir", out, "--max-steps", "2", "generation_batch_size=16",
           *CLI, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return {"records": metrics_records(out), "weights": final_weights(out), "checkpoints": checkpoint_hashes(out)}


def _tiny_model_dir(out: str) -> tuple[str, list[dict]]:
    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

    tiny = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2, max_operand=9,
                      n_train=40, n_test=8)
    tok = build_tokenizer()
    path = os.path.join(out, "model")
    build_model(tok, tiny, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    rows, test = make_task(tiny, seed=0)
    return path, [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows + test]


def reward_len(completions, **kwargs):
    return [-abs(5 - len(c)) for c in completions]


def reward_digits(completions, answer, **kwargs):
    return [float(sum(ch.isdigit() for ch in c) % 3) if len(a) % 2 else None for c, a in zip(completions, answer)]


def run_trl(out: str, variant: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from dash_fast import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    model_dir, rows = _tiny_model_dir(out)
    events: list = []

    class Recorder(TrainerCallback):
        def __getattribute__(self, name):
            if name.startswith("on_"):
                return lambda args, state, control, **kw: events.append((name, state.global_step))
            return super().__getattribute__(name)

    common = dict(output_dir=os.path.join(out, "run"), per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=8, learning_rate=1e-3, max_steps=4, logging_steps=2, save_steps=2, seed=0,
                  use_cpu=True, report_to="none", disable_tqdm=True, cpu_threads=1)
    eval_rows = None
    if variant == "trl":
        args = GRPOConfig(**{**common, "max_steps": 12}, steps_per_generation=2, num_iterations=2,
                          multi_objective_aggregation="normalize_then_sum", shuffle_dataset=False,
                          mask_truncated_completions=True, eval_strategy="steps", eval_steps=2,
                          per_device_eval_batch_size=8, loss_type="grpo", reward_weights=[1.0, 0.5])
        funcs, train, eval_rows = [reward_len, reward_digits], rows[:40], rows[40:]
    elif variant == "trl_variant":
        args = GRPOConfig(**common, loss_type="cispo", use_adaptive_entropy=True, entropy_coef=0.01,
                          entropy_target=5.0, beta=0.04, sync_ref_model=True, ref_model_sync_steps=2,
                          num_iterations=2)
        funcs, train = reward_len, rows[:40]
    else:
        from datasets import Dataset

        args = GRPOConfig(**common)
        funcs, train = reward_len, Dataset.from_list(rows[:40]).to_iterable_dataset()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=funcs, args=args, train_dataset=train,
                          eval_dataset=eval_rows, callbacks=[Recorder()])
    result = trainer.train()
    return {"records": scrub(trainer.step_records), "log_history": scrub(trainer.state.log_history),
            "train_output": scrub(result.metrics), "events": events,
            "weights": {k: tensor_hash(v) for k, v in sorted(trainer.model.state_dict().items())},
            "checkpoints": checkpoint_hashes(os.path.join(out, "run"))}


RUNS = {
    "cli": lambda out: run_cli(out, []),
    "cli_overlap": lambda out: run_cli(out, ["overlap=true"]),
    "trl": lambda out: run_trl(out, "trl"),
    "trl_variant": lambda out: run_trl(out, "trl_variant"),
    "trl_stream": lambda out: run_trl(out, "trl_stream"),
    "ddp": lambda out: run_torchrun(out, []),
    "fsdp2": lambda out: run_torchrun(out, ["parallel=fsdp2", "beta=0"]),
}


def compare(a: str, b: str) -> int:
    """Every snapshot of `a` against `b`'s, key by key (wall-clock fields dropped); 1 on any difference."""
    bad = 0
    for name in sorted(n for n in os.listdir(a) if n.endswith(".json")):
        if not os.path.exists(os.path.join(b, name)):
            print(f"{name[:-5]:12s} MISSING in {b}")
            bad += 1
            continue
        with open(os.path.join(a, name)) as f:
            left = scrub(json.load(f))
        with open(os.path.join(b, name)) as f:
            right = scrub(json.load(f))
        for key in sorted(set(left) | set(right)):
            same = left.get(key) == right.get(key)
            bad += not same
            print(f"{name[:-5]:12s} {key:12s} {'identical' if same else 'DIFFERENT'}")
    return 1 if bad else 0


def main() -> int:
    if sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3])
    if sys.argv[1] == "--one":  # a single run, in this process
        name, dest, work = sys.argv[2:5]
        with open(dest, "w") as f:
            json.dump(RUNS[name](work), f, indent=1, sort_keys=True)
        return 0
    import tempfile

    dest = sys.argv[1]
    os.makedirs(dest, exist_ok=True)
    names = sys.argv[2:] or list(RUNS)
    for name in names:
        with tempfile.TemporaryDirectory() as work:
            subprocess.run([sys.executable, __file__, "--one", name, os.path.join(dest, f"{name}.json"), work],
                           check=True)
        print(f"{name}: written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
