"""bf16 runs train fp32 master weights with bf16 compute (mixed_precision.py): at lr 3e-6 they
move the weights as an fp32 run does, while bf16 weights trained in place lose almost every update; the
sampler reads a bf16 copy kept equal to the rounded masters; checkpoints and exact resume carry the masters."""

import json
import os

import pytest
import torch
from helpers import TINY_TASK as TINY
from helpers import length_reward
from safetensors.torch import load_file

from dash_fast import DashConfig, DashTrainer, GRPOConfig, GRPOTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer, make_task
from dash_fast.engines.base import SamplingParams
from dash_fast.losses import LOSSES, get_loss
from dash_fast.models.mixed_precision import MixedPrecision, compute_copy
from dash_fast.trainer import Extensions


class AutocastAtEmbedding(torch.overrides.TorchFunctionMode):
    """Records whether autocast is on whenever a training forward (gradient on) embeds tokens: the decoder's
    first op, in the model's own forward and in the shared-prompt one alike (the sampler's run without grad)."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.embedding and torch.is_grad_enabled():
            self.seen.append(("decoder autocast", torch.is_autocast_enabled("cpu")))
        return func(*args, **(kwargs or {}))


def make_trainer(out, model_dtype=torch.float32, callbacks=None, loss=None, **overrides) -> DashTrainer:
    tok = build_tokenizer()
    train, _ = make_task(TINY, seed=0)
    args = dict(output_dir=str(out), prompts_per_step=4, group_size=4, max_completion_tokens=8,
                max_prompt_tokens=16, report_to=[], disable_tqdm=True, learning_rate=3e-6, filter_tau=None,
                max_steps=4, seed=0)
    args.update(overrides)
    return DashTrainer(build_model(tok, TINY, seed=0).to(model_dtype), length_reward, args=DashConfig(**args),
                       train_dataset=train, processing_class=tok, callbacks=callbacks, extensions=Extensions(loss=loss))


def weight_change(trainer: DashTrainer) -> tuple[float, float]:
    """(fraction of weights moved, norm of the change) over `trainer.train()`, in fp32."""
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = [p.detach().float() - before[n] for n, p in trainer.model.named_parameters()]
    moved = sum(int((d != 0).sum()) for d in delta) / sum(d.numel() for d in delta)
    return moved, float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta)))


@pytest.mark.parametrize("train_forward", ["shared_prompt", "hf"])
def test_bf16_at_lr_3e6_moves_the_weights_like_fp32(tmp_path, train_forward):
    _, fp32_norm = weight_change(make_trainer(tmp_path / "fp32", train_forward=train_forward))
    bf16 = make_trainer(tmp_path / "bf16", torch.bfloat16, dtype="bfloat16", train_forward=train_forward)
    moved, norm = weight_change(bf16)
    assert moved > 0.9 and 0.5 < norm / fp32_norm < 2.0, (moved, norm / fp32_norm)
    # the control: bf16 weights trained in place round nearly every 3e-6 update away
    moved, norm = weight_change(make_trainer(tmp_path / "in_place", torch.bfloat16, dtype="bfloat16",
                                             master_weights=False, train_forward=train_forward))
    assert moved < 0.5 and norm / fp32_norm < 0.5, (moved, norm / fp32_norm)


def test_masters_are_fp32_and_the_sampler_reads_their_bf16_copy(tmp_path, monkeypatch):
    seen, loss_fn = [], get_loss("fused")

    def loss_spy(inputs, *rest):  # a loss in the registry: what the loss kernels are handed
        seen.append(("loss inputs", inputs.hidden.dtype, inputs.weight.dtype))
        return loss_fn(inputs, *rest)

    monkeypatch.setitem(LOSSES, "test_loss_spy", loss_spy)
    # a bf16 module: its run gets masters too
    trainer = make_trainer(tmp_path, torch.bfloat16, max_steps=2, loss="test_loss_spy")
    sampler = trainer.precision.sampler_model
    assert trainer.engine.model is sampler and sampler is not trainer.model
    with AutocastAtEmbedding(seen):
        trainer.train()
    assert set(seen) == {("decoder autocast", True), ("loss inputs", torch.bfloat16, torch.float32)}, set(seen)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values() if v.dim())
    for (name, master), copy in zip(trainer.model.named_parameters(), sampler.parameters(), strict=True):
        assert copy.dtype == torch.bfloat16 and not copy.requires_grad
        assert torch.equal(copy, master.to(torch.bfloat16)), f"{name}: the sampler's copy is stale"
    weights = load_file(os.path.join(tmp_path, "checkpoints", "step-2", "model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())


def test_the_sampler_copy_is_freed_during_each_update_and_the_run_is_unchanged(tmp_path, monkeypatch):
    """On CPU in-process (no overlap) the bf16 copy holds no memory from the update's start to the refresh after
    the optimizer step, and is the masters' rounding again after it; the gradients are gone by then (a step's
    are used). The run (weights, sampled completions) is bit for bit the one that keeps the copy."""
    trainer = make_trainer(tmp_path / "released", dtype="bfloat16", max_steps=3)
    copy = list(trainer.precision.sampler_model.parameters())
    held = sum(p.untyped_storage().nbytes() for p in copy)
    during, grads_at_step = [], []
    trainer.learner.hooks.before_micro_batch.append(lambda: during.append(sum(p.untyped_storage().nbytes() for p in copy)))
    trainer.learner.hooks.after_optimizer_step.append(
        lambda: grads_at_step.append(all(p.grad is not None for p in trainer.model.parameters())))
    trainer.train()
    assert held > 0 and during and set(during) == {0}
    assert grads_at_step == [True] * 3 and all(p.grad is None for p in trainer.model.parameters())
    assert sum(p.untyped_storage().nbytes() for p in copy) == held
    for master, c in zip(trainer.model.parameters(), copy, strict=True):
        assert torch.equal(c, master.to(torch.bfloat16))
    monkeypatch.setattr(MixedPrecision, "release", lambda self: None)
    kept = make_trainer(tmp_path / "kept", dtype="bfloat16", max_steps=3)
    kept.train()
    for a, b in zip(trainer.model.parameters(), kept.model.parameters(), strict=True):
        assert torch.equal(a, b)
    records = [[{k: v for k, v in json.loads(line).items() if "time" not in k and k != "tokens_per_s"}
                for line in open(tmp_path / name / "metrics.jsonl")] for name in ("released", "kept")]
    assert len(records[0]) == 3 and records[0] == records[1]  # rewards, lengths, losses, sampler log-probs


def test_an_update_that_fails_leaves_the_sampler_copy_whole(tmp_path, monkeypatch):
    """An error inside the update (here the loss of step 2) leaves the copy allocated and equal to the masters'
    rounding, so the engine can still generate (a freed copy would be read out of bounds)."""
    loss_fn = get_loss("fused")

    def failing(*args):
        if trainer.state.global_step + 1 == 2:
            raise RuntimeError("loss failed")
        return loss_fn(*args)

    monkeypatch.setitem(LOSSES, "test_failing", failing)
    trainer = make_trainer(tmp_path, dtype="bfloat16", max_steps=3, loss="test_failing")
    with pytest.raises(RuntimeError, match="loss failed"):
        trainer.train()
    assert not trainer.precision.released
    for master, copy in zip(trainer.model.parameters(), trainer.precision.sampler_model.parameters(), strict=True):
        assert copy.untyped_storage().nbytes() > 0 and torch.equal(copy, master.to(torch.bfloat16))
    out = trainer.engine.generate([[3, 4, 5]], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert out.completion_ids.shape[0] == 1


def test_the_copy_is_kept_where_something_reads_it_during_the_update():
    """release() frees nothing unless asked for at construction (overlap, a sampler process, CUDA graphs)."""
    model = build_model(build_tokenizer(), TINY)
    precision = MixedPrecision(model, torch.device("cpu"), torch.bfloat16)
    precision.release()
    assert not precision.released and all(p.untyped_storage().nbytes() > 0
                                           for p in precision.sampler_model.parameters())


def test_compute_copy_keeps_ties_and_fp32_buffers():
    model = build_model(build_tokenizer(), TINY)
    copy = compute_copy(model, torch.bfloat16)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # tied head: one tensor, refreshed once
    assert copy.model.rotary_emb.inv_freq.dtype == torch.float32  # as a model loaded in bf16 has it
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters are untouched


class StopAt:
    """Stops training after step `step` (the run checkpoints there), as a signal would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


