"""dash_kernels through the trainer: a train step with loss_impl=fused (and liger) leaves the same
parameters as one with loss_impl=naive, on the tiny embedded model with tied embeddings and with an
untied lm_head carrying a bias."""

from __future__ import annotations

import pytest
import torch

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

# the trainer's scheduler keeps stepping the AdamW it was built with, which the tests replace by SGD
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of")

SGD_LR = 3.0
TINY = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2,
                  max_operand=19, n_train=40, n_test=8)


def length_reward(prompts, completions, **columns):
    """Length for the first half of the rows (varies within a group even for a random model), a constant
    for the rest: their advantages are 0 and the row filter drops them."""
    half = len(completions) // 2
    return [float(len(c)) if i < half else 1.0 for i, c in enumerate(completions)]


def make_trainer(tmp_path, loss_impl: str, dtype: torch.dtype, lm_bias: bool, optimizer_cls_and_kwargs=None,
                 **overrides) -> DashTrainer:
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0)
    if lm_bias:  # untie: a separate lm_head with a bias, as some checkpoints have
        emb = model.get_input_embeddings().weight
        head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=True)
        with torch.no_grad():
            head.weight.copy_(emb)
            head.bias.copy_(0.3 * torch.randn(emb.shape[0], generator=torch.Generator().manual_seed(5)))
        model.config.tie_word_embeddings = False
        model.set_output_embeddings(head)
    model = model.to(dtype)
    train, test = make_task(TINY, seed=0)
    # K = 2 updates per rollout: an old log-prob pass, then an off-policy step where a large (SGD) lr puts
    # some ratios outside the clip range; beta > 0: a reference pass and the KL term.
    args = dict(output_dir=str(tmp_path / loss_impl), prompts_per_step=4, group_size=4, max_completion_tokens=8,
                max_prompt_tokens=16, loss_impl=loss_impl, report_to=[], disable_tqdm=True, max_grad_norm=None,
                learning_rate=1.0, epsilon=0.1, beta=0.04, updates_per_rollout=2, filter_tau=0.1,
                micro_batch_tokens=48, temperature=0.9)
    args.update(overrides)
    return DashTrainer(model, length_reward, args=DashConfig(**args), train_dataset=train, eval_dataset=test,
                       processing_class=tok, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)


def step_params(tmp_path, loss_impl, dtype, lm_bias, **overrides):
    # SGD instead of AdamW: Adam's first steps are ~lr * sign(grad), so a parameter whose gradient is
    # a near-cancellation (|g| ~ eps) would turn rounding noise into an O(lr) difference.
    trainer = make_trainer(tmp_path, loss_impl, dtype, lm_bias, optimizer_cls_and_kwargs=(torch.optim.SGD, {}),
                           **overrides)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    tied = trainer.model.get_output_embeddings().weight is trainer.model.get_input_embeddings().weight
    assert tied != lm_bias
    assert (trainer.model.get_output_embeddings().bias is not None) == lm_bias
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    record = trainer.train_step(1)
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    if lm_bias:
        assert not torch.equal(before["lm_head.bias"], after["lm_head.bias"])
    return record, after


@pytest.mark.parametrize("lm_bias", [False, True], ids=["tied", "lm_head_bias"])
def test_fused_step_equals_naive_step(tmp_path, lm_bias):
    rec_n, p_n = step_params(tmp_path, "naive", torch.float64, lm_bias)
    rec_f, p_f = step_params(tmp_path, "fused", torch.float64, lm_bias)
    assert 0 < rec_n["kept_fraction"] < 1  # the row filter is exercised
    assert rec_n["clip_fraction"] > 0  # the second (off-policy) update clips some tokens
    # fp32-level tolerance; observed: the steps agree to 1e-16 in float64 (the naive path is
    # dash_kernels.pg_loss_ref, which computes in the model's float64).
    assert p_n.keys() == p_f.keys()
    for n in p_n:
        torch.testing.assert_close(p_f[n], p_n[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    for k in ("loss", "clip_fraction", "kl", "entropy", "grad_norm"):
        assert rec_f[k] == pytest.approx(rec_n[k], rel=1e-5, abs=1e-8), k


def test_liger_step_equals_naive_step(tmp_path):
    pytest.importorskip("liger_kernel.chunked_loss")
    # seq-mean-token-mean with beta > 0: unequal token weights, the adapter's grouped path
    kw = dict(lm_bias=True, loss_agg="seq-mean-token-mean")
    rec_n, p_n = step_params(tmp_path, "naive", torch.float32, **kw)
    assert rec_n["clip_fraction"] > 0
    rec_l, p_l = step_params(tmp_path, "liger", torch.float32, **kw)
    for n in p_n:
        torch.testing.assert_close(p_l[n], p_n[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert rec_l["loss"] == pytest.approx(rec_n["loss"], rel=1e-4, abs=1e-6)
