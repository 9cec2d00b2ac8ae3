"""dash_fast.algo and the per-token PG loss (dash_kernels.utils.pg_token_loss) against hand-computed values
(docs/design.md section 1)."""

import math

import pytest
import torch
from dash_kernels.utils import pg_token_loss

from dash_fast import algo


def test_group_advantages_group_scaling_by_hand():
    # group 1: rewards 1,0,0,0 -> mean 0.25, unbiased std sqrt(0.25) = 0.5
    # group 2: all equal -> centred 0, std 0 -> advantages exactly 0
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = algo.group_advantages(r, 4, "group")
    d = 0.5 + 1e-4
    expected = torch.tensor([0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d, 0, 0, 0, 0])
    torch.testing.assert_close(a, expected)
    assert (a[4:] == 0).all()


def test_group_advantages_batch_and_none():
    r = torch.tensor([2.0, 0.0, 1.0, 1.0])
    # group means: 1, 1; centred 1,-1,0,0; batch std = std([2,0,1,1]) = sqrt(2/3)
    centred = torch.tensor([1.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(algo.group_advantages(r, 2, "none"), centred)
    torch.testing.assert_close(algo.group_advantages(r, 2, "batch"), centred / (math.sqrt(2 / 3) + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards"):
        algo.group_advantages(r, 2, "rows")
    with pytest.raises(ValueError, match="groups of 3"):
        algo.group_advantages(r, 3, "group")


def test_filter_rows_tau():
    a = torch.tensor([0.0, 0.05, -0.2, 0.1, 1.5, -0.1000001])
    assert algo.filter_rows(a, None).tolist() == [0, 1, 2, 3, 4, 5]
    assert algo.filter_rows(a, 0.1).tolist() == [2, 4, 5]  # strictly greater than tau
    assert algo.filter_rows(a, 0.0).tolist() == [1, 2, 3, 4, 5]  # tau 0 drops exactly-zero rows


def test_filter_rows_keeps_the_largest_when_nothing_survives():
    a = torch.tensor([0.01, -0.05, 0.02])
    assert algo.filter_rows(a, 0.1).tolist() == [1]


def test_binary_rewards_g4_filter_drops_exactly_agreeing_groups():
    r = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1], dtype=torch.float)
    kept = algo.filter_rows(algo.group_advantages(r, 4), 0.1)
    assert kept.tolist() == [8, 9, 10, 11]


def test_loss_normalisers():
    lengths = torch.tensor([3, 5, 0])
    assert algo.loss_normaliser("token-mean", lengths, 10) == 8
    assert algo.loss_normaliser("dr_grpo", lengths, 10) == 30
    assert algo.loss_normaliser("seq-mean-token-mean", lengths, 10) == 3
    with pytest.raises(ValueError, match="loss_agg"):
        algo.loss_normaliser("sum", lengths, 10)


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)
    tm = algo.token_weights(mask, "token-mean", 4.0)
    torch.testing.assert_close(tm, mask / 4)
    dr = algo.token_weights(mask, "dr_grpo", 2 * 4.0)
    torch.testing.assert_close(dr, mask / 8)
    sm = algo.token_weights(mask, "seq-mean-token-mean", 2.0)
    torch.testing.assert_close(sm, torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]]))
    assert sm.sum().item() == pytest.approx(1.0)  # mean over rows of per-row means of ones


def test_aggregations_give_hand_computed_losses():
    """Per-token losses l = [[1,2,3],[4,_,_]] (rows of length 3 and 1, L_max 4)."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)
    loss_t = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    lengths = mask.sum(1)
    expected = {"token-mean": 10 / 4, "seq-mean-token-mean": (2 + 4) / 2, "dr_grpo": 10 / (2 * 4)}
    for agg, value in expected.items():
        w = algo.token_weights(mask, agg, algo.loss_normaliser(agg, lengths, 4))
        assert (w * loss_t).sum().item() == pytest.approx(value)


def test_pg_token_loss_clip_and_kl_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    old = torch.log(torch.tensor([0.25, 0.25, 1.0, 0.5]))  # ratios 2, 2, 0.5, 1
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    ref = torch.log(torch.tensor([0.25, 0.5, 0.5, 1.0]))
    loss, clip, kl = pg_token_loss(logp, adv, old, ref, 0.2, 0.28, beta=0.5)
    # surrogate: -min(r*A, clip(r)*A): [-1.28, 2, 0.8, -2]
    surr = torch.tensor([-1.28, 2.0, 0.8, -2.0])
    d = ref - logp  # k3: exp(d) - d - 1
    k3 = torch.exp(d) - d - 1
    torch.testing.assert_close(kl, k3)
    torch.testing.assert_close(loss, surr + 0.5 * k3)
    assert clip.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="ref_logp"):
        pg_token_loss(logp, adv, old, None, 0.2, 0.2, beta=0.1)


def test_on_policy_ratio_is_one_with_grad_log_p():
    logp = torch.log(torch.tensor([0.2, 0.7])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    loss, clip, kl = pg_token_loss(logp, adv, None, None, 0.2, 0.2, 0.0)
    torch.testing.assert_close(loss.detach(), -adv)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv)
    assert not clip.any() and kl is None


def test_pack_micro_batches_budget_and_coverage():
    lengths = [5, 30, 7, 12, 3, 30, 9]
    batches = algo.pack_micro_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    assert algo.pack_micro_batches([50], 10) == [[0]]  # an oversize row still goes alone


def test_split_minibatches_partitions_rows():
    parts = algo.split_minibatches(10, 3, torch.Generator().manual_seed(0))
    assert len(parts) == 3
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    for n in range(1, 20):  # always M parts (ceil-sized chunks gave 3 for n = 9, M = 4), sizes within one
        parts = algo.split_minibatches(n, 4, torch.Generator().manual_seed(n))
        sizes = [len(p) for p in parts]
        assert len(parts) == 4 and sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
