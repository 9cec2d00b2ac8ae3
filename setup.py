"""dash-fast: DASH (preemptive sampling + gradient filtering) RL trainer for reasoning LMs."""

from setuptools import setup

setup(
    name="dash-fast",
    version="0.1.0",
    description="Fast GRPO-style RL for LM reasoning: preemptive sampling + gradient filtering (DASH)",
    python_requires=">=3.10",
    packages=["dash_fast", "dash_fast.rollout", "dash_kernels"],
    package_dir={"dash_kernels": "kernels"},
    install_requires=[
        "torch",  # never pinned here: the README's CPU commands install torch==2.13.0 first
        "triton",
        "transformers>=5.0",  # the sampler uses the 5.x cache API
        "tokenizers",
        "liger-kernel",
        "nvtx",
        "datasets",
        "math-verify",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest", "ruff", "trl", "peft"],
        "peft": ["peft"],
        "vllm": ["vllm"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["dash-fast=dash_fast.cli:main"]},
)
