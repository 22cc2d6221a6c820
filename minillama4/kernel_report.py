"""Compile this project's Triton kernels for an NVIDIA GPU on a machine without one, and count
the instructions they run: a check that they compile, and a way to reason about their speed.

    python -m minillama4.kernel_report            # every kernel, for sm_90 (H100/H200)
    python -m minillama4.kernel_report --arch 80  # A100

For each kernel it prints the registers per thread, whether registers spill to local memory,
and the machine instructions (SASS, from the cuobjdump that ships with Triton) of its main loop,
by opcode. For the int4 GEMVs it also prints instructions per weight byte: a multiprocessor
issues at most 4 x 32 instructions per cycle, so a kernel that needs I instructions per byte
cannot read faster than about 128 / I bytes per cycle per multiprocessor. On an H100 (132
multiprocessors, ~1.75 GHz under load) that is 20 per byte -> 1.5 TB/s and 8 per byte -> 3.7 TB/s,
against 3.0 TB/s of copy bandwidth (docs/benchmarks.md).

As at run time, pointers and strides are declared divisible by 16 (Triton's JIT specialises on
that), so loads vectorise as they will on the GPU. The compiler here may be a newer Triton than
the GPU machine's: counts can differ a little; a kernel that fails to compile here will very
likely fail there too, which is what tests/test_kernel_report.py checks.

Simplifications: static counts of the loop body (the largest backward branch), not a profile;
no timing. Needs Triton with its NVIDIA backend (Linux x86-64 wheels have it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

SIZE_HINTS = ("N", "SLOTS", "D", "F", "PER_SPLIT")  # int arguments that are multiples of 16 for Scout


@dataclass
class Report:
    name: str  # kernel and configuration
    registers: int  # per thread
    spills: bool  # whether registers spill to local memory (slow)
    loop: list[str]  # the main loop's instructions (SASS); the whole kernel if it has no loop
    looped: bool  # whether `loop` is a loop body
    bytes_per_trip: float | None = None  # weight bytes one thread reads per trip of that loop (GEMVs)

    @property
    def per_byte(self) -> float | None:
        return len(self.loop) / self.bytes_per_trip if self.bytes_per_trip else None

    def line(self) -> str:
        ops = collections.Counter(_opcode(i) for i in self.loop).most_common(8)
        rate = f"{self.per_byte:5.1f} instr/B" if self.per_byte else " " * 13
        return (f"{self.name:40s} regs {self.registers:3d}{' SPILLS' if self.spills else '       '} "
                f"{'loop' if self.looped else 'all '} {len(self.loop):5d}  {rate}  " + " ".join(f"{o} {c}" for o, c in ops))


def _tools():
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bin_dir, "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise RuntimeError(f"no cuobjdump in {bin_dir}: this Triton has no NVIDIA backend")
    return cuobjdump


def compile_kernel(fn, signature: dict, constexprs: dict, warps: int = 4, arch: int = 90):
    """fn (a @triton.jit function) compiled for sm_<arch>; signature maps every argument to its
    type ("*bf16", "i32", "fp32", ... or "constexpr")."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    hints = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty != "constexpr" and (ty.startswith("*") or name.startswith("stride") or name in SIZE_HINTS)}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=hints)
    # FMA fusion on, as every Triton up to 3.9 does by default (3.10 is to turn it off by default)
    return triton_compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps,
                                                                              "enable_fp_fusion": True})


def _opcode(instruction: str) -> str:
    words = instruction.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


def _loop(sass: str) -> list[str]:
    """The instructions between a backward branch's target and the branch: the largest such span."""
    lines = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
    best: list[str] = []
    for i, (address, text) in enumerate(lines):
        jump = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address:
            body = [t for a, t in lines[:i + 1] if a >= int(jump.group(1), 16)]
            best = body if len(body) > len(best) else best
    return best


def report(name: str, kernel, bytes_per_trip: float | None = None) -> Report:
    cuobjdump = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = bool(re.search(r"\b(STL|LDL)\b", sass))
    loop = _loop(sass)
    everything = [t.strip() for t in re.findall(r"/\*[0-9a-f]{4}\*/\s+(.*?);", sass)]
    return Report(name, registers, spills, loop or everything, bool(loop), bytes_per_trip)


