// NF4 decode GEMM (M <= 16 activation rows) on tensor cores, the weight dequantized in registers:
//
//   ws  [split, M, N] = x [M, K-slice] @ deq(W [N, K-slice]).T   (fp32 partial sums, one per K slice)
//   ws_s[split, M, r] = x [M, K-slice] @ round(A [r, K-slice]).T
//
// The LoRA term, the bias, the sum over slices and the rounding are left to the finish kernel (Triton,
// nf4_gemv_finish_kernel), which reads the two workspaces in a fixed order.
//
// W is bitsandbytes' NF4 layout (nf4_common.cuh).
//
// Dequantization: one lookup yields two elements. A byte of W indexes a 256-entry table of packed pairs
// (code[hi], code[lo]) in x's 16-bit type, replicated once per lane so that lane l always reads bank l (no bank
// conflicts); the entry of (byte, lane) sits at byte offset byte << 8 | lane << 2, so its address is one
// byte_perm of the packed word with the lane's offset (64 KB of shared memory, half of it unused, buy the
// one-instruction address). The pairs are exactly the A-operand registers of mma.m16n8k16, so a byte costs a
// byte_perm and a shared load, and the multiply-add is the tensor core's. The block scale multiplies the fp32
// product of each 64-element step (one FMA per output row), so the dequantized weight is code * absmax with the
// code rounded to x's type (bf16: 2^-9 relative; products and sums in fp32).
//
// Work decomposition: a warp owns 16 rows of W and one K slice (blockIdx.y); blockDim.x / 32 warps per block
// share the table. Thread (g = lane / 4, t = lane % 4) reads bytes [8t, 8t + 8) of each 32-byte (64-element)
// row segment of rows g and g + 8: one 8-byte load per row and step. mma i of a step takes its bytes 2i and
// 2i + 1, i.e. the actual elements 16t + 4i ... 16t + 4i + 3; the matching x elements come from the same
// positions (the dot product is invariant to permuting k consistently in both operands). The weight loads of the
// next two 256-element groups (one with two n-tiles) are in flight while a group is computed: a ring of group
// buffers in registers, each refilled as soon as it has been computed; the first loads go out before the table is
// built.
// The first s_blocks blocks compute the partial S instead, a (rank, up to 8 x rows) item per warp: they come first
// so that their long serial K loops start with the grid instead of trailing it.
#include "nf4_common.cuh"
#include "nf4_entry.h"

static_assert(lk::kF32 == LK_DTYPE_F32 && lk::kF16 == LK_DTYPE_F16 && lk::kBF16 == LK_DTYPE_BF16,
              "nf4_entry.h: dtype codes");

namespace {

using namespace lk;

constexpr int kGroupK = 256;  // K per pipeline stage: 4 steps of 64 elements
constexpr int kMaxThreads = 256;

template <typename T> __device__ __forceinline__ uint16_t bits_of(float v);
template <> __device__ __forceinline__ uint16_t bits_of<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ uint16_t bits_of<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }

