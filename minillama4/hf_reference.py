"""The same weights in Hugging Face transformers' Llama 4, for parity tests and benchmarks.

transformers is a test/benchmark dependency only: this module imports it when called, and
`import minillama4` never imports this module.
"""

from __future__ import annotations

from .config import to_hf_dict


def _transformers_older_than(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version(version)


def hf_text_config(cfg, attn_implementation: str = "sdpa"):
    """Our TextConfig / Llama4Config -> transformers.Llama4TextConfig."""
    from transformers import Llama4TextConfig

    from .config import Llama4Config

    full = cfg if isinstance(cfg, Llama4Config) else Llama4Config(text=cfg, vision=None)
    d = to_hf_dict(full, text_only=True)
    for key in ("architectures", "model_type", "torch_dtype"):
        d.pop(key)
    if d.get("attention_chunk_size") is None and _transformers_older_than("5.24"):
        # transformers 5.17 still treats the RoPE layers as chunked without a chunk size and fails
        # building their mask and cache; one chunk as long as the context is full causal attention
        d["attention_chunk_size"] = d["max_position_embeddings"]
    hcfg = Llama4TextConfig(**d)
    hcfg._attn_implementation = attn_implementation
    return hcfg


def to_transformers(model, attn_implementation: str = "sdpa", copy: bool = True):
    """A transformers Llama4ForCausalLM holding exactly our model's weights (same dtype, device).
    copy=True gives it its own tensors, so a forward that wrote into a weight in place could not
    hide by changing both models alike; copy=False shares ours (half the memory: benchmarks)."""
    import torch
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    hcfg = hf_text_config(model.config, attn_implementation)
    with torch.device("meta"):  # no random init: every weight comes from our model
        hf = Llama4ForCausalLM(hcfg)
    state = {name: t.clone() for name, t in model.state_dict().items()} if copy else model.state_dict()
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(model.device):  # the one non-persistent buffer (inv_freq), rebuilt for real
        hf.model.rotary_emb = Llama4TextRotaryEmbedding(hcfg)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ours without stops
    return hf.eval()
