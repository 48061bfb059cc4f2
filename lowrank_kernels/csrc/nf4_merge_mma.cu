// NF4 weight dequantized with the LoRA update merged in, one rounding, on tensor cores:
//
//   W' [N, K] = round(deq(W) + scaling * B @ A)      B = lora_B [N, r], A = lora_A [r, K], both in W' dtype
//
// deq(W) is bit-identical to NF4Weight.dequantize (round(code[nibble] * scale) to the output type, the scale
// rebuilt in fp32 with two roundings when double-quantized); the rank-r product accumulates in fp32 on the tensor
// cores (mma.m16n8k16, r padded to a multiple of 16 with zeros); s * delta + deq is one fp32 FMA, rounded once.
// Same contract as the Triton kernel of kernels/nf4_merge.py, which covers what this one does not (fp32 output,
// K % 64 != 0, blocksize < 64, r > 32).
//
// W is bitsandbytes' NF4 layout (nf4_common.cuh).
//
// Why not only the Triton kernel: there the tl.dot result and the dequantized tile live in different register
// layouts (Triton converts the tile and the sum through shared memory), and the A tile is reloaded for every 32
// rows (by count, ~40% more L2 reads than a plain dequantization). Here the mma's output columns are assigned to W columns so that
// each thread's accumulators are exactly the elements it dequantizes and stores, and A is loaded once per block:
//
// A warp owns a 64-column strip and walks down rows in 16-row steps. Thread (g = lane / 4, t = lane % 4) holds, for
// rows g and g + 8, the columns 8t ... 8t + 7 and 32 + 8t ... 32 + 8t + 7 of the strip: two packed 32-bit words per
// row, two 16-byte stores per row (the 4 threads of a row store 64 contiguous bytes per instruction). Accumulator
// column n = 2t + e of n-tile j (j = 0..7, e = 0, 1) is W column 32 (j / 4) + 8 (n / 2) + 2 (j % 4) + e: byte
// j % 4 of word j / 4, high nibble for e = 0. The B operand (A's columns) is loaded with the same mapping, once per
// block, and stays in registers; the 16-entry code table is one register per lane, read by shuffle. The grid is
// about one wave: each block's warps take adjacent strips and a run of rows, the loads of the next two steps in
// flight while two are computed (bench/results/merge-cuda-h100.txt).
#include "nf4_common.cuh"
#include "nf4_entry.h"

static_assert(lk::kF32 == LK_DTYPE_F32 && lk::kF16 == LK_DTYPE_F16 && lk::kBF16 == LK_DTYPE_BF16,
              "nf4_entry.h: dtype codes");

namespace {

using namespace lk;

constexpr int kStrip = 64;    // W columns per warp
constexpr int kMaxWarps = 8;  // warps per block, on adjacent strips of the same rows
// Tuning knobs (nvcc -D, e.g. through LOWRANK_KERNELS_NVCC_FLAGS): 16-row steps per chunk (a chunk's loads go
// out together, one chunk ahead), the blocks of kMaxWarps warps per SM that __launch_bounds__ asks registers for,
// and the resident warps per SM the grid is sized for (about one wave).
#ifndef LK_MERGE_STEPS
#define LK_MERGE_STEPS 2
#endif
#ifndef LK_MERGE_RESIDENT_WARPS
#define LK_MERGE_RESIDENT_WARPS 16
#endif
#ifndef LK_MERGE_MIN_BLOCKS
#define LK_MERGE_MIN_BLOCKS 2
#endif
constexpr int kSteps = LK_MERGE_STEPS;
constexpr int kResidentWarps = LK_MERGE_RESIDENT_WARPS;



// (lo, hi) rounded to T, lo in the low 16 bits
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// the two T of a packed pair as floats (low half first)
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

struct Adapters {
  const uint16_t* a;  // lora_A [r, K] in the output type (bits), any strides
  int64_t sar, sak;
  const uint16_t* b;  // lora_B [N, 16 * RCH] in the output type (bits), contiguous, ranks past r zero
  int R;
};

// Rank permutation: the mma's k index 2t + e is rank 4t + e and 2t + 8 + e is rank 4t + 2 + e (e = 0, 1), the same
// in both operands, so that a thread's four ranks of a lora_B row are one 8-byte load.

// What one 16-row step loads: the packed words and scale data of rows g and g + 8, and the A operand (lora_B rows)
template <int RCH, bool NESTED> struct Step {
  uint32_t w[2][2];     // [row][word]
  uint32_t q[2];        // uint8 scale codes (nested) or fp32 absmax bits
  float s2[2];          // absmax2 (nested only)
  uint2 b[RCH][2];      // lora_B ranks 16 kc + 4t ... + 3 of rows g, g + 8
};

template <int RCH, bool NESTED>
__device__ __forceinline__ void load_step(Step<RCH, NESTED>& st, const NF4& f, const Adapters& ad, int n0, int col0,
                                          int N, int K, int g, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t n = min(n0 + g + 8 * r, N - 1);  // clamped: loads stay in bounds, stores are guarded
    const uint8_t* p = f.packed + ((n * K + col0) >> 1) + 4 * t;
    st.w[r][0] = __ldcs(reinterpret_cast<const unsigned int*>(p));  // read once: evict-first
    st.w[r][1] = __ldcs(reinterpret_cast<const unsigned int*>(p + 16));
    const int64_t blk = (n * K + col0) >> f.blocksize_log2;
    if constexpr (NESTED) {
      st.q[r] = __ldg(static_cast<const uint8_t*>(f.absmax) + blk);
      st.s2[r] = __ldg(f.absmax2 + (blk >> f.nested_log2));
    } else {
      st.q[r] = __float_as_uint(__ldg(static_cast<const float*>(f.absmax) + blk));
    }
#pragma unroll
    for (int kc = 0; kc < RCH; ++kc)
      st.b[kc][r] = __ldg(reinterpret_cast<const uint2*>(ad.b + n * (16 * RCH) + 16 * kc + 4 * t));
  }
}

