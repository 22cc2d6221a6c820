"""Small configs shared by the tests. Chunk size 8 and floor_scale 2 make chunked attention and
NoPE temperature tuning change the result at test-sized sequence lengths (they would only matter
past 8,192 tokens at Scout's values)."""

import torch

from minillama4 import TextConfig


def small_text(**overrides) -> TextConfig:
    base = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=96, intermediate_size_mlp=160,
                num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=8, floor_scale=2,
                attn_scale=0.5, rope_original_max_position_embeddings=16, rope_factor=4.0,
                rope_low_freq_factor=1.0, rope_high_freq_factor=2.0, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, initializer_range=0.1)
    base.update(overrides)
    return TextConfig(**base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number for 'how close are these logits'."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def posttrain_model(seed: int = 0):
    """A 2-layer variant of the post-training course model (posttrain_task.model_config()): fast
    enough for the sampling, SFT, RL and DPO tests."""
    import minillama4 as ml4
    from minillama4.train import posttrain_task

    cfg = posttrain_task.model_config().replace_text(
        hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64, intermediate_size_mlp=128,
        moe_layers=None, no_rope_layers=None, no_rope_layer_interval=2)
    return ml4.Llama4Text.random(cfg, seed=seed)


def warmed_posttrain_model(verbose_fraction: float, steps: int, seed: int = 1):
    """posttrain_model after a short SFT on level-1 sums (some answers right, not all): the
    starting point of the RL and DPO learning tests."""
    from minillama4.train import sft

    model = posttrain_model(seed=seed)
    data = sft.make_sft_dataset(512, seed=0, verbose_fraction=verbose_fraction, levels=(1,))
    sft.train_sft(model, data, sft.SFTConfig(steps=steps, batch_size=32, lr=1e-2, warmup=5))
    return model
