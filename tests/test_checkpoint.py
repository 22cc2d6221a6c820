"""Checkpoint directories: every bad input gets a clear error naming the problem, nothing is
unpickled, and saving never leaves a half-written or mixed checkpoint behind."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_text
from safetensors.torch import load_file, save_file

import minillama4 as ml4


@pytest.fixture()
def saved(tmp_path):
    model = ml4.Llama4Text.random(small_text(), seed=0)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def rewrite_weights(path: Path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_round_trip_and_dtypes(saved):
    model, path = saved
    back = ml4.from_pretrained(path)
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name])
    assert ml4.from_pretrained(path, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int3'"):
        ml4.from_pretrained(path, dtype="int3")


def test_missing_tensor_is_named(saved):
    _, path = saved
    rewrite_weights(path, lambda t: t.pop("model.layers.2.feed_forward.experts.down_proj"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.2\.feed_forward\.experts\.down_proj"):
        ml4.from_pretrained(path)


def test_misshaped_tensor_is_named_with_shapes(saved):
    _, path = saved
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ValueError, match=r"mis-shaped tensors \(1\): model\.norm\.weight \[63\] \(expected \[64\]\)"):
        ml4.from_pretrained(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    rewrite_weights(path, lambda t: t.update({"model.layers.9.mystery.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.9\.mystery\.weight"):
        ml4.from_pretrained(path)


def test_truncated_file_gives_clear_message(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        ml4.from_pretrained(path)


class _Boom:
    """Unpickling this would create a marker file: proof that we never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_checkpoint_is_refused_without_unpickling(saved, tmp_path_factory):
    _, path = saved
    (path / "model.safetensors").unlink()
    marker = tmp_path_factory.mktemp("m") / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles"):
        ml4.from_pretrained(path)
    assert not marker.exists()