_GEMV_ARGS = {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*u8", "s_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32",
              "G": "i32", "GROUPS_PER_SPLIT": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wn": "i32",
              "stride_se": "i32", "stride_sg": "i32", "stride_ys": "i32", "stride_ym": "i32"}


def gemv_reports(arch: int = 90, even: bool = True) -> list[Report]:
    """The int4 GEMVs in every tile the tuner tries (w4a16.py), group 128, bf16 inputs."""
    from . import w4a16

    out = []
    for block_n, groups, warps in w4a16.INT4_TILES:
        for variant in w4a16.INT4_VARIANTS:
            sig = {**_GEMV_ARGS, "GROUP": "constexpr", "BLOCK_N": "constexpr", "GROUPS": "constexpr", "MAGIC": "constexpr",
                   "EVEN": "constexpr"}
            k = compile_kernel(w4a16._w4a16_rows, sig, {"GROUP": 128, "BLOCK_N": block_n, "GROUPS": groups,
                                                        "MAGIC": variant == "magic", "EVEN": even}, warps, arch)
            out.append(report(f"w4a16 bytes {variant} {block_n}x{groups} w{warps}{'' if even else ' masked'}", k,
                              block_n * 64 * groups / (32 * warps)))
    words = {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*bf16", "w2_ptr": "*i32", "s2_ptr": "*bf16",
             "w3_ptr": "*i32", "s3_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "N1": "i32", "N2": "i32", "G": "i32",
             "GROUPS_PER_SPLIT": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_se": "i32",
             "stride_sg": "i32", "stride_sg2": "i32", "stride_sg3": "i32", "stride_ys": "i32", "stride_ym": "i32",
             "MAGIC_BITS": "i32", "GROUP": "constexpr", "BLOCK_N": "constexpr", "GROUPS": "constexpr",
             "EVEN": "constexpr", "ASM": "constexpr", "PARTS": "constexpr"}
    for parts in (1, 3):  # one matrix (experts, a linear), three side by side (q, k, v)
        for block_n, groups, warps in w4a16.WORD_TILES if parts == 1 else w4a16.WORD_TILES[1:2]:
            k = compile_kernel(w4a16._w4a16_words, words, {"GROUP": 128, "BLOCK_N": block_n, "GROUPS": groups,
                                                           "EVEN": even, "ASM": True, "PARTS": parts}, warps, arch)
            out.append(report(f"w4a16 words {block_n}x{groups} w{warps}{'' if even else ' masked'}"
                              f"{f' {parts} parts' if parts > 1 else ''}", k, block_n * 64 * groups / (32 * warps)))
    return out


