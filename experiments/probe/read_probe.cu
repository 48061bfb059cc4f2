// Read-bandwidth probe for NF4 decode access patterns (no arithmetic: the loaded words are xor-folded and stored
// once per thread so the loads cannot be removed). N rows of K/2 bytes; grid (row blocks, split); 8 warps/block.
#include <cuda_runtime.h>
#include <cstdint>

namespace {
// A: warp = 16 rows; lane (g, t) reads 8 B of rows g and g+8 at offset 32 s + 8 t; 4 steps per group, double buffer
// B: warp = 16 rows; lane (g, t) reads 16 B of rows g and g+8 at offset 64 s + 16 t; 4 steps per group (256 B/row)
// C: warp = 16 rows; per instruction all 32 lanes read 16 B of one row (512 B contiguous); 16 rows per group
// D: like B with 8 steps per group (512 B per row per group)
template <int P>
__global__ void __launch_bounds__(256, 2) probe(const uint8_t* __restrict__ w, int N, int K, int k_per_split,
                                                 uint32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = (blockIdx.x * 8 + warp) * 16;
  const int64_t rb = K >> 1;
  const int kb = (blockIdx.y * k_per_split) >> 1, ke = min(K, (int)(blockIdx.y + 1) * k_per_split) >> 1;  // bytes
  uint32_t acc = 0;
  if (P == 0) {
    const uint8_t* p0 = w + min(r0 + g, N - 1) * rb + 8 * t;
    const uint8_t* p1 = w + min(r0 + g + 8, N - 1) * rb + 8 * t;
    for (int b = kb; b < ke; b += 128) {
      uint2 v[8];
#pragma unroll
      for (int s = 0; s < 4; ++s) { v[s] = __ldg((const uint2*)(p0 + b + 32 * s)); v[4 + s] = __ldg((const uint2*)(p1 + b + 32 * s)); }
#pragma unroll
      for (int s = 0; s < 8; ++s) acc ^= v[s].x ^ v[s].y;
    }
  } else if (P == 1 || P == 3) {
    constexpr int S = P == 1 ? 4 : 8;
    const uint8_t* p0 = w + min(r0 + g, N - 1) * rb + 16 * t;
    const uint8_t* p1 = w + min(r0 + g + 8, N - 1) * rb + 16 * t;
    for (int b = kb; b < ke; b += 64 * S) {
      uint4 v[2 * S];
#pragma unroll
      for (int s = 0; s < S; ++s) { v[s] = __ldg((const uint4*)(p0 + b + 64 * s)); v[S + s] = __ldg((const uint4*)(p1 + b + 64 * s)); }
#pragma unroll
      for (int s = 0; s < 2 * S; ++s) acc ^= v[s].x ^ v[s].y ^ v[s].z ^ v[s].w;
    }
  } else {
    for (int b = kb; b < ke; b += 512) {
      uint4 v[16];
#pragma unroll
      for (int r = 0; r < 16; ++r) v[r] = __ldg((const uint4*)(w + min(r0 + r, N - 1) * rb + b + 16 * lane));
#pragma unroll
      for (int r = 0; r < 16; ++r) acc ^= v[r].x ^ v[r].y ^ v[r].z ^ v[r].w;
    }
  }
  out[(blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x] = acc;
}
}  // namespace

extern "C" int lk_read_probe(int pattern, const void* w, int N, int K, int split, void* out, void* stream) {
  const int k_per_split = ((K / split + 1023) / 1024) * 1024;
  const dim3 grid((N + 127) / 128, (K + k_per_split - 1) / k_per_split);
  auto s = static_cast<cudaStream_t>(stream);
  auto o = static_cast<uint32_t*>(out);
  auto p = static_cast<const uint8_t*>(w);
  switch (pattern) {
    case 0: probe<0><<<grid, 256, 0, s>>>(p, N, K, k_per_split, o); break;
    case 1: probe<1><<<grid, 256, 0, s>>>(p, N, K, k_per_split, o); break;
    case 2: probe<2><<<grid, 256, 0, s>>>(p, N, K, k_per_split, o); break;
    case 3: probe<3><<<grid, 256, 0, s>>>(p, N, K, k_per_split, o); break;
  }
  return (int)cudaGetLastError();
}