def test_directory_problems(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ml4.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ml4.from_pretrained(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ml4.from_pretrained(empty)
    (empty / "config.json").write_text((saved[1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        ml4.from_pretrained(empty)


def test_index_with_missing_shard_is_named(tmp_path):
    model = ml4.Llama4Text.random(small_text())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        ml4.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_tensor_is_named(saved, bad):
    _, path = saved
    rewrite_weights(path, lambda t: t["model.norm.weight"].__setitem__(3, bad))
    with pytest.raises(ValueError,
                       match=r"checkpoint tensor model\.norm\.weight \(model\.safetensors\) contains NaN or inf"):
        ml4.from_pretrained(path)


@pytest.mark.parametrize("dtype, stored", [(torch.int64, "I64"), (torch.float8_e4m3fn, "F8_E4M3"),
                                           (torch.float64, "F64")])
def test_a_tensor_stored_in_another_dtype_is_named_with_it(saved, dtype, stored):
    """Integers and booleans would fail deep in torch; float8 (Meta's FP8 releases) has scales this
    loader does not read, and with dtype=None it failed at the forward ("Promotion for Float8 Types")."""
    _, path = saved
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(64).to(dtype)}))
    for kwargs in ({}, {"dtype": "fp32"}):
        with pytest.raises(ValueError, match=rf"model\.norm\.weight {stored} \(model\.safetensors\); "
                                             r"weights must be F32, BF16 or F16"):
            ml4.from_pretrained(path, **kwargs)


def test_a_weight_that_overflows_fp16_is_named(saved):
    """The NaN/inf check ran on the stored tensor only: 1e6 in fp32 became inf when loaded as fp16."""
    _, path = saved
    rewrite_weights(path, lambda t: t["model.layers.1.self_attn.o_proj.weight"].__setitem__((0, 0), 1e6))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight \(model\.safetensors\) "
                                         r"overflows fp16 \(largest magnitude 1e\+06, fp16's is 65504\): load it "
                                         r"with dtype='bf16' or 'fp32'"):
        ml4.from_pretrained(path, dtype="fp16")
    assert ml4.from_pretrained(path, dtype="bf16").model.layers[1].self_attn.o_proj.weight[0, 0] == 1e6 - 1e6 % 4096


def test_tensor_in_two_files_names_both(saved):
    _, path = saved
    save_file({"model.norm.weight": torch.ones(64)}, str(path / "extra.safetensors"))
    with pytest.raises(ValueError,
                       match=r"model\.norm\.weight is stored twice, in extra\.safetensors and model\.safetensors"):
        ml4.from_pretrained(path)


@pytest.fixture()
def sharded(tmp_path):
    model = ml4.Llama4Text.random(small_text())
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    return tmp_path / "ckpt"


def edit_index(path: Path, change):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    change(index)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_must_point_inside_the_folder(sharded):
    ml4.Llama4Text.random(small_text()).save_pretrained(sharded.parent / "good")  # loadable, but outside
    edit_index(sharded, lambda i: i.update(weight_map={k: "../good/model.safetensors" for k in i["weight_map"]}))
    with pytest.raises(ValueError, match=r"weight_map entries must be \.safetensors file names inside the checkpoint "
                                         r"folder, got '\.\./good/model\.safetensors'"):
        ml4.from_pretrained(sharded)


def test_index_file_problems_are_named(sharded):
    edit_index(sharded, lambda i: i.pop("weight_map"))
    with pytest.raises(ValueError, match=r"index\.json: needs a \"weight_map\" object.*got None"):
        ml4.from_pretrained(sharded)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        ml4.from_pretrained(sharded)


def test_shard_missing_from_the_index_is_named(sharded):
    unlisted = sorted(sharded.glob("model-*.safetensors"))[1].name
    edit_index(sharded, lambda i: i.update(weight_map={k: f for k, f in i["weight_map"].items() if f != unlisted}))
    with pytest.raises(ValueError, match=rf"(?s)missing tensors.*does not list \(1\): {unlisted}"):
        ml4.from_pretrained(sharded)


@pytest.mark.parametrize("content, message", [
    ("[]", r"config\.json: holds an array, expected a Hugging Face Llama 4 config \(a JSON object\)"),
    (b"\xff\xfe{}", r"config\.json: not valid JSON.*in UTF-8"),
    (None, r"config\.json: not a regular file"),
])
def test_bad_config_json_is_named(saved, content, message):
    _, path = saved
    cfg = path / "config.json"
    cfg.unlink()
    if content is None:
        cfg.mkdir()
    else:
        cfg.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=message):
        ml4.from_pretrained(path)


