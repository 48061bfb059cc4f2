// Checks shared by the torch operators of csrc/ (nf4_mma_gemv_op.cpp, nf4_merge_mma_op.cpp): the tensors of an
// NF4 weight W [N, K] (bitsandbytes' format: packed nibbles, first-level scales, and with double quantization the
// second level), each failure a TORCH_CHECK naming the operator and the tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace lk {

inline bool pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

inline int log2_of(int64_t v) {  // v a power of two
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

inline bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % static_cast<uintptr_t>(bytes) == 0;
}

// t is on the device of ref (the operator's first tensor, named ref_name in the message).
inline void check_on(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                     const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", but ", ref_name, " is on ",
              ref.device());
}

// The NF4 weight W [N, K]: packed (contiguous uint8, N * K / 2 bytes, packed_align-byte aligned), absmax (contiguous,
// absmax_align-byte aligned; uint8 second-level indices when nested, else float32), code (16 float32), blocksize (a
// power of two >= 64) and, nested, absmax2 / code2 / offset with nested_blocksize; all on ref's device.
inline void check_nf4_weight(const char* op, int64_t N, int64_t K, const at::Tensor& packed, int64_t packed_align,
                             const at::Tensor& absmax, int64_t absmax_align, const std::optional<at::Tensor>& absmax2,
                             const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                             const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(pow2(blocksize) && blocksize >= 64, op, ": blocksize must be a power of two >= 64");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2 &&
                  aligned(packed, packed_align),
              op, ": packed must be a contiguous ", std::to_string(packed_align),
              "-byte aligned uint8 tensor of N * K / 2 bytes");
  const bool nested = absmax2.has_value();
  TORCH_CHECK(code2.has_value() == nested && offset.has_value() == nested,
              op, ": absmax2, code2 and offset: give all three (double quantization) or none");
  const int64_t blocks = (N * K + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.scalar_type() == (nested ? at::kByte : at::kFloat) && absmax.is_contiguous() &&
                  absmax.numel() >= blocks && aligned(absmax, absmax_align),
              op, ": absmax must be a contiguous ", nested ? "uint8" : "float32", " tensor of cdiv(N * K, blocksize)",
              " elements, ", std::to_string(absmax_align), "-byte aligned");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() >= 16,
              op, ": code must be a contiguous float32 tensor of 16 elements");
  check_on(op, packed, "packed", ref, ref_name);
  check_on(op, absmax, "absmax", ref, ref_name);
  check_on(op, code, "code", ref, ref_name);
  if (!nested) return;
  TORCH_CHECK(pow2(nested_blocksize), op, ": nested_blocksize must be a power of two");
  TORCH_CHECK(absmax2->scalar_type() == at::kFloat && absmax2->is_contiguous() &&
                  absmax2->numel() >= (blocks + nested_blocksize - 1) / nested_blocksize,
              op, ": absmax2 must be a contiguous float32 tensor of cdiv(blocks, nested_blocksize)");
  TORCH_CHECK(code2->scalar_type() == at::kFloat && code2->is_contiguous() && code2->numel() >= 256,
              op, ": code2 must be a contiguous float32 tensor of 256 elements");
  TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1,
              op, ": offset must be a float32 tensor of one element");
  check_on(op, *absmax2, "absmax2", ref, ref_name);
  check_on(op, *code2, "code2", ref, ref_name);
  check_on(op, *offset, "offset", ref, ref_name);
}

}  // namespace lk
