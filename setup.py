from setuptools import find_packages, setup

setup(
    name="lowrank_kernels",
    version="0.1.0",
    description="Fused NF4 / LoRA / QLoRA / AdaLoRA kernels for fine-tuning on NVIDIA GPUs",
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*", "python_ref", "python_ref.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.45", "peft>=0.13"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.45", "peft>=0.13", "transformers>=4.45",
                  "matplotlib>=3.5"],
    },
)
