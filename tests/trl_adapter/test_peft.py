"""LoRA / PEFT in the TRL-style trainer: the reference policy in the policy's own weights (base with adapters
disabled, or TRL's frozen "ref" adapter for a PeftModel passed in), exact resume of a LoRA run, gradient
checkpointing. Tiny local models only."""

import copy

import pytest
import torch
from helpers import make_grpo_trainer as make_trainer  # every call here passes its model

from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer

peft = pytest.importorskip("peft")

TINY = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def lora(**kw):
    # init_lora_weights=False: random B, so the adapters change the policy from the first step (with PEFT's
    # default B = 0 the adapted and the base model agree, and a reference test could not tell them apart)
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)


def held_modules(obj, depth=3, seen=None):
    """Every nn.Module reachable from `obj`'s attributes (a few levels deep): what the trainer keeps alive."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = []
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, type)) else []
    for v in values:
        found += held_modules(v, depth - 1, seen)
    return found


def parameter_bytes(modules) -> int:
    """Bytes of the distinct parameter storages of `modules`."""
    storages = {}
    for m in modules:
        for p in m.parameters():
            s = p.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def hf_logprobs(model, rollout, rows):
    """Token log-probs of the completions under `model`'s own HF forward (logits -> log_softmax)."""
    out = []
    for r in rows:
        n = int(rollout.completion_lengths[r])
        ids = torch.tensor([rollout.prompt_ids[r] + rollout.completion_ids[r, :n].tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        p = len(rollout.prompt_ids[r])
        logp = torch.log_softmax(logits[p - 1 : p - 1 + n], -1)
        out.append(logp.gather(-1, rollout.completion_ids[r, :n, None]).squeeze(-1))
    return out


def rollout_of(trainer):
    prompts = trainer.train_data.prompt_ids[:2]
    return trainer.generate([list(p) for p in prompts for _ in range(2)], step=1)


@pytest.mark.parametrize("use_bias_correction_kl", [False, True])
def test_lora_reference_is_the_base_with_adapters_disabled_and_no_copy(tmp_path, use_bias_correction_kl):
    tok = build_tokenizer()
    model = build_model(tok, TINY)
    base = copy.deepcopy(model).eval()  # the test's own copy, to compare against
    trainer = make_trainer(tmp_path, model, peft_config=lora(),
                           args=dict(beta=0.1, use_bias_correction_kl=use_bias_correction_kl))
    assert trainer.ref_model is None and trainer.learner.ref_model is None  # as TRL: no reference model
    assert "ref" not in trainer.model.peft_config  # a new adapter: the reference is the bare base
    # no second copy of the base weights anywhere the trainer holds (a frozen copy would double this)
    assert parameter_bytes(held_modules(trainer)) == parameter_bytes([trainer.model])
    rollout = rollout_of(trainer)
    rows = list(range(len(rollout)))
    was_training = trainer.model.training
    ref = trainer.learner.reference_logprobs(rollout, rows)
    assert trainer.model.training == was_training
    policy = trainer.learner.logprob_pass(trainer.model, rollout, rows, "policy")
    for r, want in zip(rows, hf_logprobs(base, rollout, rows), strict=True):
        n = len(want)
        torch.testing.assert_close(ref[r, :n], want, rtol=0, atol=1e-5)
        assert (policy[r, :n] - want).abs().max() > 1e-3  # the adapters do change the policy
    # the adapters are back on and trainable afterwards
    torch.testing.assert_close(trainer.learner.logprob_pass(trainer.model, rollout, rows, "policy"), policy)
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.step_records[0]["kl"] > 0  # policy (base + random adapters) vs base
    for n, p in trainer.model.named_parameters():
        assert torch.equal(before[n], p) != ("lora_" in n), n


def test_peft_model_passed_in_gets_trls_frozen_ref_adapter(tmp_path):
    """TRL: a PeftModel (its adapter possibly trained already) with beta != 0 gets a frozen copy of its adapter,
    "ref": the reference is the initial policy, base + that adapter, not the bare base."""
    tok = build_tokenizer()
    model = peft.get_peft_model(build_model(tok, TINY), lora())
    start = copy.deepcopy(model).eval()
    trainer = make_trainer(tmp_path, model, args=dict(beta=0.1, use_bias_correction_kl=False, learning_rate=5e-2))
    assert "ref" in trainer.model.peft_config and trainer.ref_model is None
    ref_params = [p for n, p in trainer.model.named_parameters() if ".ref." in n]
    assert ref_params and not any(p.requires_grad for p in ref_params)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in ref_params)
    held = parameter_bytes(held_modules(trainer))
    assert held == parameter_bytes([trainer.model])  # the base is held once; "ref" is an adapter copy only
    rollout = rollout_of(trainer)
    rows = list(range(len(rollout)))
    trainer.train()
    assert trainer.model.active_adapter == "default"
    ref = trainer.learner.reference_logprobs(rollout, rows)
    policy = trainer.learner.logprob_pass(trainer.model, rollout, rows, "policy")
    for r, want in zip(rows, hf_logprobs(start, rollout, rows), strict=True):  # the initial policy
        n = len(want)
        torch.testing.assert_close(ref[r, :n], want, rtol=0, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-4  # the trained adapter moved away from it


def test_sync_ref_model_with_peft_is_refused(tmp_path):
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="dash-fast does not support sync_ref_model=True"):
        make_trainer(tmp_path, build_model(tok, TINY), peft_config=lora(),
                     args=dict(beta=0.1, sync_ref_model=True))


class StopAt:
    """A transformers callback that stops training after step `n` (a checkpoint is saved there)."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.n:
            control.should_training_stop = True


@pytest.mark.parametrize("how", ["peft_config", "peft_model"])
def test_lora_resume_is_exact(tmp_path, how):
    """4 steps straight == 2 steps, stop, resume 2 more: every parameter bit-identical (CPU), with beta > 0 (the
    reference pass) and LoRA dropout (the RNG streams). The checkpoint holds the adapters in PEFT format and
    the optimizer state of the adapter parameters only."""
    from safetensors.torch import load_file

    from dash_fast.checkpoint import load_trainer_state

    tok = build_tokenizer()
    config = dict(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    args = dict(max_steps=4, beta=0.1, learning_rate=5e-2)

    def build(seed, **extra):
        torch.manual_seed(seed)  # the adapters' init draws from the global RNG
        model = build_model(tok, TINY)  # the same base weights each time (build_model seeds itself)
        if how == "peft_model":
            model = peft.get_peft_model(model, peft.LoraConfig(**config))
            return dict(model=model, **extra)
        return dict(model=model, peft_config=peft.LoraConfig(**config), **extra)

    straight = make_trainer(tmp_path / "a", args=args, **build(0))
    straight.train()
    cut = make_trainer(tmp_path / "b", args={**args, "save_steps": 1}, callbacks=[StopAt(2)], **build(0))
    cut.train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    saved = load_file(ckpt / "adapter_model.safetensors")
    trainable = {n: p for n, p in cut.model.named_parameters() if p.requires_grad}
    assert saved and all("lora_" in k for k in saved) and len(saved) == len(trainable)
    opt = load_trainer_state(str(ckpt))["optimizer"]
    assert len(opt["state"]) == len(trainable)  # AdamW moments of the adapter parameters only
    assert sum(s["exp_avg"].numel() for s in opt["state"].values()) == sum(p.numel() for p in trainable.values())
    # another adapter init (peft_config): only the checkpoint's adapters can make it match the straight run
    resumed = make_trainer(tmp_path / "b", args={**args, "save_steps": 1}, **build(1 if how == "peft_config" else 0))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert [r["loss"] for r in resumed.step_records] == [r["loss"] for r in straight.step_records]
    assert any("lora_" in n and not torch.equal(p, dict(cut.model.named_parameters())[n])
               for n, p in straight.model.named_parameters())  # steps 3-4 did move the adapters


def test_resuming_a_lora_run_from_a_full_model_checkpoint_is_an_error(tmp_path):
    tok = build_tokenizer()
    full = make_trainer(tmp_path / "full", build_model(tok, TINY), args=dict(max_steps=1))
    full.train()
    trainer = make_trainer(tmp_path / "lora", build_model(tok, TINY), peft_config=lora())
    with pytest.raises(ValueError, match="holds no PEFT adapter"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))


@pytest.mark.parametrize("with_lora", [True, False])
def test_gradient_checkpointing_is_honoured(tmp_path, with_lora):
    """gradient_checkpointing=True recomputes each decoder layer in backward (a second forward with grad), and
    trains to the same weights as without it; with LoRA (the model's own forward) and with a full model (whose
    shared-prompt forward does not checkpoint, so it then trains on the model's own forward)."""
    tok = build_tokenizer()

    def run(checkpointing):
        extra = dict(peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) if with_lora else {}
        trainer = make_trainer(tmp_path / str(checkpointing), build_model(tok, TINY),
                               args=dict(gradient_checkpointing=checkpointing, max_steps=2), **extra)
        decoder = trainer.model.get_base_model().model if with_lora else trainer.model.model
        calls = []
        mlp = decoder.layers[0].mlp
        forward = mlp.forward  # wrapped, not hooked: torch's checkpoint recompute does not run module hooks

        def counted(*args, **kwargs):
            calls.append(torch.is_grad_enabled())
            return forward(*args, **kwargs)

        mlp.forward = counted
        trainer.train()
        return trainer, sum(calls)

    plain, grad_forwards = run(False)
    checkpointed, grad_forwards_checkpointed = run(True)
    assert checkpointed.learner.forward_passes > 0  # the training forwards (no old-log-prob pass here)
    assert grad_forwards_checkpointed == 2 * checkpointed.learner.forward_passes  # each recomputed in backward
    if with_lora:  # the model's own forward either way
        assert grad_forwards == plain.learner.forward_passes
    # LoRA: one forward, so float32 agreement; full model: the shared-prompt forward against HF's, which round
    # differently in float32: after two AdamW steps at lr 1e-2 they agree to 0.5% of one step
    atol = 1e-5 if with_lora else 5e-5
    for p, q in zip(plain.model.parameters(), checkpointed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), build_model(tok, TINY).parameters()))
