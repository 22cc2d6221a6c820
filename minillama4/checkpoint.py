"""Read and write Hugging Face Llama 4 checkpoint directories (config.json + safetensors).

Accepted layouts:
  Llama4ForCausalLM               keys model.*, lm_head.*
  Llama4ForConditionalGeneration  keys language_model.model.*, language_model.lm_head.*, plus
                                  vision_model.* and multi_modal_projector.* (a Llama4 model; or
                                  text_only=True: a Llama4Text that skips the vision tensors)
  one model.safetensors, or shards listed in model.safetensors.index.json

Loading streams tensor by tensor into a model built on the meta device, so peak host memory is
near one copy of the model (1.45x measured, the mapped file pages included; with quantize="int4":
the int4 model plus the tensor being quantized, about 2x the int4 model). Names, shapes and dtypes (F32, BF16 or F16; a single one unless `dtype` is given), and
that no tensor is stored twice, are checked from the safetensors headers before any weight is read;
each tensor is checked for NaN/inf as it streams (and for overflow when cast to fp16). Only safetensors is read: pickle files (.bin/.pt) can run code when loaded, and are
refused with a message, never opened; index entries must name files inside the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import Llama4Config, from_hf_dict, to_hf_dict
from .checks import check_seed
from .devices import as_device, as_dtype
from .model import Llama4, Llama4Text

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")  # not used by a text-only model
REQUIRED_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")  # the size
FORMS = ("v5", "legacy")  # config.json forms save_pretrained writes (config.to_hf_dict)
FINITE_BLOCK = 1 << 22  # elements checked for NaN/inf at a time (float8 is checked as float32: 16 MB)


def _names(items, limit: int = 12) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _read_json_object(file: Path, expected: str) -> dict:
    """The JSON object in `file`, or a ValueError naming the file and what it should hold."""
    if not file.is_file():
        raise ValueError(f"{file}: not a regular file (expected {expected})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); expected {expected} in UTF-8") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: holds {_JSON_TYPES.get(type(data), type(data).__name__)}, "
                         f"expected {expected} (a JSON object)")
    return data


def _index_files(path: Path) -> list[str]:
    """The shard file names model.safetensors.index.json lists, checked to be plain .safetensors
    file names: an entry like "../other/model.safetensors" would load weights from outside the folder."""
    index = path / INDEX
    weight_map = _read_json_object(index, 'the "weight_map" of a sharded checkpoint').get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: needs a \"weight_map\" object (tensor name -> shard file name), "
                         f"got {weight_map!r:.80}")
    bad = {repr(f) for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f
           or not f.endswith(".safetensors")}  # a bare name: no folder part, so no "..", "/" or "~"
    if bad:
        raise ValueError(f"{index}: weight_map entries must be .safetensors file names inside the checkpoint "
                         f"folder, got {_names(bad)}")
    return sorted(set(weight_map.values()))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, or a clear error."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    if (path / INDEX).exists():
        files = _index_files(path)
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in {INDEX} are missing: {_names(missing)}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    not_files = [p.name for p in files if not p.is_file()]
    if not_files:
        raise ValueError(f"{path}: {_names(not_files)} is not a regular file (a folder?); expected safetensors files")
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path}: found only pickle checkpoint files ({_names(pickles)}). minillama4 reads "
            "safetensors only and never unpickles (loading a pickle can run arbitrary code). Convert it "
            "where you trust the file, e.g. with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")


def _unlisted_files(path: Path, files: list[Path]) -> list[str]:
    """*.safetensors files in the folder that the index does not list (a stale or incomplete index)."""
    if not (path / INDEX).exists():
        return []
    return sorted({p.name for p in path.glob("*.safetensors")} - {f.name for f in files})


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """key -> (file, shape, stored dtype such as "BF16"), from the headers only."""
    out = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in out:  # which copy would win depends on the file order: refuse rather than guess
                        raise ValueError(f"checkpoint tensor {key} is stored twice, in {out[key][0].name} and "
                                         f"{file.name} ({file.parent}): remove the stale file")
                    info = f.get_slice(key)
                    out[key] = (file, list(info.get_shape()), info.get_dtype())
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e}); it may be truncated or "
                             "corrupt: download or save it again") from None
    return out


STORED_DTYPES = ("F32", "BF16", "F16")  # what the model computes in (safetensors' dtype names)


def _refuse_non_float(headers, keys) -> None:
    """Weights must be stored as F32, BF16 or F16: an integer tensor would only fail later, deep in
    torch; float8 needs the scales of its quantization format (Meta's -FP8 releases), which are not read."""
    bad = [f"{key} {headers[key][2]} ({headers[key][0].name})" for key in keys if headers[key][2] not in STORED_DTYPES]
    if bad:
        raise ValueError(f"checkpoint tensors stored in a dtype minillama4 does not load ({len(bad)}): {_names(bad)}; "
                         "weights must be F32, BF16 or F16 (for Meta's FP8 releases use the BF16 checkpoint; "
                         "F64 tensors: convert them to F32)")


def _is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in tensor: its min and max are finite (both propagate NaN). Unlike
    torch.isfinite(tensor).all(), this makes no tensor-sized temporaries (measured: +40 MB of peak
    on the int4 streaming load) and is about 50x faster."""
    for block in tensor.reshape(-1).split(FINITE_BLOCK):
        if block.numel() == 0:
            continue
        if block.element_size() == 1:  # float8: aminmax is not implemented for it
            block = block.float()
        if not all(torch.isfinite(x) for x in torch.aminmax(block)):
            return False
    return True


def _param_name(key: str, multimodal: bool, skip_vision: bool = True) -> str | None:
    """Checkpoint key -> our parameter name; None for keys a text-only model does not use (the
    vision tensors, when skip_vision: config.json has a vision tower that text_only leaves out)."""
    if multimodal:
        return key
    if skip_vision and key.startswith(SKIPPED_PREFIXES):
        return None
    return key.removeprefix("language_model.")


def read_config(path) -> Llama4Config:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    data = _read_json_object(cfg_file, "a Hugging Face Llama 4 config")
    # from_hf_dict fills absent fields with Scout's values, as transformers fills in its defaults; a
    # file without the model's size is incomplete, and would be read as a Scout that does not fit
    text = data["text_config"] if isinstance(data.get("text_config"), dict) else data
    missing = [key for key in REQUIRED_TEXT_KEYS if key not in text]
    if missing:
        where = '"text_config"' if text is not data else "the top level"
        raise ValueError(f"{cfg_file}: no {', '.join(missing)} in {where}; every Llama 4 config.json has them "
                         "(is the file complete?)")
    return from_hf_dict(data)


def _plan_or_refuse(cfg, multimodal, quantize, which, dtype, device, context, verbose):
    """Print the memory plan if asked, and refuse before allocating when it does not fit."""
    from .plan import available_bytes, check_fits, plan_memory

    kept = cfg if multimodal else dataclasses.replace(cfg, vision=None)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "bf16"}[dtype]
    prefill = context if isinstance(context, int) and context < 2048 else 2048  # plan_memory refuses a bad context
    plan = plan_memory(kept, context=context, quantize=quantize, which=which, dtype=name, prefill_tokens=prefill,
                       cuda=device.type == "cuda")
    if verbose:
        print(plan.table())
    check_fits(plan, available_bytes(device), where=str(device))


def _quantize_meta(model, quantize, which):
    if quantize is None:
        return
    if quantize != "int4":
        raise ValueError(f"quantize={quantize!r}: expected None or 'int4'")
    from .quant import quantize_model

    quantize_model(model, which)


def from_pretrained(path, dtype=None, device="cpu", text_only: bool = False, quantize: str | None = None,
                    which: str = "ffn", context: int = 2048, verbose: bool = False):
    """Load a Hugging Face Llama 4 directory: a `Llama4` (with the vision tower) when config.json
    has a vision_config, else (or with text_only=True) a `Llama4Text`. dtype None keeps the
    stored dtype (bf16 for Meta's checkpoints). quantize="int4" quantizes the feed-forward
    weights (which="all": every decoder linear) tensor by tensor while streaming, so memory stays
    near the int4 size. Before anything is allocated, the memory plan for `context` positions is
    checked against the device's free memory (printed with verbose=True)."""
    path, dtype, device = Path(path), as_dtype(dtype, allow_none=True), as_device(device)
    cfg = read_config(path)
    files = weight_files(path)
    headers = _read_headers(files)
    if not isinstance(text_only, bool):
        raise TypeError(f"text_only={text_only!r}: expected True or False")
    multimodal = cfg.vision is not None and not text_only
    _plan_or_refuse(cfg, multimodal, quantize, which, dtype, device, context, verbose)
    with torch.device("meta"):
        model = Llama4(cfg) if multimodal else Llama4Text(cfg)
    expected = {name: list(p.shape) for name, p in model.named_parameters()}
    _quantize_meta(model, quantize, which)
    plan, unexpected, mismatched = {}, [], {}
    for key, (file, shape, _) in headers.items():
        name = _param_name(key, multimodal, skip_vision=cfg.vision is not None)  # else they are unexpected
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
        elif shape != expected[name]:
            mismatched[name] = f"{key} {shape} (expected {expected[name]})"
        else:
            plan[name] = (file, key)
    missing = sorted(set(expected) - set(plan) - set(mismatched))
    problems = [f"{label} ({len(items)}): {_names(items)}" for label, items in
                (("missing tensors", missing), ("mis-shaped tensors", list(mismatched.values())),
                 ("unexpected tensors", unexpected)) if items]
    unlisted = _unlisted_files(path, files)
    if missing and unlisted:  # the likely cause: say which file, not only which tensors
        problems.append(f"files in the folder that {INDEX} does not list ({len(unlisted)}): {_names(unlisted)} "
                        "(a stale or incomplete index?)")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems))
    _refuse_non_float(headers, [key for _, key in plan.values()])
    stored = sorted({headers[key][2] for _, key in plan.values()})
    if dtype is None and len(stored) > 1:  # "keep the stored dtype" would give a model of mixed dtypes
        counts = ", ".join(f"{d}: {sum(headers[key][2] == d for _, key in plan.values())}" for d in stored)
        raise ValueError(f"{path}: the checkpoint stores its tensors in several dtypes ({counts}); "
                         "pass dtype= ('bf16' or 'fp32') to load them all in one")
    for name, (file, key) in plan.items():  # file by file: the headers were read in that order
        # safetensors hands out tensors that live on the file's memory map (no copy), and any one of
        # them keeps the whole file mapped: so the file is opened for one tensor at a time, and a
        # tensor the model keeps is copied out (its own memory; no file stays mapped after loading)
        with safe_open(str(file), framework="pt") as f:
            stored = f.get_tensor(key)
        if not _is_finite(stored):  # else it loads silently and generate prints gibberish
            raise ValueError(f"checkpoint tensor {key} ({file.name}) contains NaN or inf: the file is corrupt "
                             "or the weights diverged; download or save it again")
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        quantized = hasattr(module, "load_dense")  # an int4 module: quantizes this tensor now (no copy kept)
        # int4 quantization reads blocks in fp32 (quant.quantize_int4): casting a whole tensor to a wider
        # dtype first gives the same numbers and a tensor-sized copy more at the peak
        widening = dtype is None or dtype == stored.dtype or dtype == torch.float32
        tensor = stored.to(device=device, dtype=None if quantized and widening else dtype, copy=not quantized)
        if dtype == torch.float16 and stored.dtype != torch.float16 and not _is_finite(tensor):
            raise ValueError(f"checkpoint tensor {key} ({file.name}) overflows fp16 (largest magnitude "
                             f"{stored.abs().max().item():.3g}, fp16's is 65504): load it with dtype='bf16' or 'fp32'")
        if quantized:
            module.load_dense(tensor) if attr == "weight" else module.load_dense(attr, tensor)
        else:
            setattr(module, attr, nn.Parameter(tensor))
        del stored, tensor
    return model.eval()