class CopyMatchesMasters:
    """At train begin (after a resume restored the masters) the sampler's copy must be their rounding."""

    def __init__(self) -> None:
        self.trainer, self.checked = None, False

    def on_train_begin(self, args, state, control, **kwargs):
        for master, copy in zip(self.trainer.model.parameters(), self.trainer.precision.sampler_model.parameters()):
            assert torch.equal(copy, master.to(torch.bfloat16)), "the sampler's copy is stale after resume"
        self.checked = True


def test_bf16_resume_is_exact(tmp_path):
    full = make_trainer(tmp_path / "full", dtype="bfloat16")
    full.train()
    make_trainer(tmp_path / "cut", dtype="bfloat16", callbacks=[StopAt(2)]).train()
    check = CopyMatchesMasters()
    resumed = check.trainer = make_trainer(tmp_path / "cut", dtype="bfloat16", resume="auto", callbacks=[check])
    assert resumed.train()["steps"] == 4 and check.checked
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    for a, b in zip(full.precision.sampler_model.parameters(), resumed.precision.sampler_model.parameters()):
        assert torch.equal(a, b)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def trl_bf16_trainer(tmp_path, **kwargs) -> GRPOTrainer:
    """A TRL script's GRPOTrainer with bf16=True at lr 3e-6, the tiny model saved to and passed by path."""
    tok = build_tokenizer()
    build_model(tok, TINY).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    train, _ = make_task(TINY, seed=0)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), bf16=True, use_cpu=True, learning_rate=3e-6, max_steps=2,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=8, report_to=[],
                      disable_tqdm=True, filter_tau=None)
    return GRPOTrainer(str(tmp_path / "model"), length_reward, args=args, train_dataset=train, **kwargs)


