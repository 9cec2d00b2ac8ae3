"""TRL's entropy / off-policy masks, checked against hand-computed cases."""

import torch

from dash_fast.trl.masks import high_entropy_mask, off_policy_mask


def test_high_entropy_mask_keeps_the_top_quantile_of_real_tokens():
    ent = torch.tensor([[0.1, 0.5, 0.9, 5.0], [0.2, 0.4, 0.6, 0.8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # the 5.0 is padding: it must not set the threshold
    real = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4, 0.6, 0.8])
    thr = torch.quantile(real, 0.5)  # 0.5
    got = high_entropy_mask(ent, mask, 0.5)
    assert torch.equal(got, (ent >= thr) & mask.bool())
    assert not got[0, 3]
    assert not high_entropy_mask(ent, torch.zeros_like(mask), 0.5).any()
    assert torch.equal(high_entropy_mask(ent, mask, 0.0), mask.bool())


def test_off_policy_mask_drops_negative_advantage_high_kl_sequences():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    sampling = torch.zeros(3, 3)
    logps = torch.tensor([[-2.0, -2.0, 1e4], [-2.0, -2.0, -2.0], [-0.5, -0.5, -0.5]])  # mean KL 2, 2, 0.5
    adv = torch.tensor([[-1.0], [1.0], [-1.0]])
    got = off_policy_mask(adv, logps, sampling, mask, 1.0)
    assert torch.equal(got, torch.tensor([[0.0], [1.0], [1.0]]))  # padding (1e4) ignored in row 0