def random_model(config, quantize: str | None = None, which: str = "ffn", dtype=torch.bfloat16, device="cpu",
                 seed: int = 0, context: int = 2048, verbose: bool = False):
    """A model with random weights built directly on `device` (int4 buffers filled directly in
    int4: no full-precision detour), for benchmarks without a checkpoint. Text-only for a
    TextConfig or a config without vision, else the multimodal Llama4. The memory plan is checked
    first, like from_pretrained."""
    from .quant import randomize_int4

    check_seed(seed)
    cfg = config if isinstance(config, Llama4Config) else Llama4Config(text=config, vision=None)
    dtype, device = as_dtype(dtype), as_device(device)
    _plan_or_refuse(cfg, cfg.vision is not None, quantize, which, dtype, device, context, verbose)
    with torch.device("meta"):
        model = (Llama4(cfg) if cfg.vision is not None else Llama4Text(cfg)).to(dtype)
    _quantize_meta(model, quantize, which)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = cfg.text.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "load_dense"):
                randomize_int4(module, std, generator)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
    return model.eval()


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size) -> int:
    """max_shard_size in bytes: a positive int, or a string such as "5GB", "500MB" or "100KiB"."""
    n = None
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        s = size.strip().upper()
        unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if s.endswith(u)), None)
        try:
            n = int(float(s[: -len(unit)]) * SIZE_UNITS[unit]) if unit else int(s)
        except (ValueError, OverflowError):  # "abc", "GB", "nanGB", "infGB"
            pass
    if n is None or n < 1:
        raise ValueError(f"max_shard_size={size!r}: expected a positive number of bytes (an int) or a string "
                         "such as '5GB', '500MB' or '100KiB' (units KB, MB, GB, KiB, MiB, GiB)")
    return n


