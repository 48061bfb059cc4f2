// Shared by the CUDA kernels of csrc/: the dtype codes of the host entry points (nf4_entry.h), the NF4 weight as
// the kernels read it, and the tensor-core product they use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lk {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr unsigned kFull = 0xffffffffu;  // all lanes of a warp (shuffles)

// W is bitsandbytes' NF4 layout: byte j of row n holds element 2j in its high nibble and 2j + 1 in its low
// nibble; the scale of element (n, k) is absmax[(n*K + k) / blocksize], fp32, or when double-quantized
// fp32(fp32(code2[q] * absmax2[b / nested_blocksize]) + offset) with q the uint8 code of block b.
struct NF4 {
  const uint8_t* packed;  // [N * K / 2]
  const void* absmax;     // uint8 [blocks] (nested) or fp32 [blocks]
  const float* absmax2;   // fp32 [cdiv(blocks, nested_blocksize)] (nested only)
  const float* code2;     // fp32 [256] (nested only)
  const float* offset;    // fp32 [1] (nested only)
  const float* code;      // fp32 [16]
  int blocksize_log2;     // log2(blocksize); the kernels need blocksize >= 64
  int nested_log2;        // log2(nested_blocksize) (nested only)
};

// D = A (16 x 16, row) . B (16 x 8, col) + D, fp32 accumulators; A and B packed pairs of T
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace lk
