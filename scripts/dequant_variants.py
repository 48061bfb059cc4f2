"""Variants of the word dequant kernel on the GPU: L2 eviction hints, and a persistent grid with prefetch.

    python scripts/dequant_variants.py   -> bench/results/dequant-variants-h100.txt

``library words`` is ``nf4_dequant_words_kernel`` as it was without hints; ``hinted`` is the same kernel with the
packed loads ``evict_first`` (load1) and / or the stores ``.cs`` (streaming, store1), which the library kernel now
uses (both); ``persistent`` runs ``per_sm`` programs per SM, each looping over chunks and loading the next chunk's
words and scales before computing the current one. 8 weights per CUDA graph, ``do_bench_cudagraph`` medians; the
outputs are 8 distinct preallocated buffers (no L2 reuse between calls).
"""
import torch
import triton
import triton.language as tl

from lowrank_kernels import NF4Weight
from lowrank_kernels.kernels.nf4_code import nf4_word_codes
from lowrank_kernels.kernels.nf4_dequant import nf4_block_scale
from lowrank_kernels.kernels.rounding import round_fp32_to


@triton.jit
def _store_chunk(out_ptr, rows, w, am, n_words, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, SHFL: tl.constexpr,
                 code_ptr, STORE_HINT: tl.constexpr):
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_word_codes(w, code_ptr, SHFL)
    d0, d1, d2, d3 = round_fp32_to(c0 * am, dtype), round_fp32_to(c1 * am, dtype), round_fp32_to(c2 * am, dtype), \
        round_fp32_to(c3 * am, dtype)
    d4, d5, d6, d7 = round_fp32_to(c4 * am, dtype), round_fp32_to(c5 * am, dtype), round_fp32_to(c6 * am, dtype), \
        round_fp32_to(c7 * am, dtype)
    v = tl.join(tl.join(tl.join(d0, d4), tl.join(d2, d6)), tl.join(tl.join(d1, d5), tl.join(d3, d7)))
    elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if STORE_HINT:
        tl.store(out_ptr + elem, tl.reshape(v, (ROWS, BLOCKSIZE)), mask=elem < n_words * 8, cache_modifier=".cs")
    else:
        tl.store(out_ptr + elem, tl.reshape(v, (ROWS, BLOCKSIZE)), mask=elem < n_words * 8)


@triton.jit
def persistent_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_words,
                      nchunks, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
                      SHFL: tl.constexpr, LOAD_HINT: tl.constexpr, STORE_HINT: tl.constexpr):
    WPB: tl.constexpr = BLOCKSIZE // 8
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    wp = packed_ptr.to(tl.pointer_type(tl.uint32))
    offset = tl.load(offset_ptr)
    rows_n = pid * ROWS + tl.arange(0, ROWS)
    word = rows_n[:, None] * WPB + tl.arange(0, WPB)[None, :]
    if LOAD_HINT:
        w_n = tl.load(wp + word, mask=word < n_words, other=0, eviction_policy="evict_first")
    else:
        w_n = tl.load(wp + word, mask=word < n_words, other=0)
    r_ok = rows_n * WPB < n_words
    q_n = tl.load(absmax_ptr + rows_n, mask=r_ok, other=0).to(tl.int32)
    s2_n = tl.load(absmax2_ptr + rows_n // NESTED_BLOCKSIZE, mask=r_ok, other=0.0)
    for c in range(pid, nchunks, nprog):
        rows, w, q, s2 = rows_n, w_n, q_n, s2_n
        rows_n = rows + nprog * ROWS
        word = rows_n[:, None] * WPB + tl.arange(0, WPB)[None, :]
        if LOAD_HINT:
            w_n = tl.load(wp + word, mask=word < n_words, other=0, eviction_policy="evict_first")
        else:
            w_n = tl.load(wp + word, mask=word < n_words, other=0)
        r_ok = rows_n * WPB < n_words
        q_n = tl.load(absmax_ptr + rows_n, mask=r_ok, other=0).to(tl.int32)
        s2_n = tl.load(absmax2_ptr + rows_n // NESTED_BLOCKSIZE, mask=r_ok, other=0.0)
        am = (tl.load(code2_ptr + q) * s2 + offset)[:, None]
        _store_chunk(out_ptr, rows, w, am, n_words, BLOCKSIZE, ROWS, SHFL, code_ptr, STORE_HINT)


@triton.jit
def hinted_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_words,
                  BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, SHFL: tl.constexpr,
                  LOAD_HINT: tl.constexpr, STORE_HINT: tl.constexpr):
    WPB: tl.constexpr = BLOCKSIZE // 8
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    word = rows[:, None] * WPB + tl.arange(0, WPB)[None, :]
    am = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, rows * WPB < n_words, True,
                         NESTED_BLOCKSIZE)[:, None]
    wp = packed_ptr.to(tl.pointer_type(tl.uint32))
    if LOAD_HINT:
        w = tl.load(wp + word, mask=word < n_words, other=0, eviction_policy="evict_first")
    else:
        w = tl.load(wp + word, mask=word < n_words, other=0)
    _store_chunk(out_ptr, rows, w, am, n_words, BLOCKSIZE, ROWS, SHFL, code_ptr, STORE_HINT)


