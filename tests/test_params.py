"""Parameter counts computed from the configs reproduce the published numbers exactly."""

import pytest
import torch

import minillama4 as ml4
from minillama4 import configs, count_params


def test_scout_exact():
    pc = count_params(configs.scout())
    assert pc.total == 108_641_793_536  # Hugging Face Hub safetensors count
    assert pc.part("text.") == 107_769_861_120
    assert pc.part("vision.") == 871_932_416
    assert pc.active == 17_172_894_720  # "17B active"
    assert pc.components["text.routed_experts"] == (96_636_764_160, 6_039_797_760)


def test_maverick_exact():
    pc = count_params(configs.maverick())
    assert pc.total == 401_583_781_376  # provider-published parameter_count
    assert pc.part("text.") == 400_711_848_960
    assert pc.active == 17_184_691_200
    assert pc.components["text.dense_mlps"][0] == 24 * 3 * 5120 * 16384


def test_behemoth_guess_is_near_published_facts():
    pc = count_params(configs.behemoth())
    assert 1.8e12 < pc.total < 2.1e12 and 270e9 < pc.active < 300e9  # "~2T", "288B active"


def test_counts_equal_the_real_module_for_small_configs():
    for name in ("tiny", "small"):
        cfg = configs.get(name)
        model = ml4.Llama4Text(cfg)
        assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_active_counts_match_what_a_token_touches():
    cfg = configs.get("small").replace_text(num_experts_per_tok=2)
    model = ml4.Llama4Text.random(cfg)
    pc = count_params(cfg)
    unused = sum(p[0].numel() * (cfg.text.num_local_experts - 2) for name, p in model.named_parameters()
                 if "experts.gate_up_proj" in name or "experts.down_proj" in name)
    assert pc.active == pc.total - unused
    assert torch.isclose(torch.tensor(pc.memory_gib("bf16") / pc.memory_gib("fp8")), torch.tensor(2.0))


def test_count_params_wants_a_config():
    with pytest.raises(TypeError, match=r"count_params: config='scout': .*configs\.scout\(\)"):
        count_params("scout")
    with pytest.raises(ValueError, match=r"fmt='fp16': expected one of \['bf16', 'fp8', 'int4'\]"):
        count_params(configs.tiny()).memory_gib("fp16")