// A block: blockDim.x / 32 warps on adjacent 64-column strips, walking down rows_per_block rows in chunks of kSteps
// 16-row steps, the loads of the next chunk in flight while one is computed. A (the B operand) is loaded once per
// block (this layout took 4096 x 4096 from 18.6-20.0 to 17.4-17.9 µs against blocks of 64 rows that reloaded it,
// with all their loads up front: bench/results/merge-cuda-h100.txt).
template <typename T, int RCH, bool NESTED>
__global__ void __launch_bounds__(32 * kMaxWarps, LK_MERGE_MIN_BLOCKS) nf4_merge_kernel(
    NF4 f, Adapters ad, float scaling, uint16_t* __restrict__ out, int N, int K, int rows_per_block) {
  __shared__ float code2_s[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int col0 = (blockIdx.x * (blockDim.x >> 5) + warp) * kStrip;
  const int row_begin = blockIdx.y * rows_per_block;
  const int row_end = min(N, row_begin + rows_per_block);
  const bool active = col0 < K;  // warp-uniform: warps past K only help fill code2_s
  constexpr int kChunk = kSteps * 16;

  Step<RCH, NESTED> cur[kSteps];
  if (active) {
#pragma unroll
    for (int i = 0; i < kSteps; ++i) load_step<RCH, NESTED>(cur[i], f, ad, row_begin + 16 * i, col0, N, K, g, t);
  }
  // B fragments (round(A) on this strip): thread (g, t) holds ranks 4t ... 4t + 3 of column n = g of each n-tile
  uint32_t bf[RCH][8][2];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t col = col0 + 32 * (j >> 2) + 8 * (g >> 1) + 2 * (j & 3) + (g & 1);
    auto a_at = [&](int k) -> uint32_t {
      return active && k < ad.R ? __ldg(ad.a + k * ad.sar + col * ad.sak) : 0u;
    };
#pragma unroll
    for (int kc = 0; kc < RCH; ++kc) {
      const int k = 16 * kc + 4 * t;
      bf[kc][j][0] = a_at(k) | a_at(k + 1) << 16;
      bf[kc][j][1] = a_at(k + 2) | a_at(k + 3) << 16;
    }
  }
  const float code_l = __ldg(f.code + (lane & 15));  // lane l holds code[l % 16]: the lookup is a shuffle
  float offset = 0.f;
  if constexpr (NESTED) {  // after the loads above are issued: the barrier does not delay them
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_s[i] = __ldg(f.code2 + i);
    offset = __ldg(f.offset);
  }
  __syncthreads();
  if (!active) return;

  for (int n0 = row_begin; n0 < row_end; n0 += kChunk) {
    const bool more = n0 + kChunk < row_end;
    Step<RCH, NESTED> nxt[kSteps];
    if (more) {
#pragma unroll
      for (int i = 0; i < kSteps; ++i) load_step<RCH, NESTED>(nxt[i], f, ad, n0 + kChunk + 16 * i, col0, N, K, g, t);
    }
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const Step<RCH, NESTED>& st = cur[i];
      float scale[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if constexpr (NESTED) {
          scale[r] = __fadd_rn(__fmul_rn(code2_s[st.q[r]], st.s2[r]), offset);
        } else {
          scale[r] = __uint_as_float(st.q[r]);
        }
      }
      uint32_t o[2][2][4];  // [row][word][pair]
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};  // rows g, g + 8 x accumulator columns 2t, 2t + 1 of n-tile j
#pragma unroll
        for (int kc = 0; kc < RCH; ++kc) {
          const uint32_t a[4] = {st.b[kc][0].x, st.b[kc][1].x, st.b[kc][0].y, st.b[kc][1].y};
          mma<T>(d, a, bf[kc][j][0], bf[kc][j][1]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // shfl reads lane (index & 31), and lanes l and l + 16 hold the same code: no nibble masking
          const uint32_t word = st.w[r][j >> 2];
          const float c_hi = __shfl_sync(kFull, code_l, word >> (8 * (j & 3) + 4));
          const float c_lo = __shfl_sync(kFull, code_l, word >> (8 * (j & 3)));
          // deq(W): code * scale rounded to T (both elements in one conversion), back to fp32 for the sum
          const float2 w = unpack2<T>(pack2<T>(__fmul_rn(c_hi, scale[r]), __fmul_rn(c_lo, scale[r])));
          o[r][j >> 2][j & 3] = pack2<T>(__fmaf_rn(scaling, d[2 * r], w.x), __fmaf_rn(scaling, d[2 * r + 1], w.y));
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int n = n0 + 16 * i + g + 8 * r;
        if (n < row_end) {  // written once: evict-first
          uint4* p = reinterpret_cast<uint4*>(out + (int64_t)n * K + col0 + 8 * t);
          __stcs(p, make_uint4(o[r][0][0], o[r][0][1], o[r][0][2], o[r][0][3]));
          __stcs(p + 4, make_uint4(o[r][1][0], o[r][1][1], o[r][1][2], o[r][1][3]));
        }
      }
    }
    if (more) {
#pragma unroll
      for (int i = 0; i < kSteps; ++i) cur[i] = nxt[i];
    }
  }
}

