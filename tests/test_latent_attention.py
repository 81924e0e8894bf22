"""latent_attention.LatentProjection against Hugging Face's own MLA layer."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from loraplex.model.latent_attention import LatentProjection


def mla_layer(**shape) -> DeepseekV3Attention:
    config = DeepseekV3Config(**{**dict(hidden_size=32, num_attention_heads=4, q_lora_rank=None,
                                        kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=16, v_head_dim=8), **shape})
    torch.manual_seed(0)
    return DeepseekV3Attention(config, layer_idx=0).eval()


def test_expand_gives_hf_keys_and_values():
    """A prefill's cached latents and rotary keys, expanded outside any step (no adapter):
    HF's expand_kv's keys and values, per head."""
    layer = mla_layer()
    latent = LatentProjection(layer, torch.float32)
    c, k_rot = torch.randn(1, 1, 10, 16), torch.randn(1, 1, 10, 8)  # [B, 1, L, rank / rope]
    with torch.no_grad():
        keys, values = layer.expand_kv(c, k_rot)  # [1, H, L, 24], [1, H, L, 8]
        cached = torch.cat((c, k_rot), dim=-1)[0].transpose(0, 1)  # [L, 1, rank + rope]
        ours = latent.expand(cached, None)
    assert ours[0].shape == (4, 10, 24) and ours[1].shape == (4, 10, 8)
    torch.testing.assert_close(ours[0], keys[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], values[0], rtol=1e-5, atol=1e-5)
    # (the absorbed queries read the same weight: q_nope . k_nope == absorbed q . c)
    q = torch.randn(1, 4, 3, 24)  # [1, H, q, nope + rope]
    torch.testing.assert_close(latent.queries(q, None)[0] @ cached[:, 0].T,
                               q[0] @ keys[0].transpose(1, 2),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("queries,context,expanded", [
    (2048, 2048, True),  # a whole prompt
    (171, 10**9, True),  # DeepSeek-V3: from 171 new tokens over any context
    (170, 10**9, False),
    (170, 4096, True),  # the shorter the context, the shorter the chunk that gains
    (16, 4096, False),
])
def test_expanded_where_fewer_multiply_adds(queries, context, expanded):
    """DeepSeek-V3's shapes (kv_lora_rank 512, nope 128, v 128; heads do not matter):
    expanding costs L x 512 x 256 a head and saves q x L x 768 - q x 512 x 256."""
    layer = mla_layer(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                      v_head_dim=128, num_attention_heads=1)
    assert LatentProjection(layer, torch.float32).expands(queries, context) == expanded


def test_never_expanded_where_the_latent_is_no_narrower():
    """kv_lora_rank 16, nope 16, v 16: expanding saves no attention work."""
    latent = LatentProjection(mla_layer(v_head_dim=16), torch.float32)
    assert not latent.expands(4096, 4096)
