"""Installs the R1 trainer: `pip install -e .[test]`.

torch is pinned by the caller (`pip install torch==2.13.0` first on CPU machines), so the
requirement here is a floor that an installed torch satisfies without pulling a CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="r1-from-scratch",
    version="0.1.0",
    description="DeepSeek-R1-style GRPO and SFT in plain PyTorch, with Triton kernels and FSDP2",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo", "grpo.*", "sft", "sft.*", "kernels", "kernels.*", "data", "data.*", "infra", "infra.*",
                                    "rewards", "rewards.*", "pipeline", "pipeline.*"]),
    py_modules=["train"],
    package_data={"data": ["*.txt"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors",
        "datasets>=2.20",
        "math-verify>=0.5",
        "latex2sympy2_extended>=1.0",
        "triton>=3.0; platform_system == 'Linux'",
        "einops",
        "wandb",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest>=8", "matplotlib"],  # the main-job test checks the curves PNG
        "plot": ["matplotlib"],
        # GGUF files as --model.path (infra/gguf.py): transformers dequantizes them with the
        # gguf reader and needs accelerate to build the model.
        "gguf": ["gguf>=0.10", "accelerate"],
    },
    entry_points={"console_scripts": ["r1-train=train:main"]},
)