def main():
    n = 1 << 30
    src, dst = torch.empty(n // 4, device="cuda"), torch.empty(n // 4, device="cuda")
    copy_bw = 2 * n / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    print(f"device copy {copy_bw / 1e9:.0f} GB/s")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for shape in [(4096, 4096), (14336, 4096)]:
        ws = [NF4Weight.quantize(torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
        ref = ws[0].dequantize(backend="torch").view(-1)
        nbytes = ws[0].nbytes() + ws[0].numel() * 2
        outs = [torch.empty(ws[0].numel(), device="cuda", dtype=torch.bfloat16) for _ in ws]

        def row(label, fn):
            fn(ws[0], outs[0])
            assert torch.equal(outs[0], ref), label
            ms = triton.testing.do_bench_cudagraph(lambda: [fn(w, o) for w, o in zip(ws, outs)],
                                                   return_mode="median") / len(ws)
            print(f"{str(shape):14} {label:40} {ms * 1e3:7.2f} {100 * nbytes / (ms * 1e-3) / copy_bw:6.1f}%",
                  flush=True)

        pairs = [(torch.randn(nbytes // 4, device="cuda", dtype=torch.bfloat16), o) for o in outs]
        ms = triton.testing.do_bench_cudagraph(lambda: [torch.neg(a, out=b[:nbytes // 4]) for a, b in pairs],
                                               return_mode="median") / len(ws)
        print(f"{str(shape):14} {'copy (same bytes)':40} {ms * 1e3:7.2f} {100 * nbytes / (ms * 1e-3) / copy_bw:6.1f}%")
        for elems, warps in [(2048, 1), (2048, 2), (2048, 4)]:
            row(f"library words {elems}/{warps}", lambda w, o: _lib(w, o, elems, warps))
            for lh, sh in [(1, 0), (0, 1), (1, 1)]:
                row(f"hinted {elems}/{warps} load{lh} store{sh}", lambda w, o: hinted_kernel[
                    (triton.cdiv(w.numel() // 8, elems // 8),)](
                    w.packed, w.absmax, w.absmax2, w.code2, w.offset.reshape(1), w.code, o, w.numel() // 8,
                    BLOCKSIZE=64, NESTED_BLOCKSIZE=256, ROWS=elems // 64, SHFL=True, LOAD_HINT=lh, STORE_HINT=sh,
                    num_warps=warps, enable_fp_fusion=False))
        for elems, warps, per_sm in [(1024, 1, 16), (1024, 1, 32), (2048, 1, 16), (2048, 2, 8), (2048, 2, 16),
                                     (2048, 4, 8), (4096, 4, 4), (4096, 4, 8), (4096, 8, 4)]:
            for lh, sh in [(0, 0), (1, 1)]:
                nchunks = triton.cdiv(ws[0].numel() // 64, elems // 64)
                row(f"persistent {elems}/{warps} x{per_sm}/SM hints {lh}{sh}", lambda w, o: persistent_kernel[
                    (min(nchunks, sms * per_sm),)](
                    w.packed, w.absmax, w.absmax2, w.code2, w.offset.reshape(1), w.code, o, w.numel() // 8, nchunks,
                    BLOCKSIZE=64, NESTED_BLOCKSIZE=256, ROWS=elems // 64, SHFL=True, LOAD_HINT=lh, STORE_HINT=sh,
                    num_warps=warps, enable_fp_fusion=False))


def _lib(w, o, elems, warps):
    from lowrank_kernels.kernels.nf4_dequant import nf4_dequant_words_kernel

    nf4_dequant_words_kernel[(triton.cdiv(w.numel() // 64, elems // 64),)](
        w.packed, w.absmax, w.absmax2, w.code2, w.offset.reshape(1), w.code, o, w.numel() // 8,
        BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256, ROWS=elems // 64, SHFL=True, num_warps=warps,
        enable_fp_fusion=False)


if __name__ == "__main__":
    main()
