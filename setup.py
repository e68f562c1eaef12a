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
    # One import package: its name is no other distribution's, so nothing here shadows a user's
    # packages (`data`, `kernels`, `pipeline`, ...) or is shadowed by them.
    packages=find_packages(include=["r1train", "r1train.*"]),
    package_data={"r1train.inspector": ["page.js", "page.css"]},  # inlined into the pages it writes
    install_requires=[
        "torch>=2.6",
        "transformers>=4.57.1",  # floors proven by .ci/floors.sh (.ci/floors.txt)
        "tokenizers>=0.22",
        "safetensors",
        "datasets>=2.20",
        "math-verify>=0.8",
        "latex2sympy2_extended>=1.10.2",
        "triton>=3.0; platform_system == 'Linux'",
        "einops",
        "wandb",
        "pyyaml",
        "tqdm",  # the progress bar (run/logging.py); transformers installs it too
    ],
    extras_require={
        # matplotlib: the main-job test checks the curves PNG; kernels: Hugging Face's package of that
        # name, which transformers >= 5.25 imports, installed for the test that runs a step beside it;
        # peft: the test that loads --train.export_adapter's folder in PEFT itself (the package never
        # imports it: the format is written from model/lora.py); playwright: drives a headless
        # Chromium for the inspector page's browser test (the browser itself: Debian's chromium)
        "test": ["pytest>=8", "matplotlib", "kernels", "peft", "playwright"],
        "plot": ["matplotlib"],
        # GGUF files as --model.path (r1train/model/gguf.py): transformers dequantizes them with the
        # gguf reader and needs accelerate to build the model.
        "gguf": ["gguf>=0.10", "accelerate"],
    },
    entry_points={"console_scripts": ["r1-train=r1train.cli:main"]},
)