template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  if (dtype == kF32) return __ldg(static_cast<const float*>(p) + i);
  if (dtype == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// The raw loads of one 256-element group for rows g and g + 8: 4 steps x 8 bytes of W per row, and the row's
// scale data (SPG = 256 / blocksize scale blocks, 1 when blocksize >= 256).
template <bool NESTED> struct Group;
template <> struct Group<true> {
  uint2 w[4][2];
  uint32_t q[2];  // SPG uint8 codes, little-endian
  float s[2][1];  // absmax2
};
template <> struct Group<false> {
  uint2 w[4][2];
  uint32_t q[2];  // unused
  float s[2][4];  // the SPG fp32 absmax values
};

template <bool NESTED>
__device__ __forceinline__ void load_group(Group<NESTED>& gr, const NF4& f, const int64_t (&row)[2], int K, int k0,
                                           int t) {
  const int64_t row_bytes = K >> 1;
  const int spg_log2 = f.blocksize_log2 >= 8 ? 0 : 8 - f.blocksize_log2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint8_t* p = f.packed + row[r] * row_bytes + (k0 >> 1) + 8 * t;
#pragma unroll
    for (int s = 0; s < 4; ++s) gr.w[s][r] = __ldg(reinterpret_cast<const uint2*>(p + 32 * s));
    const int64_t blk = (row[r] * K + k0) >> f.blocksize_log2;
    if constexpr (NESTED) {
      const uint8_t* q = static_cast<const uint8_t*>(f.absmax) + blk;
      gr.q[r] = spg_log2 == 2 ? __ldg(reinterpret_cast<const uint32_t*>(q))
              : spg_log2 == 1 ? (uint32_t)__ldg(reinterpret_cast<const uint16_t*>(q))
                              : (uint32_t)__ldg(q);
      gr.s[r][0] = __ldg(f.absmax2 + (blk >> f.nested_log2));
    } else {
      const float* a = static_cast<const float*>(f.absmax) + blk;
      if (spg_log2 == 2) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(a));
        gr.s[r][0] = v.x; gr.s[r][1] = v.y; gr.s[r][2] = v.z; gr.s[r][3] = v.w;
      } else if (spg_log2 == 1) {
        const float2 v = __ldg(reinterpret_cast<const float2*>(a));
        gr.s[r][0] = v.x; gr.s[r][1] = v.y;
      } else {
        gr.s[r][0] = __ldg(a);
      }
    }
  }
}

