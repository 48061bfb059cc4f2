from setuptools import find_packages, setup

setup(
    name="lowrank_kernels",
    version="0.1.0",
    description="Fused NF4 / LoRA / QLoRA / AdaLoRA kernels for fine-tuning on NVIDIA GPUs",
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*", "python_ref", "python_ref.*"]),
    # the CUDA C++ kernels, compiled on first use (lowrank_kernels/cuda_ext.py): they ship in wheels and installs
    package_data={"lowrank_kernels": ["csrc/*.cu", "csrc/*.cuh", "csrc/*.h", "csrc/*.cpp"]},
    python_requires=">=3.10",
    # ninja: PyTorch's extension builder compiles the CUDA C++ kernels with it (where nvcc exists)
    install_requires=["torch>=2.4", "numpy", "triton>=3.0; platform_system == 'Linux'",
                      "ninja; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.45", "peft>=0.13", "transformers>=4.45",
                 "accelerate>=0.26"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.45", "peft>=0.13", "transformers>=4.45",
                  "matplotlib>=3.5"],
    },
)
