#!/usr/bin/env bash
# One GPU call that verifies the CUDA C++ kernels as torch operators (lowrank_kernels/cuda_ext.py):
#   1. a cold build of both extensions (torch.utils.cpp_extension, ninja; timed) and their operators registered,
#   2. a warm load in a fresh process (the cache: nothing to rebuild),
#   3. their SASS against a plain nvcc build of the same .cu files (the old loader's flags), when cuobjdump is there,
#   4. the GPU tests of the two kernels (fp64 oracles, the Triton kernels, opcheck, graph capture) and the
#      packaging test; none of the CUDA-kernel tests may be skipped.
# Usage, from the repository root on the GPU machine: bash scripts/gpu_cuda_ext_check.sh   (logs under $OUT, or
# ./gpu_out; exit status non-zero if any step failed)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # the carried bitsandbytes wheel, as scripts/gpu_check.sh installs it
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
fi
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
export LOWRANK_KERNELS_CACHE=${LOWRANK_KERNELS_CACHE:-$(mktemp -d)/lk-cache}  # cold by default
status=0
fail() { echo "FAILED: $*" | tee -a "$OUT/cuda-ext-summary.txt"; status=1; }
: > "$OUT/cuda-ext-summary.txt"

{ nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2; echo "ninja $(ninja --version 2>&1)"; } 2>&1 | tee "$OUT/cuda-ext-env.txt"

# 1. cold build
python3 - "$OUT" <<'EOF' 2>&1 | tee "$OUT/cuda-ext-build.txt" || fail "cold build"
import logging, sys, time
import torch
logging.basicConfig(level=logging.INFO)
from lowrank_kernels import cuda_ext
from lowrank_kernels.kernels import nf4_merge_mma, nf4_mma_gemv
print("unavailable_reason:", cuda_ext.unavailable_reason(), "archs:", cuda_ext.archs())
dirs = []
for mod in (nf4_mma_gemv, nf4_merge_mma):
    t = time.time()
    path = cuda_ext.build(mod.NAME)
    print(f"{mod.NAME}: built and loaded in {time.time() - t:.1f} s: {path}")
    assert path is not None, f"{mod.NAME} did not build"
    op = getattr(torch.ops.lowrank_kernels, mod.NAME).default
    assert mod.op(torch.cuda.current_device()) is op
    print("  schema:", op._schema)
    dirs.append(f"{mod.NAME} {cuda_ext.build_directory(mod.NAME, cuda_ext.archs())}")
open(f"{sys.argv[1]}/cuda-ext-dirs.txt", "w").write("\n".join(dirs) + "\n")
EOF

# 2. warm load in a fresh process
python3 - <<'EOF' 2>&1 | tee -a "$OUT/cuda-ext-build.txt" || fail "warm load"
import time
t = time.time()
from lowrank_kernels import cuda_ext
import torch
t1 = time.time()
for name in ("nf4_mma_gemv", "nf4_merge_mma"):
    assert cuda_ext.build(name) is not None, name
print(f"warm load of both (cached build, ninja no-op, dlopen): {time.time() - t1:.2f} s (import {t1 - t:.2f} s)")
EOF

# 3. SASS: extension objects against plain nvcc builds of the same sources
CUOBJDUMP=$(command -v cuobjdump || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump")
if [ -x "$CUOBJDUMP" ] && [ -s "$OUT/cuda-ext-dirs.txt" ]; then
  cap=$(python3 -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
  anon='s/_ZN[0-9]+_GLOBAL__N__[0-9a-f]+_[0-9]+_[A-Za-z0-9_]+_cu_[0-9a-f]+/ANON/g'  # anonymous namespace: per file
  skip='Fatbin|^=+$|arch = |code version|host = |compile_size|identifier|code for sm_|\.target|^\s*$'
  norm() { "$CUOBJDUMP" -sass "$1" | sed -E "$anon" | grep -Ev "$skip"; }
  while read -r name dir; do
    nvcc -O3 -std=c++17 -lineinfo "-gencode=arch=compute_$cap,code=sm_$cap" -c "lowrank_kernels/csrc/$name.cu" \
      -o "$OUT/plain-$name.o" || { fail "plain nvcc build of $name"; continue; }
    norm "$OUT/plain-$name.o" > "$OUT/sass-plain-$name.txt"
    norm "$dir/$name.cuda.o" > "$OUT/sass-ext-$name.txt"
    n=$(grep -c Function "$OUT/sass-ext-$name.txt")
    if [ "$n" -gt 0 ] && cmp -s "$OUT/sass-plain-$name.txt" "$OUT/sass-ext-$name.txt"; then
      echo "SASS of $name ($n kernels, sm_$cap): identical to a plain nvcc build" | tee -a "$OUT/cuda-ext-summary.txt"
    else
      fail "SASS of $name differs from a plain nvcc build ($n kernels; diff $OUT/sass-{plain,ext}-$name.txt)"
    fi
  done < "$OUT/cuda-ext-dirs.txt"
else
  echo "SASS comparison skipped (no cuobjdump or no build)" | tee -a "$OUT/cuda-ext-summary.txt"
fi

# 4. the GPU tests of the two kernels, and packaging
python3 -m pytest tests/test_nf4_gemv_cuda.py tests/test_nf4_merge.py tests/test_packaging.py -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUT/cuda-ext-tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "pytest (see $OUT/cuda-ext-tests.log)"
if grep -E "SKIPPED.*(needs a CUDA GPU|CUDA merge kernel needs)" "$OUT/cuda-ext-tests.log"; then
  fail "CUDA-kernel tests were skipped on the GPU machine"
fi
echo "status: $status" | tee -a "$OUT/cuda-ext-summary.txt"
exit $status
