"""Memory planning: what a model needs before anything is allocated, and a clear refusal.

    plan = plan_memory(configs.scout(), context=8192, quantize="int4")
    print(plan.table())
    check_fits(plan, available_bytes("cuda"))   # raises MemoryPlanError saying by how much

Weights come from `count_params` (exact); the feed-forward weights are int4 (4 bits + one bf16
scale per 128 weights) when quantize="int4", and the attention projections too with which="all";
the rest (embeddings, routers, norms, lm_head) stays in `dtype`. KV cache: 2 (k, v) x kv_heads x
head_dim x bytes per position per layer, with chunked layers capped at one chunk when the ring
buffer is on. Activations are an estimate for a prefill of `prefill_tokens` tokens: a few
residual-stream copies, the dequantized scratch of one layer's experts (all of them up to 16, as
quant.Int4Experts does; else one), the attention scores of one layer, and the logits. With
cuda=True and int4, tinygemm's second copy of the int4 linears (the decode kernel those linears
use on a GPU). Loading needs less than the activations on top of the weights: one stored tensor
and a block of quantization scratch at a time (checkpoint.from_pretrained, quant.quantize_int4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check_bool, check_int, check_type
from .config import Llama4Config, TextConfig
from .params import BYTES_PER_PARAM, count_params

GIB = 2**30
FFN_COMPONENTS = ("text.routed_experts", "text.shared_experts", "text.dense_mlps")
WHICH = ("ffn", "all")  # quantize="int4" applies to the feed-forward weights, or to every decoder linear
PLAN_DTYPES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}  # bytes per weight kept in that format


class MemoryPlanError(MemoryError):
    """The model does not fit: the message says how much is needed, available and missing."""


@dataclass
class MemoryPlan:
    name: str  # model name, for printing
    context: int  # positions the KV cache holds
    batch: int  # sequences decoded together
    weights: dict = field(default_factory=dict)  # component -> bytes
    kv_cache: int = 0  # bytes
    activations: int = 0  # bytes (estimate)
    decode_kernels: int = 0  # bytes: tinygemm's own copy of the int4 linears' weights (CUDA decode)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_cache + self.activations + self.decode_kernels

    def table(self) -> str:
        rows = [f"memory plan for {self.name}: context {self.context:,}, batch {self.batch}"]
        rows += [f"  weights {name:<26} {b / GIB:8.2f} GiB" for name, b in self.weights.items() if b]
        rows += [f"  weights total                      {self.weight_bytes / GIB:8.2f} GiB",
                 f"  KV cache                           {self.kv_cache / GIB:8.2f} GiB",
                 f"  activations (estimate)             {self.activations / GIB:8.2f} GiB"]
        if self.decode_kernels:
            rows.append(f"  int4 linears, tinygemm layout      {self.decode_kernels / GIB:8.2f} GiB")
        rows.append(f"  total                              {self.total / GIB:8.2f} GiB")
        return "\n".join(rows)


def kv_cache_bytes(cfg: TextConfig, context: int, batch: int = 1, bytes_per_value: int = 2,
                   ring: bool = True) -> int:
    """Bytes of keys and values for `context` positions; chunked layers keep one chunk with ring."""
    check_type("cfg", cfg, TextConfig, "pass config.text for a Llama4Config")
    for name, value in (("context", context), ("batch", batch), ("bytes_per_value", bytes_per_value)):
        check_int(name, value, 1)  # a negative context gave negative bytes
    check_bool("ring", ring)
    per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value * batch
    total = 0
    for layer in range(cfg.num_hidden_layers):
        kept = min(context, cfg.attention_chunk_size) if ring and cfg.is_chunked(layer) else context
        total += kept * per_position
    return total


def _plan_dtype(dtype) -> str:
    """A PLAN_DTYPES name from one of them, or from anything devices.as_dtype takes (torch.bfloat16, "float16")."""
    if isinstance(dtype, str) and dtype.lower() in PLAN_DTYPES:
        return dtype.lower()
    import torch

    from .devices import as_dtype

    try:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[as_dtype(dtype)]
    except ValueError:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(PLAN_DTYPES)} or a float torch.dtype") from None


def plan_memory(config: Llama4Config | TextConfig, context: int = 8192, batch: int = 1, quantize: str | None = None,
                which: str = "ffn", dtype: str = "bf16", ring: bool = True, prefill_tokens: int = 2048,
                cuda: bool = False) -> MemoryPlan:
    if not isinstance(config, (Llama4Config, TextConfig)):
        raise TypeError(f"plan_memory needs a Llama4Config or TextConfig (e.g. configs.scout()), got {config!r}")
    if quantize not in (None, "int4"):
        raise ValueError(f"quantize={quantize!r}: expected None or 'int4'")
    if which not in WHICH:
        raise ValueError(f"which={which!r}: expected one of {WHICH}")
    dtype = _plan_dtype(dtype)
    for name, value in (("context", context), ("batch", batch), ("prefill_tokens", prefill_tokens)):
        check_int(name, value, 1)
    check_bool("ring", ring)  # ring="no" and cuda="yes" were read as True
    check_bool("cuda", cuda)
    full = config if isinstance(config, Llama4Config) else Llama4Config(text=config, vision=None)
    t = full.text
    pc = count_params(full)
    base = PLAN_DTYPES[dtype]
    int4_parts = (FFN_COMPONENTS + ("text.attention",)) if which == "all" else FFN_COMPONENTS
    weights = {name: int(total * (BYTES_PER_PARAM["int4"] if quantize and name in int4_parts else base))
               for name, (total, _) in pc.components.items()}
    value_bytes = int(base) if base >= 2 else 2  # the cache and activations stay bf16 with fp8/int4 weights
    tokens = min(prefill_tokens, context) * batch
    activations = (6 * tokens * t.hidden_size * value_bytes  # residual stream, norms, attention output
                   # int4 prefill: one layer's routed experts dequantized into a scratch buffer (at most
                   # Int4Experts.max_scratch_experts = 16 of them, else one expert at a time; quant.py)
                   + (3 * t.hidden_size * t.intermediate_size * value_bytes
                      * (t.num_local_experts if t.num_local_experts <= 16 else 1) if quantize else 0)
                   + t.num_attention_heads * tokens * min(prefill_tokens, context) * value_bytes  # scores
                   + tokens * t.vocab_size * 4)  # logits (fp32)
    # on CUDA an int4 linear whose decode kernel is torch's tinygemm keeps the weights a second time
    # in tinygemm's layout (quant.Int4Linear; tinygemm won every Scout shape, docs/benchmarks.md):
    # count it for every int4 linear, the routed experts excepted (they use the W4A16 kernel)
    linears = [name for name in int4_parts if name != "text.routed_experts"] if quantize and cuda else []
    return MemoryPlan(name=full.name, context=context, batch=batch, weights=weights,
                      kv_cache=kv_cache_bytes(t, context, batch, value_bytes, ring), activations=activations,
                      decode_kernels=sum(weights[name] for name in linears))


def available_bytes(device="cpu") -> int:
    """Free memory on the device: CUDA's free memory, or MemAvailable from /proc/meminfo."""
    import torch

    from .devices import as_device

    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 1 << 62  # unknown: do not refuse