def _refuse_unsaveable(model, path: Path) -> None:
    """Everything save_pretrained can refuse, checked before it creates or writes anything."""
    if not isinstance(model, (Llama4, Llama4Text)):
        raise TypeError(f"save_pretrained needs a minillama4 Llama4Text or Llama4, got {type(model).__name__}")
    if any(hasattr(m, "load_dense") for m in model.modules()):
        raise ValueError("this model holds int4 weights; save_pretrained writes the Hugging Face bf16/fp32 "
                         "format: save before quantizing, or reload the original checkpoint")
    on_meta = [name for name, t in model.state_dict().items() if t.is_meta]
    if on_meta:
        raise ValueError(f"model weights are on the meta device, which holds no values ({len(on_meta)} tensors: "
                         f"{_names(on_meta, 3)}): load or initialize them (e.g. model.to_empty(device='cpu') and "
                         "fill them) before saving")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory (save_pretrained writes a checkpoint folder)")
    # the config may have been changed after the model was built: it must still describe these weights,
    # or the checkpoint would not load (here or in transformers)
    try:
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in type(model)(model.config).state_dict().items()}
    except ValueError as e:
        raise ValueError(f"model.config no longer validates: {e}") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [f"{name} {list(shapes[name])} (config says {list(expected[name])})" for name in shapes
             if name in expected and shapes[name] != expected[name]]
    problems = [f"{label} ({len(items)}): {_names(items)}" for label, items in
                (("mis-shaped", wrong), ("missing", set(expected) - set(shapes)), ("extra", set(shapes) - set(expected)))
                if items]
    if problems:
        raise ValueError("the model's weights do not match model.config (was a config field changed after the "
                         "model was built?); nothing written:\n  " + "\n  ".join(problems))