// x rows per S work item: M rounded up to a power of two, at most 8 (few rows loaded for nothing)
__host__ __device__ __forceinline__ int s_rows(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

// Partial S over the K slice [k_begin, k_end), one warp per (rank, MR = s_rows(M) x rows): work item
// i = sblock * warps + warp takes rank i % R and rows MR (i / R) ... MR (i / R) + MR - 1 (clamped to M - 1, so that
// the row loads are unconditional and go out together; rows past M are not stored). Lane l reads 8 consecutive
// elements per 256. (One warp per rank over all M rows, each row's load behind a branch, was a serial chain that
// outlasted the weight stream at M >= 8: bench/results/gemv-mma-s-items-h100.txt.)
template <typename T, int MR>
__device__ void lora_s_partial(const T* __restrict__ x, int64_t stride_xm, int M, const void* a, int a_dtype,
                               int64_t stride_ar, int64_t stride_ak, float* __restrict__ ws_s, int R, int split,
                               int sblock, int k_begin, int k_end) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int item = sblock * (blockDim.x >> 5) + warp;
  const int rank = item % R, m0 = MR * (item / R);
  if (m0 >= M) return;
  const T* xr[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) xr[m] = x + min(m0 + m, M - 1) * stride_xm;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;
#pragma unroll 2
  for (int k = k_begin + 8 * lane; k < k_end; k += 256) {
    float av[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) av[e] = round_to<T>(load_any(a, a_dtype, rank * stride_ar + (int64_t)(k + e) * stride_ak));
    uint4 v[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) v[m] = __ldg(reinterpret_cast<const uint4*>(xr[m] + k));
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const T* xe = reinterpret_cast<const T*>(&v[m]);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[m] = fmaf(to_f32<T>(xe[e]), av[e], acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    if (lane == 0 && m0 + m < M) ws_s[((int64_t)split * M + m0 + m) * R + rank] = v;
  }
}

constexpr int kLutBytes = 256 * 64 * 4;

template <typename T, int NT, bool NESTED>
__global__ void __launch_bounds__(kMaxThreads, 2) nf4_mma_gemv_kernel(
    const T* __restrict__ x, int64_t stride_xm, int M, NF4 f, const void* a, int a_dtype, int64_t stride_ar,
    int64_t stride_ak, float* __restrict__ ws, float* __restrict__ ws_s, int N, int K, int R, int k_per_split,
    int s_blocks) {
  // [byte][64 slots of 4 bytes], slot l < 32 for lane l: the pair (T(code[byte >> 4]), T(code[byte & 15])) packed
  // low-high. The byte offset of (byte, lane) is byte << 8 | lane << 2: one byte_perm of the packed word and the
  // lane's offset (slots 32..63 are unused: the 64 KB buy a one-instruction address).
  extern __shared__ uint32_t lut[];
  __shared__ float code2_s[256];
  const int split = blockIdx.y;
  const int k_begin = split * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  if ((int)blockIdx.x < s_blocks) {
    const int sb = blockIdx.x;
    switch (s_rows(M)) {
      case 1: lora_s_partial<T, 1>(x, stride_xm, M, a, a_dtype, stride_ar, stride_ak, ws_s, R, split, sb, k_begin,
                                   k_end); break;
      case 2: lora_s_partial<T, 2>(x, stride_xm, M, a, a_dtype, stride_ar, stride_ak, ws_s, R, split, sb, k_begin,
                                   k_end); break;
      case 4: lora_s_partial<T, 4>(x, stride_xm, M, a, a_dtype, stride_ar, stride_ak, ws_s, R, split, sb, k_begin,
                                   k_end); break;
      default: lora_s_partial<T, 8>(x, stride_xm, M, a, a_dtype, stride_ar, stride_ak, ws_s, R, split, sb, k_begin,
                                    k_end);
    }
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = ((blockIdx.x - s_blocks) * (blockDim.x >> 5) + warp) * 16 + g;
  const int64_t row[2] = {min(n0, N - 1), min(n0 + 8, N - 1)};  // clamped: loads stay in bounds

  // a ring of RING groups in registers (3 for one n-tile, 2 for two: what fits 128 registers without spills): the
  // first RING groups' loads go out before the table is built, and each buffer is refilled with the group RING
  // ahead as soon as it has been computed (no register copies)
  constexpr int RING = NT == 1 ? 3 : 2;
  Group<NESTED> buf[RING];
#pragma unroll
  for (int u = 0; u < RING; ++u)
    if (k_begin + u * kGroupK < k_end) load_group<NESTED>(buf[u], f, row, K, k_begin + u * kGroupK, t);
  // one load of the code per thread (lane l holds code[l % 16]); the table entries take it by shuffle (b is the
  // same across a warp), so building the table waits on a single load instead of one per entry
  const float code_l = __ldg(f.code + (threadIdx.x & 15));
#pragma unroll 4
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
    const int b = i >> 5;
    lut[(b << 6) | (i & 31)] = (uint32_t)bits_of<T>(__shfl_sync(kFull, code_l, b >> 4))
                             | ((uint32_t)bits_of<T>(__shfl_sync(kFull, code_l, b & 15)) << 16);
  }
  if (NESTED) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_s[i] = __ldg(f.code2 + i);
  }
  const float offset = NESTED ? __ldg(f.offset) : 0.f;
  __syncthreads();

  const char* lut_b = reinterpret_cast<const char*>(lut);
  const uint32_t lane4 = (uint32_t)lane << 2;
  const int spg_log2 = f.blocksize_log2 >= 8 ? 0 : 8 - f.blocksize_log2;
  // the table entry of byte b (0..3) of word w for this lane
  auto lookup = [&](uint32_t w, int b) {
    return *reinterpret_cast<const uint32_t*>(lut_b + __byte_perm(w, lane4, 0x5504u | (b << 4)));
  };

  // x rows of this thread's B fragments, at element k_begin + 16 t: column g of n-tile j is x row 8j + g. Rows past
  // M read row 0 instead: they only feed output columns that are never stored.
  const uint4* xp[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = 8 * j + g < M ? 8 * j + g : 0;
    xp[j] = reinterpret_cast<const uint4*>(x + (int64_t)m * stride_xm + k_begin + 16 * t);
  }

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  // acc += the products of the group in cur (elements k0 ... k0 + 255 of the slice: x at xg)
  auto compute = [&](const Group<NESTED>& cur, const uint4* const (&xg)[NT]) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      float am[2];
      const int si = (s << spg_log2) >> 2;  // scale block of step s within the group
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if constexpr (NESTED) {
          const uint32_t q = (cur.q[r] >> (8 * si)) & 0xffu;
          am[r] = __fadd_rn(__fmul_rn(code2_s[q], cur.s[r][0]), offset);
        } else {
          am[r] = si == 0 ? cur.s[r][0] : si == 1 ? cur.s[r][1] : si == 2 ? cur.s[r][2] : cur.s[r][3];
        }
      }
      // x fragments of this step: elements k0 + 64 s + 16 t + [0, 16) of each row
      uint4 xv[NT][2];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        xv[j][0] = __ldg(xg[j] + 8 * s);
        xv[j][1] = __ldg(xg[j] + 8 * s + 1);
      }
      float c[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // bytes 2i, 2i + 1 of the row's 8: word i >> 1, bytes 2 (i & 1) and 2 (i & 1) + 1
        const uint32_t w0 = i < 2 ? cur.w[s][0].x : cur.w[s][0].y;
        const uint32_t w1 = i < 2 ? cur.w[s][1].x : cur.w[s][1].y;
        const int b = 2 * (i & 1);
        uint32_t av[4];
        av[0] = lookup(w0, b);
        av[1] = lookup(w1, b);
        av[2] = lookup(w0, b + 1);
        av[3] = lookup(w1, b + 1);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4& v = xv[j][i >> 1];
          mma<T>(c[j], av, (i & 1) ? v.z : v.x, (i & 1) ? v.w : v.y);
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j][0] = fmaf(c[j][0], am[0], acc[j][0]);
        acc[j][1] = fmaf(c[j][1], am[0], acc[j][1]);
        acc[j][2] = fmaf(c[j][2], am[1], acc[j][2]);
        acc[j][3] = fmaf(c[j][3], am[1], acc[j][3]);
      }
    }
  };

  for (int k0 = k_begin; k0 < k_end; k0 += RING * kGroupK) {
#pragma unroll
    for (int u = 0; u < RING; ++u) {
      const int kg = k0 + u * kGroupK;
      if (kg < k_end) {
        const uint4* xg[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) xg[j] = xp[j] + (kg - k_begin) / 8;
        compute(buf[u], xg);
        if (kg + RING * kGroupK < k_end) load_group<NESTED>(buf[u], f, row, K, kg + RING * kGroupK, t);
      }
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  // c0, c1: row g, columns (x rows) 2t, 2t + 1; c2, c3: row g + 8
  float* out = ws + (int64_t)split * M * N;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * j + 2 * t + (e & 1);
      const int n = n0 + 8 * (e >> 1);
      if (m < M && n < N) out[(int64_t)m * N + n] = acc[j][e];
    }
  }
}

