// The host entry points of the CUDA kernels of this folder, as the torch operators call them: nf4_mma_gemv.cu
// defines lk_nf4_mma_gemv (operator in nf4_mma_gemv_op.cpp), nf4_merge_mma.cu defines lk_nf4_merge (operator in
// nf4_merge_mma_op.cpp). Plain C types only, so that the operator files need no CUDA device headers; both sides
// include this header, so the compiler checks that they agree. Each returns a cudaError_t as int (0: launched).
#pragma once

#include <cstdint>

// dtype codes of the entry points (lk::DType of nf4_common.cuh: the .cu files check that they agree)
#define LK_DTYPE_F32 0
#define LK_DTYPE_F16 1
#define LK_DTYPE_BF16 2

// nf4_mma_gemv.cu: ws [n_split, M, N] and ws_s [n_split, M, R] (fp32, contiguous) = the partial sums of the K slices
// of x @ deq(W).T and x @ round(A).T. x_dtype: LK_DTYPE_F16 or LK_DTYPE_BF16; a_dtype: any of the three;
// nested_log2 < 0: not double-quantized (absmax2, code2, offset unused). Preconditions in nf4_mma_gemv.cu.
extern "C" int lk_nf4_mma_gemv(const void* x, int x_dtype, int64_t stride_xm, int M, const void* packed,
                               const void* absmax, const void* absmax2, const void* code2, const void* offset,
                               const void* code, int blocksize_log2, int nested_log2, const void* a, int a_dtype,
                               int64_t stride_ar, int64_t stride_ak, void* ws, void* ws_s, int N, int K, int R,
                               int k_per_split, int n_split, int warps, int device, void* stream);

// nf4_merge_mma.cu: out [N, K] = round(deq(W) + scaling * b @ a) in dtype (LK_DTYPE_F16 or LK_DTYPE_BF16, also the
// dtype of a and b). Preconditions in nf4_merge_mma.cu.
extern "C" int lk_nf4_merge(const void* packed, const void* absmax, const void* absmax2, const void* code2,
                            const void* offset, const void* code, int blocksize_log2, int nested_log2, const void* a,
                            int64_t sar, int64_t sak, const void* b, int R, float scaling,
                            void* out, int dtype, int N, int K, int warps, int device, void* stream);