def check_fits(plan: MemoryPlan, available: int, where: str = "this device") -> None:
    if isinstance(available, bool) or not isinstance(available, int):
        raise TypeError(f"available={available!r}: bytes as an int (plan.available_bytes(device) gives it)")
    if plan.total > available:
        raise MemoryPlanError(
            f"{plan.name} needs {plan.total / GIB:.1f} GiB on {where} (weights {plan.weight_bytes / GIB:.1f}, "
            f"KV cache {plan.kv_cache / GIB:.1f}, activations {plan.activations / GIB:.1f}) but only "
            f"{available / GIB:.1f} GiB is free: short by {(plan.total - available) / GIB:.1f} GiB. "
            "Try quantize='int4', a shorter context, or a bigger device.")


def check_weights_fit(config: Llama4Config | TextConfig, dtype, device) -> None:
    """Refuse, before allocating, to build a full-precision model whose weights do not fit: used by
    Llama4Text.random and Llama4.random, which build the model on the CPU and then move it, so a
    CUDA target needs the room on both."""
    import torch

    from .devices import as_device, as_dtype

    device, dtype = as_device(device), as_dtype(dtype)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    full = config if isinstance(config, Llama4Config) else Llama4Config(text=config, vision=None)
    plan = MemoryPlan(name=full.name, context=0, batch=0,
                      weights={k: int(total * PLAN_DTYPES[name]) for k, (total, _) in count_params(full).components.items()})
    for where in {torch.device("cpu"), device}:
        if plan.total > available_bytes(where):
            raise MemoryPlanError(
                f"{plan.name} with random {name} weights needs {plan.total / GIB:.1f} GiB on {where} but only "
                f"{available_bytes(where) / GIB:.1f} GiB is free: short by {(plan.total - available_bytes(where)) / GIB:.1f} "
                "GiB. For the full-size models use minillama4.random_model(config, quantize='int4', device='cuda'), "
                "which builds int4 weights directly on the device; or a scaled-down config (configs.tiny(), configs.small()).")
