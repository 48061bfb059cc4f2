"""Compile the NF4 GEMV kernel for sm_90 offline (no GPU needed) and count the SASS of its main loop.

    python experiments/sass_gemv.py [--fma] [--join] [--block-n 128] [--block-k 128] [--warps 4] [--m-pad 8]
        [--dump FILE]

Prints registers, spills and, for the innermost loop (the basic block with the most instructions ending in a
backward branch), the instruction count per weight element (loop instructions x 32 lanes x warps / elements
per step) and a histogram of opcodes. Compile errors surface here the same way as on the GPU.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from lowrank_kernels.kernels.nf4_gemv import nf4_gemv_kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fma", action="store_true")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--m-pad", type=int, default=8)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--join", action="store_true", help="the joined-tile dot (join=True)")
    ap.add_argument("--dump", default=None)
    a = ap.parse_args()
    sig = {n: "i32" for n in nf4_gemv_kernel.arg_names}
    sig.update(x_ptr="*bf16", packed_ptr="*u8", absmax_ptr="*u8", absmax2_ptr="*fp32", code2_ptr="*fp32",
               offset_ptr="*fp32", code_ptr="*fp32", a_ptr="*fp32", ws_ptr="*fp32", ws_s_ptr="*fp32",
               x_desc="*bf16")
    const = dict(BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256, WORDS=True, EVEN_K=True, SHFL=True, FMA=a.fma,
                 M_PAD=1 if a.fma else a.m_pad, BLOCK_N=a.block_n, BLOCK_K=a.block_k, DOT_FP32=False,
                 INPUT_PRECISION="tf32", PDL=False, TMA=False, STAGES=1, JOIN=a.join, X_TMA=False)
    for k, v in const.items():
        sig[k] = "constexpr"
    src = ASTSource(nf4_gemv_kernel, sig, constexprs={(nf4_gemv_kernel.arg_names.index(k),): v
                                                       for k, v in const.items()})
    k = compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=a.warps, num_stages=1,
                                                                      enable_fp_fusion=False, maxnreg=a.maxnreg))
    sass = k.asm["sass"]
    if a.dump:
        open(a.dump, "w").write(sass)
        open(a.dump + ".ttgir", "w").write(k.asm["ttgir"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    print(" ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+)", res)))
    # basic blocks start at label lines (`LBB3:`); instruction lines are `<control>\t[@P0 ]OPCODE ...`
    blocks, cur = [], []
    for line in sass.splitlines():
        if re.match(r"\s*\.?\w+:\s*$", line):
            blocks.append(cur)
            cur = []
        m = re.match(r"[0-9a-fA-FY:-]+\t(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            cur.append(m.group(2))
    blocks.append(cur)
    loops = [b for b in blocks if b and b[-1].startswith("BRA")]
    body = max(loops, key=len)
    elems = a.block_n * a.block_k
    print(f"loop: {len(body)} instructions, {len(body) * 32 * a.warps / elems:.2f} per weight element")
    hist = collections.Counter(op.split(".")[0] for op in body)
    print("  " + "  ".join(f"{op} {n}" for op, n in hist.most_common(18)))


if __name__ == "__main__":
    main()