template <typename T, int RCH>
cudaError_t launch(const NF4& f, const Adapters& ad, float scaling, uint16_t* out, int N, int K, int warps,
                   int device, cudaStream_t stream) {
  // about one wave: kResidentWarps / warps blocks per SM, the rows split among as many blocks per strip group
  int sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int strip_groups = (K / kStrip + warps - 1) / warps;
  const int row_groups = max(1, (kResidentWarps / warps) * sms / strip_groups);
  const int rows_per_block = ((N + row_groups - 1) / row_groups + 15) / 16 * 16;
  const dim3 grid(strip_groups, (N + rows_per_block - 1) / rows_per_block);
  if (f.absmax2 != nullptr) {
    nf4_merge_kernel<T, RCH, true><<<grid, 32 * warps, 0, stream>>>(f, ad, scaling, out, N, K, rows_per_block);
  } else {
    nf4_merge_kernel<T, RCH, false><<<grid, 32 * warps, 0, stream>>>(f, ad, scaling, out, N, K, rows_per_block);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_r(const NF4& f, const Adapters& ad, float scaling, uint16_t* out, int N, int K, int warps,
                     int device, cudaStream_t stream) {
  switch ((ad.R + 15) / 16) {
    case 1: return launch<T, 1>(f, ad, scaling, out, N, K, warps, device, stream);
    case 2: return launch<T, 2>(f, ad, scaling, out, N, K, warps, device, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The host entry point (nf4_entry.h; called by the torch operator lowrank_kernels::nf4_merge_mma of
// nf4_merge_mma_op.cpp). dtype: 1 fp16, 2 bf16 (W', lora_A and lora_B all in it); nested_log2 < 0: not
// double-quantized; b: lora_B as a contiguous [N, 16 * cdiv(R, 16)] tensor, 8-byte aligned, ranks past R zero.
// Preconditions (checked by the operator): K % 64 == 0, blocksize >= 64, 1 <= R <= 32, packed 4-byte and
// out 16-byte aligned and contiguous, 1 <= warps <= 8, all tensors on CUDA device `device`.
extern "C" int lk_nf4_merge(const void* packed, const void* absmax, const void* absmax2, const void* code2,
                            const void* offset, const void* code, int blocksize_log2, int nested_log2, const void* a,
                            int64_t sar, int64_t sak, const void* b, int R, float scaling,
                            void* out, int dtype, int N, int K, int warps, int device, void* stream) {
  int prev = device;  // launch on the tensors' device, leave the caller's current device as it was
  cudaGetDevice(&prev);
  if (prev != device && cudaSetDevice(device) != cudaSuccess) return static_cast<int>(cudaErrorInvalidDevice);
  const bool nested = nested_log2 >= 0;
  NF4 f{static_cast<const uint8_t*>(packed), absmax, nested ? static_cast<const float*>(absmax2) : nullptr,
        static_cast<const float*>(code2), static_cast<const float*>(offset), static_cast<const float*>(code),
        blocksize_log2, nested_log2};
  Adapters ad{static_cast<const uint16_t*>(a), sar, sak, static_cast<const uint16_t*>(b), R};
  auto* o = static_cast<uint16_t*>(out);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaErrorInvalidValue;
  if (warps < 1 || warps > kMaxWarps) err = cudaErrorInvalidValue;
  else if (dtype == kBF16) err = launch_r<__nv_bfloat16>(f, ad, scaling, o, N, K, warps, device, s);
  else if (dtype == kF16) err = launch_r<__half>(f, ad, scaling, o, N, K, warps, device, s);
  if (prev != device) cudaSetDevice(prev);
  return static_cast<int>(err);
}