template <typename T, int NT, bool NESTED>
cudaError_t launch(const void* x, int64_t stride_xm, int M, const NF4& f, const void* a, int a_dtype,
                   int64_t stride_ar, int64_t stride_ak, float* ws, float* ws_s, int N, int K, int R,
                   int k_per_split, int n_split, int warps, cudaStream_t stream) {
  const int rows_per_block = 16 * warps;
  const int row_blocks = (N + rows_per_block - 1) / rows_per_block;
  const int s_items = R * ((M + s_rows(M) - 1) / s_rows(M));  // (rank, s_rows(M) x rows) per warp
  const int s_blocks = (s_items + warps - 1) / warps;
  const dim3 grid(row_blocks + s_blocks, n_split);
  // the table is dynamic shared memory above the 48 KB default, allowed per kernel and device (bit d: device d)
  static unsigned long long configured = 0;
  int device = 0;
  cudaGetDevice(&device);
  if (device >= 64 || !(configured >> device & 1ull)) {
    const cudaError_t err = cudaFuncSetAttribute(nf4_mma_gemv_kernel<T, NT, NESTED>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, kLutBytes);
    if (err != cudaSuccess) return err;
    if (device < 64) configured |= 1ull << device;
  }
  nf4_mma_gemv_kernel<T, NT, NESTED><<<grid, 32 * warps, kLutBytes, stream>>>(
      static_cast<const T*>(x), stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, ws, ws_s, N, K, R, k_per_split,
      s_blocks);
  return cudaGetLastError();
}

