"""Argument checks of the memory planner and of device/dtype arguments (devices.py): every bad
value is refused by name before anything is allocated. The planner's numbers are tested in
test_quant.py (Scout and Maverick plans) and test_checkpoint.py (refusals while loading)."""

import pytest
import torch

import minillama4 as ml4
from minillama4 import configs, plan
from minillama4.devices import as_device, as_dtype


@pytest.mark.parametrize("kwargs, says", [
    ({"context": -8192}, "context=-8192: must be a positive integer"),  # was a negative KV cache
    ({"context": 2.5}, "context=2.5"),
    ({"batch": -4}, "batch=-4"),  # was a smaller total
    ({"batch": True}, "batch=True"),
    ({"prefill_tokens": 0}, "prefill_tokens=0"),
    ({"which": "bogus"}, "which='bogus': expected one of"),  # was silently "ffn"
    ({"dtype": "int8"}, "dtype='int8': expected one of ['bf16', 'fp16', 'fp32', 'fp8'] or a float torch.dtype"),
    ({"dtype": torch.int8}, "dtype=torch.int8: expected one of"),
    ({"quantize": "int8"}, "quantize='int8'"),
    ({"ring": "no"}, "ring='no': must be True or False"),  # was read as True
    ({"cuda": "yes"}, "cuda='yes': must be True or False"),
    ({"cuda": 1}, "cuda=1: must be True or False"),
])
def test_plan_refuses_bad_arguments_by_name(kwargs, says):
    with pytest.raises((ValueError, TypeError), match=says.replace("(", r"\(").replace("[", r"\[")):
        plan.plan_memory(configs.scout(), **kwargs)


@pytest.mark.parametrize("args, kwargs, error, says", [
    ((-5,), {}, ValueError, "context=-5: must be a positive integer"),  # was -2560 bytes
    ((0,), {}, ValueError, "context=0: must be a positive integer"),
    ((8.5,), {}, TypeError, "context=8.5: must be a positive integer"),
    ((8,), {"batch": -1}, ValueError, "batch=-1: must be a positive integer"),
    ((8,), {"bytes_per_value": 0}, ValueError, "bytes_per_value=0: must be a positive integer"),
    ((8,), {"ring": "no"}, TypeError, "ring='no': must be True or False"),
])
def test_kv_cache_bytes_refuses_bad_arguments_by_name(args, kwargs, error, says):
    with pytest.raises(error, match=says):
        plan.kv_cache_bytes(configs.tiny().text, *args, **kwargs)


def test_kv_cache_bytes_takes_a_text_config():
    with pytest.raises(TypeError, match="cfg must be a TextConfig, got Llama4Config; pass config.text"):
        plan.kv_cache_bytes(configs.tiny(), 8)
    # tiny: 4 layers x 2 (k, v) x 2 kv heads x 16 dims x 2 bytes per position, the 3 chunked ones capped at 32
    assert plan.kv_cache_bytes(configs.tiny().text, 40) == (3 * 32 + 40) * 2 * 2 * 16 * 2
    assert plan.kv_cache_bytes(configs.tiny().text, 40, ring=False) == 4 * 40 * 2 * 2 * 16 * 2


def test_plan_needs_a_config_and_check_fits_needs_bytes():
    with pytest.raises(TypeError, match="Llama4Config or TextConfig"):
        plan.plan_memory("scout")
    with pytest.raises(TypeError, match="available=None"):
        plan.check_fits(plan.plan_memory(configs.tiny()), None)


def test_random_full_precision_model_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    """Llama4Text.random(configs.scout()) used to be OOM-killed (405 GiB of fp32 weights)."""
    monkeypatch.setattr(plan, "available_bytes", lambda device="cpu": 16 * 2**30)
    with pytest.raises(plan.MemoryPlanError, match=r"needs 404\.7 GiB on cpu .* short by 388\.7 GiB.*quantize='int4'"):
        plan.check_weights_fit(configs.scout(), torch.float32, "cpu")
    plan.check_weights_fit(configs.tiny(), "bf16", "cpu")  # a few MB: fine


@pytest.mark.parametrize("device, says", [
    ("gpu", "not a device name"),
    ("cuda:x", "not a device name"),
    ("meta", "the meta device holds no weights"),
    (None, "not a device name"),
])
def test_bad_device_names_are_refused(device, says):
    with pytest.raises(ValueError, match=f"device={device!r}: {says}"):
        as_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
        as_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        plan.available_bytes("cuda")  # was torch's AssertionError "Torch not compiled with CUDA enabled"


def test_dtypes_by_name_or_torch_dtype_and_only_floats():
    assert as_dtype("bf16") is as_dtype("BFloat16") is as_dtype(torch.bfloat16) is torch.bfloat16
    assert as_dtype(None, allow_none=True) is None
    assert as_device("cpu") == torch.device("cpu")
    for bad, says in [(torch.int64, "must be float32, bfloat16 or float16"), ("bogus", "expected a torch.dtype"),
                      (None, "expected a torch.dtype")]:
        with pytest.raises(ValueError, match=says):
            as_dtype(bad)
    assert ml4.configs.tiny()  # the package still imports and builds configs


def test_plan_takes_torch_dtypes_and_their_long_names():
    """The same plan for "bf16", "bfloat16" and torch.bfloat16 (a KeyError and a refusal before)."""
    scout = configs.scout()
    for same in ("bfloat16", torch.bfloat16):
        assert plan.plan_memory(scout, dtype=same).total == plan.plan_memory(scout, dtype="bf16").total
    assert plan.plan_memory(scout, dtype=torch.float32).total == plan.plan_memory(scout, dtype="fp32").total