def test_bad_dtype_and_device_are_refused_before_reading(saved, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match=r"dtype=torch\.int64: model weights must be float32, bfloat16 or float16"):
        ml4.from_pretrained(path, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"dtype=torch\.int32"):
        ml4.random_model(small_text(), dtype=torch.int32)
    bad_devices = ["gpu", "cuda:x", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad_devices:
        with pytest.raises(ValueError, match=rf"device='{device}'"):
            ml4.from_pretrained(tmp_path / "nope", device=device)  # the argument is checked before the folder
        with pytest.raises(ValueError, match=rf"device='{device}'"):
            ml4.random_model(small_text(), device=device)


def test_resave_replaces_shards_without_leftovers(tmp_path):
    model = ml4.Llama4Text.random(small_text(), seed=1)
    model.save_pretrained(tmp_path, max_shard_size=100_000)
    other = ml4.Llama4Text.random(small_text(), seed=2)
    other.save_pretrained(tmp_path)  # one file now
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    assert torch.equal(ml4.from_pretrained(tmp_path).lm_head.weight, other.lm_head.weight)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("kwargs, message", [
    (dict(form="v4"), r"form='v4': expected one of \('v5', 'legacy'\)"),
    (dict(max_shard_size="abc"), r"max_shard_size='abc': expected a positive number of bytes"),
    (dict(max_shard_size=5.5), r"max_shard_size=5\.5: expected a positive number of bytes"),
    (dict(max_shard_size=0), r"max_shard_size=0: expected a positive"),
    (dict(max_shard_size=-1), r"max_shard_size=-1: expected a positive"),
    (dict(max_shard_size="0GB"), r"max_shard_size='0GB': expected a positive"),
])
def test_bad_save_arguments_write_nothing(saved, kwargs, message):
    _, path = saved
    before = snapshot(path)
    other = ml4.Llama4Text.random(small_text(), seed=3)
    with pytest.raises(ValueError, match=message):
        other.save_pretrained(path, **kwargs)
    assert snapshot(path) == before
    with pytest.raises(ValueError, match=message):
        other.save_pretrained(path / "new", **kwargs)
    assert not (path / "new").exists()


def test_saving_meta_weights_is_refused_before_creating_the_folder(tmp_path):
    with torch.device("meta"):
        model = ml4.Llama4Text(small_text())
    with pytest.raises(ValueError, match=r"model weights are on the meta device, which holds no values"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_failed_write_leaves_no_temporary_files(saved, monkeypatch):
    from minillama4 import checkpoint

    _, path = saved
    before = snapshot(path)
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ml4.Llama4Text.random(small_text(), seed=3).save_pretrained(path, max_shard_size="100KB")
    assert snapshot(path) == before


PEAK_SCRIPT = """
import json, sys, torch, minillama4 as ml4
def status(key):
    return 1024 * int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
with torch.device("meta"):  # torch's meta-device init imports torch._dynamo (and Triton, when installed)
    torch.nn.Embedding(2, 2)  # once: a fixed cost of 100+ MB that is not the loader's, so pay it first
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
m = ml4.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))
tensors = [*m.parameters(), *m.buffers()]
float(sum(t.detach().float().sum() for t in tensors))  # touch every weight: all of it resident
print(status("VmHWM") - base, sum(t.numel() * t.element_size() for t in tensors))
"""


def peak_extra(path: Path, **kwargs) -> tuple[int, int]:
    """(peak extra host memory of from_pretrained(path, **kwargs), bytes of the loaded model), in a
    fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), json.dumps(kwargs)], capture_output=True,
                         text=True, check=True)
    extra, footprint = map(int, out.stdout.split()[-2:])
    return extra, footprint


def test_streaming_load_peak_memory_is_about_one_model(tmp_path):
    """Built on the meta device and filled tensor by tensor: the peak extra host memory stays
    near one copy of the weights, not two (build-then-load_state_dict measured 2.0x here)."""
    cfg = small_text(vocab_size=32000, hidden_size=512, num_attention_heads=8, head_dim=64,
                     num_key_value_heads=2, intermediate_size=1024)
    model = ml4.Llama4Text(cfg)  # default init is enough; the values do not matter here
    model.save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    del model
    extra, _ = peak_extra(tmp_path)
    assert extra < 1.5 * size, f"peak extra {extra / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_streaming_int4_load_peak_memory_is_about_the_int4_model(tmp_path):
    """quantize="int4" from a sharded bf16 checkpoint: the peak extra host memory is the int4 model
    plus one stored tensor and one block of quantization temporaries, far below the checkpoint.
    Measured here: 59-76 MB for a 121 MB checkpoint whose int4 model is 33 MB (bound 117 MB); before
    tensors were quantized block by block and copied off the files' memory maps, 241-251 MB."""
    from minillama4.quant import QUANT_BLOCK

    cfg = small_text(vocab_size=1024, hidden_size=512, num_attention_heads=8, head_dim=64, num_key_value_heads=2,
                     intermediate_size=1024, intermediate_size_mlp=2048, num_local_experts=8)
    ml4.Llama4Text(cfg).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="10MB")
    files = list(tmp_path.glob("*.safetensors"))
    size, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    extra, int4_bytes = peak_extra(tmp_path, quantize="int4", which="all")
    # the int4 model, the largest tensor as stored (its file's pages), float32 temporaries of one
    # block (a copy and |w|: 8 bytes a weight), and 32 MB for the allocator (its arenas vary by run)
    bound = int4_bytes + largest + 8 * QUANT_BLOCK + (32 << 20)
    assert extra < bound < size, (f"peak extra {extra / 1e6:.0f} MB: int4 model {int4_bytes / 1e6:.0f} MB, "
                                  f"checkpoint {size / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB")


def test_a_folder_named_like_a_weight_file_is_named(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"model\.safetensors is not a regular file \(a folder\?\)"):
        ml4.from_pretrained(path)  # was OSError: No such device (os error 19), no path


def test_vision_tensors_in_a_text_only_checkpoint_are_unexpected(saved):
    """They are skipped when config.json has a vision tower that text_only=True leaves out; in a
    checkpoint whose config has none they do not belong (were silently skipped)."""
    _, path = saved
    rewrite_weights(path, lambda t: t.update({"vision_model.patch_embedding.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): vision_model\.patch_embedding\.weight"):
        ml4.from_pretrained(path)
    with pytest.raises(TypeError, match=r"text_only='yes': expected True or False"):
        ml4.from_pretrained(path, text_only="yes")


@pytest.mark.parametrize("drop", ["hidden_size", "vocab_size"])
def test_a_config_json_without_the_models_size_is_refused(saved, drop):
    """from_hf_dict fills absent fields with Scout's values: a config.json missing its size read as
    a Scout that does not fit ("needs 203 GiB"), sending the reader the wrong way."""
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    del cfg[drop]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: no {drop} in the top level; every Llama 4 config\.json "
                                         r"has them \(is the file complete\?\)"):
        ml4.from_pretrained(path)


def test_a_nested_text_config_without_its_size_is_refused(tmp_path):
    ml4.Llama4.random(ml4.configs.tiny_multimodal()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["text_config"]["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'no num_hidden_layers in "text_config"'):
        ml4.from_pretrained(tmp_path)


def test_save_refuses_a_config_changed_after_the_model_was_built(tmp_path):
    model = ml4.Llama4Text.random(small_text(), seed=0)
    model.cfg.vocab_size = 999  # wrote a checkpoint that neither we nor transformers could load
    with pytest.raises(ValueError, match=r"weights do not match model\.config .*nothing written:\n  mis-shaped \(2\): "
                                         r"lm_head\.weight \[320, 64\] \(config says \[999, 64\]\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.cfg.vocab_size = 320
    model.cfg.num_hidden_layers = 6  # no_rope_layers still has 4 entries
    with pytest.raises(ValueError, match=r"model\.config no longer validates: .*no_rope_layers"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(TypeError, match=r"path=None: expected a folder path"):
        model.save_pretrained(None)


def test_tied_weights_are_saved_as_two_tensors(tmp_path):
    """safetensors refuses tensors that share memory (and left the new folder behind)."""
    model = ml4.Llama4Text.random(small_text(), seed=0)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    back = ml4.from_pretrained(tmp_path / "tied")
    assert torch.equal(back.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_failed_save_removes_the_folder_it_made(tmp_path, monkeypatch):
    from minillama4 import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    model = ml4.Llama4Text.random(small_text(), seed=0)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # both folders it made
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()  # a folder that was there stays


@pytest.mark.parametrize("seed, error, match", [("a", TypeError, "seed='a': must be an integer"),
                                                (1.5, TypeError, "seed=1.5: must be an integer"),
                                                (2**70, ValueError, r"seed=1180591620717411303424: must lie in")])
def test_random_models_check_the_seed(seed, error, match):
    with pytest.raises(error, match=match):
        ml4.random_model(small_text(), seed=seed)
    with pytest.raises(error, match=match):
        ml4.Llama4Text.random(small_text(), seed=seed)


def test_mixed_stored_dtypes_need_a_dtype(saved):
    """dtype=None keeps the stored dtype: one F16 tensor among F32 ones made a mixed model whose
    forward failed ("expected m1 and m2 to have the same dtype")."""
    model, path = saved
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}))
    with pytest.raises(ValueError, match=r"several dtypes \(F16: 1, F32: \d+\); pass dtype="):
        ml4.from_pretrained(path)
    back = ml4.from_pretrained(path, dtype="fp32")
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=1e-3, atol=1e-3)
