"""Builders and checks shared by several test files: tiny configs and models, prompt sets, trainers built
the same way, and weight / gradient comparisons. Fixtures live in conftest.py (which also puts this folder
on sys.path, so `from helpers import ...` works from any test folder)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task
from dash_fast.runtime.cpus import INITIAL_CPUS

# the smallest model the tests train (the embedded task's defaults)
TINY_MODEL = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
# that model on two-term sums under 20, 40 train and 8 test examples: a trainer step in well under a second
TINY_TASK = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2,
                       max_operand=19, n_train=40, n_test=8)
# TINY_TASK with 16 train and 4 test examples (the sampler / trainer agreement tests)
TINY_FEW = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2,
                      max_operand=19, n_train=16, n_test=4)
# the data-parallel tests' model: sums under 10, 40 train and 8 test examples
TINY_DDP = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2, max_operand=9,
                      n_train=40, n_test=8)
# the engine tests' model: two layers, four heads
TINY_ENGINE = TinyConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
PAD = 0
TWO = set(sorted(INITIAL_CPUS)[:2])  # the CPUs the sampler-process tests split
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, whichever tests/ folder asks
TEST_DATA = REPO_ROOT / "tests" / "data"  # the sample datasets (tests/data/make_samples.py writes them)


def checkout_env(base: dict[str, str] | None = None, **env: str) -> dict[str, str]:
    """The environment of a child Python that imports this checkout: dash_fast, dash_kernels and tests/ (helpers)
    from here, ahead of any installed copy; `base` (default: this process's environment) with `env` on top."""
    paths = os.pathsep.join(str(p) for p in (REPO_ROOT, REPO_ROOT / "kernels", REPO_ROOT / "tests"))
    return {**(os.environ if base is None else base), "PYTHONPATH": paths, **env}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: a rendezvous for ranks spawned by one test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(dtype=torch.float64, seed=0):
    return build_model(build_tokenizer(), TINY_ENGINE, seed=seed).to(dtype)


def prompts(n=12, seed=0, vocab=23):
    """Prompts of different lengths, so left padding and per-row RoPE positions matter."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def other_architectures():
    """A Llama with GQA and attention biases and a Qwen3 with q/k norms, tiny and random."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    torch.manual_seed(0)
    return {"llama_gqa": LlamaForCausalLM(LlamaConfig(**common, attention_bias=True)),
            "qwen3_qk_norm": Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))}


def fake_capture(step):
    """A stand-in for CUDA-graph capture on CPU: 'replay' runs the step again into the captured output."""
    out = step()
    return (lambda: out.copy_(step())), out


def length_reward(completions, **columns):
    """Varies within every group even for a random model, so every step moves the weights."""
    return [float(len(c) % 5) for c in completions]


def completion_length(completions, **columns):
    """Each completion's length: spread within every group of a random model."""
    return [float(len(c)) for c in completions]


def half_constant_reward(prompts, completions, **columns):
    """Varies within groups for an untrained model, so rows are kept on both ranks; constant for about half
    of the prompts, so the filter drops their groups."""
    return [0.0 if sum(map(ord, p)) % 2 else float(len(c) % 4) for p, c in zip(prompts, completions)]


def make_trainer(tmp_path, **overrides) -> DashTrainer:
    """A DashTrainer on TINY_TASK with length_reward: 4 prompts x 4 rows, 8 tokens, 4 steps, naive loss."""
    tok = build_tokenizer()
    model = build_model(tok, TINY_TASK, seed=0)
    train, _ = make_task(TINY_TASK, seed=0)
    args = dict(output_dir=str(tmp_path), prompts_per_step=4, group_size=4, max_completion_tokens=8,
                max_prompt_tokens=16, loss_impl="naive", report_to=[], disable_tqdm=True, learning_rate=1e-2,
                filter_tau=None, max_steps=4, seed=1)
    args.update(overrides)
    return DashTrainer(model, length_reward, args=DashConfig(**args), train_dataset=train, processing_class=tok)


class FrozenSGD(torch.optim.SGD):
    """An optimizer whose step changes nothing: after an update the gradients are there to read, at the same
    weights as before (grads_of_update)."""

    def step(self, closure=None):
        return None


def make_float64_trainer(tmp_path, dtype=torch.float64, reward="exact_answer", frozen: bool = False,
                         tiny: TinyConfig = TINY_TASK, **overrides) -> DashTrainer:
    """A DashTrainer on TINY_TASK in float64 (exact gradient comparisons), no gradient clipping, with eval.
    `frozen`: its optimizer is FrozenSGD (through the trainer's optimizer_cls_and_kwargs), for grads_of_update;
    `tiny`: another model size."""
    tok = build_tokenizer()
    model = build_model(tok, tiny, seed=0).to(dtype)
    train, test = make_task(tiny, seed=0)
    args = dict(output_dir=str(tmp_path), prompts_per_step=4, group_size=4, max_completion_tokens=8,
                max_prompt_tokens=16, loss_impl="naive", report_to=[], disable_tqdm=True,
                max_grad_norm=None, learning_rate=1e-2, filter_tau=None, eval_examples=8)
    args.update(overrides)
    return DashTrainer(model, reward, args=DashConfig(**args), train_dataset=train,
                       eval_dataset=test, processing_class=tok,
                       optimizer_cls_and_kwargs=(FrozenSGD, {}) if frozen else None)