def fused_reports(arch: int = 90) -> list[Report]:
    """fused.py's kernels and the dense row kernel, bf16, at Scout's sizes."""
    from . import fused, w4a16

    c = "constexpr"
    attention = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "sp_ptr": "*i64", "pos_ptr": "*i64",
                 "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "KV": "i32", "SLOTS": "i32", "PER_SPLIT": "i32",
                 "SPLITS": "i32", "CHUNK": "i32", "scale": "fp32", "stride_qb": "i32", "stride_qh": "i32",
                 "stride_kb": "i32", "stride_kh": "i32", "stride_ks": "i32", "G": c, "G_PAD": c, "DH": c,
                 "BLOCK_S": c, "CHUNKED": c, "FP32_DOT": c}
    norm = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "delta_ptr": "*bf16", "sum_ptr": "*bf16", "D": "i32",
            "eps": "fp32", "stride_xr": "i32", "stride_yr": "i32", "stride_dr": "i32", "stride_sr": "i32",
            "HAS_WEIGHT": c, "HAS_DELTA": c, "BLOCK": c}
    qk = {"q_ptr": "*bf16", "k_ptr": "*bf16", "cs_ptr": "*fp32", "pos_ptr": "*i64", "qo_ptr": "*bf16", "ko_ptr": "*bf16",
          "RQ": "i32", "H": "i32", "KVH": "i32", "T": "i32", "J": "i32", "eps": "fp32", "attn_scale": "fp32",
          "FLOOR": "i32", "stride_qb": "i32", "stride_qt": "i32", "stride_kb": "i32", "stride_kt": "i32",
          "ROPE": c, "NORM": c, "TEMP": c, "BLOCK": c}
    cases = [
        ("decode_attention chunked", fused._decode_attention, attention,
         {"G": 5, "G_PAD": 16, "DH": 128, "BLOCK_S": 64, "CHUNKED": True, "FP32_DOT": False}, 4),
        ("decode_attention full", fused._decode_attention, attention,
         {"G": 5, "G_PAD": 16, "DH": 128, "BLOCK_S": 64, "CHUNKED": False, "FP32_DOT": False}, 4),
        ("decode_attention_combine", fused._decode_attention_combine,
         {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": "*bf16", "SPLITS": "i32", "DH": c,
          "SPLITS_PAD": c}, {"DH": 128, "SPLITS_PAD": 32}, 4),
        ("rms_norm", fused._rms_norm_rows, norm, {"HAS_WEIGHT": True, "HAS_DELTA": False, "BLOCK": 8192}, 8),
        ("add_rms_norm", fused._rms_norm_rows, norm, {"HAS_WEIGHT": True, "HAS_DELTA": True, "BLOCK": 8192}, 8),
        ("qk_prepare rope+norm", fused._qk_rows, qk, {"ROPE": True, "NORM": True, "TEMP": False, "BLOCK": 64}, 4),
        ("qk_prepare temperature", fused._qk_rows, qk, {"ROPE": False, "NORM": False, "TEMP": True, "BLOCK": 64}, 4),
        ("silu_mul", fused._silu_mul, {"g_ptr": "*bf16", "u_ptr": "*bf16", "y_ptr": "*bf16", "F": "i32",
                                       "stride_g": "i32", "stride_u": "i32", "stride_y": "i32", "BLOCK": c},
         {"BLOCK": 1024}, 4),
        ("cache_write", fused._cache_write, {"k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "keys_ptr": "*bf16",
                                             "values_ptr": "*bf16", "slot_pos_ptr": "*i64", "H": "i32", "SLOTS": "i32",
                                             "DH": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_cb": "i32",
                                             "stride_ch": "i32", "stride_cs": "i32", "BLOCK": c}, {"BLOCK": 128}, 4),
        ("top_k_gates", fused._top_k_gates, {"l_ptr": "*bf16", "ids_ptr": "*i64", "g_ptr": "*bf16", "E": "i32",
                                             "stride_l": "i32", "K": c, "BLOCK": c}, {"K": 1, "BLOCK": 16}, 1),
        ("mask_rows", fused._mask_rows, {"q_ptr": "*i64", "k_ptr": "*i64", "m_ptr": "*i8", "S": "i32", "CHUNK": "i32",
                                         "BLOCK": c, "CHUNKED": c}, {"BLOCK": 1024, "CHUNKED": True}, 4),
        ("dense_rows", w4a16._dense_rows, {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*bf16", "y_ptr": "*bf16",
                                           "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32",
                                           "stride_we": "i32", "stride_wk": "i32", "stride_ys": "i32", "stride_ym": "i32",
                                           "BLOCK_N": c, "BLOCK_K": c}, {"BLOCK_N": 64, "BLOCK_K": 32}, 4),
        ("dequantize_tiles", w4a16._dequantize_tiles, {"w_ptr": "*u8", "s_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
                                                       "stride_we": "i32", "stride_wn": "i32", "stride_se": "i32",
                                                       "stride_sg": "i32", "stride_oe": "i32", "stride_on": "i32",
                                                       "stride_ok": "i32", "GROUP": c, "BLOCK_N": c},
         {"GROUP": 128, "BLOCK_N": 64}, 4),
    ]
    return [report(name, compile_kernel(fn, sig, consts, warps, arch)) for name, fn, sig, consts, warps in cases]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m minillama4.kernel_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    args = p.parse_args(argv)
    print(f"Triton kernels compiled for sm_{args.arch}: SASS instructions of the main loop ('loop') or of the "
          f"whole kernel ('all'), by opcode")
    for r in gemv_reports(args.arch) + fused_reports(args.arch):
        print(r.line())


if __name__ == "__main__":
    main()