def test_trl_bf16_loads_fp32_masters_from_a_path(tmp_path):
    """GRPOConfig(bf16=True) with the model passed by path: fp32 masters (TRL's autocast trains an fp32
    checkpoint in fp32 too), a bf16 sampler copy, and updates at lr 3e-6 that land."""
    trainer = trl_bf16_trainer(tmp_path)
    saved = load_file(tmp_path / "model" / "model.safetensors")
    for name, p in trainer.model.named_parameters():  # loaded in fp32, not rounded through bf16
        assert p.dtype == torch.float32 and torch.equal(p, saved[name]), name
    assert next(trainer.precision.sampler_model.parameters()).dtype == torch.bfloat16
    run, items = trainer.memory_plan.run, trainer.memory_plan.items  # planned as it trains: bf16 over masters
    params = sum(p.numel() for p in trainer.model.parameters())
    assert run.dtype == "bfloat16" and run.master_weights and items["masters"] == 2 * items["weights"] == 4 * params
    moved, _ = weight_change(trainer)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert moved > 0.9, moved


def test_trl_bf16_with_lora_trains_fp32_adapters_over_a_bf16_base(tmp_path):
    """PEFT: only the adapters are masters (fp32); the frozen base stays bf16 and there is no sampler copy."""
    peft = pytest.importorskip("peft")
    trainer = trl_bf16_trainer(tmp_path, peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {(p.requires_grad, p.dtype) for p in trainer.model.parameters()} == {(False, torch.bfloat16),
                                                                               (True, torch.float32)}
    assert trainer.precision.sampler_model is trainer.model
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not move"