def make_one_step_trainer(tmp_path, dtype=torch.float32, reward=completion_length, rollout_engine=None,
                          **overrides) -> DashTrainer:
    """A DashTrainer on TINY_FEW: 2 prompts x 4 rows, 6 tokens at temperature 0.8, one step, no filter."""
    tok = build_tokenizer()
    model = build_model(tok, TINY_FEW, seed=0).to(dtype)
    train, _ = make_task(TINY_FEW, seed=0)
    args = dict(output_dir=str(tmp_path), prompts_per_step=2, group_size=4, max_completion_tokens=6,
                max_prompt_tokens=16, report_to=[], disable_tqdm=True, filter_tau=None, max_steps=1,
                temperature=0.8)
    args.update(overrides)
    return DashTrainer(model, reward, args=DashConfig(**args), train_dataset=train, processing_class=tok,
                       rollout_engine=rollout_engine)


def make_grpo_trainer(tmp_path, model=None, **kwargs):
    """The TRL-style GRPOTrainer on six `i+1=` prompts with completion_length: 4 rows of 4 tokens, 2 steps;
    `args` (a dict) updates the GRPOConfig, other keywords go to GRPOTrainer."""
    from datasets import Dataset

    from dash_fast import GRPOConfig, GRPOTrainer

    tok = build_tokenizer()
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                max_steps=2, learning_rate=1e-2, report_to="none", disable_tqdm=True, logging_steps=1)
    args.update(kwargs.pop("args", {}))
    data = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(6)])
    return GRPOTrainer(model=model if model is not None else build_model(tok, TINY_MODEL),
                       reward_funcs=completion_length, args=GRPOConfig(**args), train_dataset=data,
                       processing_class=tok, **kwargs)


def shifted_sampler(shift: float):
    """A rollout engine (for DashTrainer's `rollout_engine`) that disagrees with the trainer by `shift` nats on
    every token it returns."""

    def shift_logps(out):
        out.sampling_logps = out.sampling_logps + shift * out.completion_mask
        return out

    return EditedEngine.around(shift_logps)


def rollout_for(trainer: DashTrainer, step: int = 0):
    indices = trainer.sampler.next(trainer.args.prompts_per_step)
    G = trainer.args.group_size
    return trainer.generate([trainer.train_data.prompt_ids[i] for i in indices for _ in range(G)], step)


def keep_grads(trainer: DashTrainer, take=lambda g: g.clone()) -> dict[str, torch.Tensor]:
    """A dict holding `take(grad)` of each parameter at the trainer's latest optimizer step, filled by an
    after_optimizer_step hook: the learner frees the gradients right after the step."""
    grads: dict[str, torch.Tensor] = {}

    def keep() -> None:
        grads.clear()
        grads.update({n: take(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.learner.hooks.after_optimizer_step.append(keep)
    return grads


def grads_of_update(trainer: DashTrainer, rollout, advantages, kept) -> dict[str, torch.Tensor]:
    """Run trainer.update on a trainer built with `frozen=True` and return the accumulated gradients (the
    weights stay as they were, so a second call computes its gradients at the same point)."""
    before = params(trainer.model)
    grads = keep_grads(trainer)
    trainer.update(rollout, advantages, kept)
    trainer.learner.hooks.after_optimizer_step.pop()
    assert same(before, params(trainer.model)), "grads_of_update needs a trainer built with frozen=True"
    return dict(grads)


class EditedEngine:
    """The trainer's own rollout engine with each rollout it samples passed through `edit(rollout) -> rollout`
    first; every other attribute is the engine's. Given to DashTrainer as `rollout_engine=EditedEngine.around(edit)`."""

    def __init__(self, engine, edit) -> None:
        self.engine, self.edit = engine, edit

    @classmethod
    def around(cls, edit):
        from dash_fast.builder import make_engine

        return lambda *args: cls(make_engine(*args), edit)

    def generate(self, prompt_ids, params):
        return self.edit(self.engine.generate(prompt_ids, params))

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def assert_same_grads(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(trainer) -> list[dict]:
    """The trainer's step records without the timings (which differ run to run)."""
    timed = ("time", "tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(timed)} for r in trainer.state.log_history]


class Recorder:
    """Wraps the trainer: weights when each rollout was sampled, at the start of each step, the rollout
    and old log-probs each step trained on, and its prompts."""

    def __init__(self, trainer: DashTrainer) -> None:
        self.sampled_with: list[tuple[int, dict]] = []  # (seed, weights) per rollout sampled
        self.at_begin: dict[int, dict] = {}
        self.used: dict[int, tuple] = {}  # step -> (rollout, old)
        self.prompts: dict[int, list[int]] = {}
        plan, rollout_for = trainer.collector.generation_plan, trainer.collector.rollout_for

        def plan_(prompt_ids, step, row_offset=0):  # once per rollout, in this process (whoever then samples it)
            calls = plan(prompt_ids, step, row_offset)
            self.sampled_with.append((calls[0][1].seed, params(trainer.model)))
            return calls

        def rollout_for_(step, weights_version):
            self.at_begin[step] = params(trainer.model)
            job = rollout_for(step, weights_version)
            self.prompts[step] = list(job.indices)
            return job

        def step_begin(batch):  # the learner's hook: the rollout and old log-probs an optimizer step trains on
            self.used[trainer.state.global_step + 1] = (batch.rollout, batch.old)

        trainer.learner.hooks.step_begin.append(step_begin)
        trainer.collector.generation_plan, trainer.collector.rollout_for = plan_, rollout_for_