template <typename T, bool NESTED>
cudaError_t launch_nt(int nt, const void* x, int64_t stride_xm, int M, const NF4& f, const void* a, int a_dtype,
                      int64_t stride_ar, int64_t stride_ak, float* ws, float* ws_s, int N, int K, int R,
                      int k_per_split, int n_split, int warps, cudaStream_t stream) {
  switch (nt) {
    case 1: return launch<T, 1, NESTED>(x, stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, ws, ws_s, N, K, R,
                                        k_per_split, n_split, warps, stream);
    case 2: return launch<T, 2, NESTED>(x, stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, ws, ws_s, N, K, R,
                                        k_per_split, n_split, warps, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The host entry point (nf4_entry.h; called by the torch operator lowrank_kernels::nf4_mma_gemv of
// nf4_mma_gemv_op.cpp). x_dtype: 1 fp16, 2 bf16; nested_log2 < 0: not double-quantized. Preconditions
// (checked by the operator): K % 256 == 0, k_per_split % 256 == 0, blocksize >= 64, x rows 16-byte
// aligned with unit stride along K, packed 8-byte aligned, absmax 16-byte aligned, 1 <= M <= 16, warps in
// {1, 2, 4, 8}, all tensors on CUDA device `device`.
extern "C" int lk_nf4_mma_gemv(const void* x, int x_dtype, int64_t stride_xm, int M, const void* packed,
                               const void* absmax, const void* absmax2, const void* code2, const void* offset,
                               const void* code, int blocksize_log2, int nested_log2, const void* a, int a_dtype,
                               int64_t stride_ar, int64_t stride_ak, void* ws, void* ws_s, int N, int K, int R,
                               int k_per_split, int n_split, int warps, int device, void* stream) {
  int prev = device;  // launch on the tensors' device, leave the caller's current device as it was
  cudaGetDevice(&prev);
  if (prev != device && cudaSetDevice(device) != cudaSuccess) return static_cast<int>(cudaErrorInvalidDevice);
  NF4 f{static_cast<const uint8_t*>(packed), absmax, static_cast<const float*>(absmax2),
        static_cast<const float*>(code2), static_cast<const float*>(offset), static_cast<const float*>(code),
        blocksize_log2, nested_log2};
  const int nt = M <= 8 ? 1 : 2;
  const bool nested = nested_log2 >= 0;
  auto s = static_cast<cudaStream_t>(stream);
  auto* w = static_cast<float*>(ws);
  auto* wss = static_cast<float*>(ws_s);
  cudaError_t err;
  if (x_dtype == kBF16) {
    err = nested ? launch_nt<__nv_bfloat16, true>(nt, x, stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, w, wss,
                                                  N, K, R, k_per_split, n_split, warps, s)
                 : launch_nt<__nv_bfloat16, false>(nt, x, stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, w, wss,
                                                   N, K, R, k_per_split, n_split, warps, s);
  } else if (x_dtype == kF16) {
    err = nested ? launch_nt<__half, true>(nt, x, stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, w, wss, N, K, R,
                                           k_per_split, n_split, warps, s)
                 : launch_nt<__half, false>(nt, x, stride_xm, M, f, a, a_dtype, stride_ar, stride_ak, w, wss, N, K,
                                            R, k_per_split, n_split, warps, s);
  } else {
    err = cudaErrorInvalidValue;
  }
  if (prev != device) cudaSetDevice(prev);
  return static_cast<int>(err);
}
