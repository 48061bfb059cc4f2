// The torch operator lowrank_kernels::nf4_mma_gemv: checks its tensors and launches the decode kernel of
// nf4_mma_gemv.cu (its host entry point, nf4_entry.h) on PyTorch's current stream of their device. It writes the
// two workspaces it is given and returns nothing (mutation annotations in the schema); the fake (meta)
// implementation is registered in Python, by lowrank_kernels/kernels/nf4_mma_gemv.py.
//
//   ws   [n_split, M, N] (fp32, contiguous) = x [M, K-slice] @ deq(W [N, K-slice]).T      for each K slice
//   ws_s [n_split, M, r] (fp32, contiguous) = x [M, K-slice] @ round(lora_A [r, K-slice]).T
//
// slice i covers K columns [i * k_per_split, (i + 1) * k_per_split); n_split = ws.size(0).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <string>

#include "nf4_entry.h"
#include "nf4_op_checks.h"

namespace {

int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? LK_DTYPE_F32 : t == at::kHalf ? LK_DTYPE_F16 : LK_DTYPE_BF16;
}

void nf4_mma_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                  const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                  const std::optional<at::Tensor>& offset, const at::Tensor& code, int64_t blocksize,
                  int64_t nested_blocksize, const at::Tensor& lora_A, const at::Tensor& ws, const at::Tensor& ws_s,
                  int64_t k_per_split, int64_t warps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "nf4_mma_gemv: x must be a 2-D CUDA tensor [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "nf4_mma_gemv: x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(1 <= M && M <= 16, "nf4_mma_gemv: x must have 1 to 16 rows, got ", std::to_string(M));
  TORCH_CHECK(K > 0 && K % 256 == 0 && K <= INT_MAX, "nf4_mma_gemv: K must be a positive multiple of 256, got ",
              std::to_string(K));
  TORCH_CHECK(x.stride(1) == 1 && lk::aligned(x, 16) && (M == 1 || x.stride(0) * 2 % 16 == 0),
              "nf4_mma_gemv: x needs unit stride along K and 16-byte aligned rows");
  TORCH_CHECK(ws.dim() == 3 && ws.size(1) == M && ws.scalar_type() == at::kFloat && ws.is_contiguous(),
              "nf4_mma_gemv: ws must be a contiguous float32 tensor [n_split, M, N]");
  const int64_t n_split = ws.size(0), N = ws.size(2);
  TORCH_CHECK(N >= 1 && N <= INT_MAX, "nf4_mma_gemv: ws must have N >= 1 columns, got ", std::to_string(N));
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1 && lora_A.size(0) <= INT_MAX,
              "nf4_mma_gemv: lora_A must be [r, K] with r >= 1");
  TORCH_CHECK(lora_A.scalar_type() == at::kFloat || lora_A.scalar_type() == at::kHalf ||
                  lora_A.scalar_type() == at::kBFloat16,
              "nf4_mma_gemv: lora_A must be float32, float16 or bfloat16, got ", lora_A.scalar_type());
  const int64_t R = lora_A.size(0);
  TORCH_CHECK(ws_s.dim() == 3 && ws_s.size(0) == n_split && ws_s.size(1) == M && ws_s.size(2) == R &&
                  ws_s.scalar_type() == at::kFloat && ws_s.is_contiguous(),
              "nf4_mma_gemv: ws_s must be a contiguous float32 tensor [n_split, M, r]");
  TORCH_CHECK(k_per_split > 0 && k_per_split % 256 == 0 && n_split >= 1 && n_split <= 65535 &&
                  n_split * k_per_split >= K && k_per_split <= INT_MAX,
              "nf4_mma_gemv: k_per_split must be a multiple of 256 and n_split = ws.size(0) slices must cover K");
  TORCH_CHECK(warps == 1 || warps == 2 || warps == 4 || warps == 8, "nf4_mma_gemv: warps must be 1, 2, 4 or 8");
  lk::check_nf4_weight("nf4_mma_gemv", N, K, packed, 8, absmax, 16, absmax2, code2, offset, code, blocksize,
                       nested_blocksize, x, "x");
  lk::check_on("nf4_mma_gemv", lora_A, "lora_A", x, "x");
  lk::check_on("nf4_mma_gemv", ws, "ws", x, "x");
  lk::check_on("nf4_mma_gemv", ws_s, "ws_s", x, "x");
  const bool nested = absmax2.has_value();

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int err = lk_nf4_mma_gemv(
      x.const_data_ptr(), dtype_code(x.scalar_type()), x.stride(0), static_cast<int>(M), packed.const_data_ptr(),
      absmax.const_data_ptr(), nested ? absmax2->const_data_ptr() : nullptr,
      nested ? code2->const_data_ptr() : nullptr, nested ? offset->const_data_ptr() : nullptr,
      code.const_data_ptr(), lk::log2_of(blocksize), nested ? lk::log2_of(nested_blocksize) : -1,
      lora_A.const_data_ptr(),
      dtype_code(lora_A.scalar_type()), lora_A.stride(0), lora_A.stride(1), ws.mutable_data_ptr(),
      ws_s.mutable_data_ptr(), static_cast<int>(N), static_cast<int>(K), static_cast<int>(R),
      static_cast<int>(k_per_split), static_cast<int>(n_split), static_cast<int>(warps), device,
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  TORCH_CHECK(err == cudaSuccess, "nf4_mma_gemv: kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {  // a fragment: nf4_merge_mma_op.cpp, another library, adds to it
  m.def("nf4_mma_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
        "Tensor code, int blocksize, int nested_blocksize, Tensor lora_A, Tensor(a!) ws, Tensor(b!) ws_s, "
        "int k_per_split, int warps) -> ()");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("nf4_mma_gemv", &nf4_mma_gemv); }
