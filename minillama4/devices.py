"""Device and dtype arguments: the one place that turns what a user passes ("cuda", "bf16",
torch.bfloat16, ...) into torch objects, with an error that says what was wrong and what works.

Every public entry point that takes device= or dtype= (from_pretrained, random_model,
Llama4Text.random, Llama4.random, the memory planner, the command line) goes through these two
functions, so a typo or a missing GPU fails at once, before anything is allocated or read.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def as_dtype(dtype, allow_none: bool = False) -> torch.dtype | None:
    """A floating-point torch.dtype from a torch.dtype or one of DTYPES' names (None passes
    through when allow_none: "keep the stored dtype")."""
    if dtype is None and allow_none:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype={dtype}: model weights must be float32, bfloat16 or float16")
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r}: expected a torch.dtype or one of {sorted(DTYPES)}")


def as_device(device) -> torch.device:
    """A torch.device that can hold weights on this machine: "cpu", "cuda", "cuda:1", ..."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: not a device name; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device={device!r}: CUDA is not available ({why}); use device='cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "meta":
        raise ValueError(f"device={device!r}: the meta device holds no weights; use 'cpu' or 'cuda'")
    elif d.type != "cpu" and not (d.type == "mps" and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}: not available here; use 'cpu' or 'cuda'")
    return d


_MULTIPROCESSORS: dict = {}


def multiprocessors(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (asked once per device), None elsewhere: the
    Triton launchers size their grids by it and pick their own stand-in under the interpreter."""
    if device.type != "cuda":
        return None
    if device not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _MULTIPROCESSORS[device]
