// The torch operator lowrank_kernels::nf4_merge_mma: checks its tensors and launches the merge kernel of
// nf4_merge_mma.cu (its host entry point, nf4_entry.h) on PyTorch's current stream of their device. The fake (meta)
// implementation is registered in Python, by lowrank_kernels/kernels/nf4_merge_mma.py.
//
//   out [N, K] = round(deq(W) + scaling * lora_B @ lora_A)     in lora_A's dtype (bfloat16 or float16)
//
// lora_A [r, K] (any strides) and lora_B [N, 16 * cdiv(r, 16)] (contiguous, ranks past r zero) in the output dtype;
// N and K are read from them, 1 <= r <= 32.
#include <ATen/core/Tensor.h>
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

at::Tensor nf4_merge_mma(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                         const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                         const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double scaling, int64_t warps) {
  TORCH_CHECK(packed.is_cuda(), "nf4_merge_mma: packed must be a CUDA tensor");
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2, "nf4_merge_mma: lora_A and lora_B must be 2-D");
  const at::ScalarType dtype = lora_A.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "nf4_merge_mma: lora_A must be bfloat16 or float16 (the output dtype), got ", dtype);
  TORCH_CHECK(lora_B.scalar_type() == dtype, "nf4_merge_mma: lora_B must have lora_A's dtype ", dtype, ", got ",
              lora_B.scalar_type());
  const int64_t R = lora_A.size(0), K = lora_A.size(1), N = lora_B.size(0);
  TORCH_CHECK(1 <= R && R <= 32, "nf4_merge_mma: r must be 1 to 32, got ", std::to_string(R));
  TORCH_CHECK(lora_B.size(1) == (R + 15) / 16 * 16 && lora_B.is_contiguous() && lk::aligned(lora_B, 8),
              "nf4_merge_mma: lora_B must be a contiguous 8-byte aligned [N, 16 * cdiv(r, 16)] tensor, r = ",
              std::to_string(R));
  TORCH_CHECK(K % 64 == 0 && K <= INT_MAX && N <= INT_MAX, "nf4_merge_mma: K must be a multiple of 64, got ",
              std::to_string(K));
  TORCH_CHECK(warps >= 1 && warps <= 8, "nf4_merge_mma: warps must be 1 to 8, got ", std::to_string(warps));
  lk::check_nf4_weight("nf4_merge_mma", N, K, packed, 4, absmax, 1, absmax2, code2, offset, code, blocksize,
                       nested_blocksize, packed, "packed");
  lk::check_on("nf4_merge_mma", lora_A, "lora_A", packed, "packed");
  lk::check_on("nf4_merge_mma", lora_B, "lora_B", packed, "packed");
  const bool nested = absmax2.has_value();

  at::Tensor out = lora_A.new_empty({N, K});  // contiguous, 16-byte aligned (the caching allocator's blocks)
  if (N == 0 || K == 0) return out;
  const c10::cuda::CUDAGuard guard(packed.device());
  const int device = packed.get_device();
  const int err = lk_nf4_merge(
      packed.const_data_ptr(), absmax.const_data_ptr(), nested ? absmax2->const_data_ptr() : nullptr,
      nested ? code2->const_data_ptr() : nullptr, nested ? offset->const_data_ptr() : nullptr,
      code.const_data_ptr(), lk::log2_of(blocksize), nested ? lk::log2_of(nested_blocksize) : -1,
      lora_A.const_data_ptr(), lora_A.stride(0), lora_A.stride(1), lora_B.const_data_ptr(), static_cast<int>(R),
      static_cast<float>(scaling), out.mutable_data_ptr(), dtype == at::kBFloat16 ? LK_DTYPE_BF16 : LK_DTYPE_F16,
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(warps), device,
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  TORCH_CHECK(err == cudaSuccess, "nf4_merge_mma: kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {  // a fragment: nf4_mma_gemv_op.cpp, another library, adds to it
  m.def("nf4_merge_mma(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, Tensor code, "
        "int blocksize, int nested_blocksize, Tensor lora_A, Tensor lora_B, float scaling, int warps) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("nf4_merge_mma", &nf4_merge_mma); }
