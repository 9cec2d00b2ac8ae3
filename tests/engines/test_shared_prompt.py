"""The shared-prompt training forward (dash_fast/models/shared_prompt.py): the same hidden states, loss and
gradients as the model's own forward, with each prompt computed once per micro-batch."""

import pytest
import torch
from helpers import grads_of_update, other_architectures, rollout_for
from helpers import make_float64_trainer as make_trainer

from dash_fast.builder import use_shared_prompt
from dash_fast.data.prompts import pad_right
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer
from dash_fast.models.shared_prompt import pack_shared, shared_prompt_hidden, shared_prompt_unsupported

PAD = 0


def groups(n_prompts=3, G=3, vocab=23, seed=1):
    """G completions of each of n_prompts prompts, all of different lengths (some completions of 1 token)."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prompts = [p for p in (draw(2, 9) for _ in range(n_prompts)) for _ in range(G)]
    completions = [draw(1, 8) for _ in prompts]
    completions[1] = completions[1][:1]
    completions[-1] = []  # an engine may return a row with no tokens
    return prompts, completions


def hf_hidden(model, prompts, completions):
    """The model's own forward over each padded prompt + completion row, at the predicting positions."""
    ids, attn = pad_right([p + c for p, c in zip(prompts, completions)], PAD)
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    return torch.cat([hidden[i, len(p) - 1 : len(p) - 1 + len(c)] for i, (p, c) in enumerate(zip(prompts, completions))])


def exact_norms(model) -> None:
    """Make the model's RMSNorms compute in the input's dtype: Hugging Face rounds a float64 model's norm to
    float32, which would blur a float64 comparison to ~1e-7; the shared forward keeps float64."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = lambda x, m=m: torch.nn.functional.rms_norm(x, (x.shape[-1],), m.weight, m.variance_epsilon)


def models():
    from transformers import MistralConfig, MistralForCausalLM

    tiny = TinyConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    mistral = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, sliding_window=None, pad_token_id=PAD)
    return {"qwen2": build_model(build_tokenizer(), tiny, seed=0), **other_architectures(),
            "mistral_mqa": MistralForCausalLM(mistral)}


@pytest.mark.parametrize("name", ["qwen2", "llama_gqa", "qwen3_qk_norm", "mistral_mqa"])
def test_hidden_states_and_gradients_match_the_models_own_forward(name):
    model = models()[name].double()
    exact_norms(model)
    assert shared_prompt_unsupported(model) is None
    prompts, completions = groups()
    weights = torch.randn(sum(map(len, completions)), model.config.hidden_size, dtype=torch.float64)
    out = {}
    for path in ("shared", "hf"):
        model.zero_grad()
        if path == "shared":
            hidden, targets = shared_prompt_hidden(model, prompts, completions, PAD)
            assert targets.tolist() == [t for c in completions for t in c]
        else:
            hidden = hf_hidden(model, prompts, completions)
        (hidden * weights).sum().backward()
        out[path] = hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out["shared"][0], out["hf"][0], rtol=1e-10, atol=1e-12)
    assert out["shared"][1].keys() == out["hf"][1].keys()
    for n, g in out["hf"][1].items():
        torch.testing.assert_close(out["shared"][1][n], g, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_a_row_does_not_depend_on_the_other_rows_of_its_micro_batch():
    model = models()["qwen2"].double()
    prompts, completions = groups()
    together, _ = shared_prompt_hidden(model, prompts, completions, PAD)
    offset = 0
    for p, c in zip(prompts, completions):
        alone, _ = shared_prompt_hidden(model, [p], [c], PAD)
        torch.testing.assert_close(together[offset : offset + len(c)], alone, rtol=0, atol=1e-12)
        offset += len(c)


@pytest.mark.parametrize("budget", [1, 20, 45, 10**6])
def test_pack_shared_counts_each_prompt_once_and_keeps_the_budget(budget):
    prompts, completions = groups(n_prompts=4, G=4)
    lengths = [len(c) for c in completions]
    batches = pack_shared(prompts, lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    for b in batches:
        distinct = {tuple(prompts[i]) for i in b}
        cost = len(distinct) * max(len(prompts[i]) for i in b) + len(b) * max(lengths[i] for i in b)
        assert cost <= budget or len(b) == 1
    if budget == 10**6:
        assert len(batches) == 1
    # a budget that fits one group only when its prompt counts once
    P, C = max(map(len, prompts[:4])), max(lengths[:4])
    assert len(pack_shared(prompts[:4], lengths[:4], P + 4 * C)) == 1


@pytest.mark.parametrize("budget", [10**6, 30])
def test_training_update_equals_the_hf_forward(tmp_path, budget):
    grads = {}
    for path in ("shared_prompt", "hf"):
        trainer = make_trainer(tmp_path / path, train_forward=path, loss_agg="dr_grpo", micro_batch_tokens=budget,
                               frozen=True)
        exact_norms(trainer.model)
        assert trainer.shared_prompt == (path == "shared_prompt")
        rollout = rollout_for(trainer)
        advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grads[path] = grads_of_update(trainer, rollout, advantages, torch.arange(len(rollout)))
    for n, g in grads["hf"].items():
        torch.testing.assert_close(grads["shared_prompt"][n], g, rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_models_it_cannot_run_use_their_own_forward(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.shared_prompt  # auto, tiny Qwen2, CPU
    # auto stays with the model's own forward on GPU (speed unmeasured)
    assert not use_shared_prompt(trainer.args, torch.device("cuda"), trainer.model, None)[0]
    trainer.model.config.attention_dropout = 0.1
    assert shared_prompt_unsupported(trainer.model) == "attention dropout"
    assert not use_shared_prompt(trainer.args, torch.device("cpu"), trainer.model, None)[0]
    trainer.args.train_forward = "shared_prompt"
    with pytest.raises(ValueError, match="train_forward='shared_prompt' cannot run this model: attention dropout"):
        use_shared_prompt(trainer.args, torch.device("cpu"), trainer.model, None)


@pytest.mark.parametrize("padding_idx", [None, PAD])
@pytest.mark.parametrize("head_in_loss", [True, False])
def test_tied_embedding_rows_go_into_the_heads_gradient(padding_idx, head_in_loss):
    """embed_for_training adds the looked-up rows' gradient into the tied weight's .grad by index: the same
    gradient as the dense one autograd makes for F.embedding (the padding row gets none), with or without the
    head's own gradient already there."""
    from dash_fast.models.decoder import embed
    from dash_fast.models.shared_prompt import embed_for_training

    model = models()["qwen2"].double()
    assert model.get_output_embeddings().weight is model.model.embed_tokens.weight
    model.model.embed_tokens.padding_idx = padding_idx
    ids = torch.tensor([PAD, 5, 7, 5, PAD, 9])
    mix = torch.randn(len(ids), model.config.hidden_size, dtype=torch.float64)
    head_in = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    grads = []
    for lookup in (embed_for_training, lambda m, i: embed(m.model, i)):
        model.zero_grad(set_to_none=True)
        loss = (lookup(model, ids) * mix).sum()
        if head_in_loss:
            loss = loss + (head_in @ model.get_output_embeddings().weight.t()).square().sum()
        loss.backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    if padding_idx is not None and not head_in_loss:
        assert grads[0][PAD].abs().sum() == 0
