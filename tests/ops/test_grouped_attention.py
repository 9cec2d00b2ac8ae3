"""GQA attention under a mask runs at the K/V head count: `grouped_sdpa` regroups the query heads
onto their KV head instead of SDPA's enable_gqa, which with a mask falls back on CUDA to the math kernel
(expanding K/V per query head). Checked on CPU: the same values as SDPA with K/V repeated per head, for the
engine's prefill mask (per query position), its decode mask (one row) and the shared-prompt completion mask."""

import pytest
import torch
import torch.nn.functional as F

from dash_fast.models.decoder import grouped_sdpa


def reference(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask,
                                          scale=scale)


@pytest.mark.parametrize("heads, kv", [(8, 2), (6, 3), (4, 4)])
@pytest.mark.parametrize("T, S", [(5, 5), (1, 9), (3, 7)])
def test_grouped_sdpa_equals_attention_over_repeated_kv(heads, kv, T, S):
    g = torch.Generator().manual_seed(heads * 100 + T * 10 + S)
    b, D = 3, 8
    q, k, v = (torch.randn(n, generator=g, dtype=torch.float64)
               for n in ((b, heads, T, D), (b, kv, S, D), (b, kv, S, D)))
    mask = torch.rand(b, 1, T, S, generator=g) < 0.7
    mask[..., -1] = True  # no empty softmax row
    torch.testing.assert_close(grouped_sdpa(q, k, v, mask, 0.3), reference(q, k, v, mask, 0.3), rtol=1e-12, atol=1e-12)