def save_pretrained(model, path, max_shard_size="5GB", form: str = "v5") -> None:
    """Write config.json and safetensors (sharded above max_shard_size) as transformers'
    save_pretrained does (Llama4ForCausalLM for a Llama4Text, Llama4ForConditionalGeneration for
    a Llama4), so transformers and from_pretrained both load it. form: config.json's form, "v5"
    (transformers 5.x) or "legacy" (4.x).
    Bad arguments are refused before anything is written. New files are written under temporary
    names and renamed at the end, so a failed save leaves an earlier checkpoint in the folder intact."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}: expected a folder path (str or pathlib.Path)")
    path = Path(path)
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    limit = _parse_size(max_shard_size)
    _refuse_unsaveable(model, path)
    dtype = str(model.dtype).removeprefix("torch.")
    config = to_hf_dict(model.config, form, text_only=isinstance(model, Llama4Text), dtype=dtype)
    shards, current, size, seen = [], {}, 0, set()
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in seen:  # tied weights (say lm_head = embed_tokens):
            tensor = tensor.clone()  # safetensors refuses shared memory; each name gets its own copy
        seen.add(tensor.untyped_storage().data_ptr())
        current[name] = tensor
        size += nbytes
    shards.append(current)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = names + ([INDEX] if n > 1 else [])
    created = None  # the outermost folder this call makes (mkdir may make several)
    if not path.exists():
        created = path
        while not created.parent.exists():
            created = created.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        for fname, shard in zip(names, shards):
            save_file(shard, str(path / (fname + ".tmp")), metadata={"format": "pt"})
        (path / "config.json.tmp").write_text(json.dumps(config, indent=2))
        if n > 1:
            weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
            total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
            (path / (INDEX + ".tmp")).write_text(json.dumps({"metadata": {"total_size": total},
                                                             "weight_map": weight_map}, indent=2))
    except BaseException:  # e.g. a full disk: leave no temporary files behind
        for fname in written + ["config.json"]:
            (path / (fname + ".tmp")).unlink(missing_ok=True)
        if created is not None:  # the folders this call made stay only with a checkpoint in them
            folder = path
            while folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                if folder == created:
                    break
                folder = folder.parent
        raise
    for old in list(path.glob("model*.safetensors")) + [path / INDEX]:
        if old.exists() and old.name not in written:
            old.unlink()  # stale shards of an earlier save would shadow or mix with the new weights
    for fname in written + ["config.json"]:
        os.replace(path / (fname + ".tmp"), path / fname)
