"""dsllm: pretrain GPT-style language models from scratch on DeepSpeed.

torch is a dependency but is installed first and pinned by the Makefile (`TORCH_SPEC`): the CPU
build here, the CUDA build of the same version on GPU machines. Installing it first keeps pip from
resolving an unpinned torch to the newest CUDA build (several GB) through another package's range.
"""

from setuptools import find_packages, setup

setup(
    name="dsllm",
    version="0.1.0",
    description="Pretrain GPT-style language models from scratch on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["dsllm", "dsllm.*"]),
    entry_points={"console_scripts": ["dsllm=dsllm.cli:main"]},  # `dsllm VERB ...`
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "deepspeed>=0.19.8,<0.20",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "datasketch>=2.0,<3",  # --near-dedup: MinHash (scheme affine32, new in 2.0) and MinHashLSH's band choice
        "numpy>=1.26",
        "pyarrow>=15",
        "zstandard>=0.22",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "matplotlib>=3.8",  # benchmark and run-report plots
        "pyyaml>=6.0",  # --recipe files
    ],
    extras_require={
        "mpi": ["mpi4py>=4.0"],
        # monitors DeepSpeed writes to when the JSON enables them (pre-flight refuses one whose package is missing)
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
        "comet": ["comet_ml>=3.40"],
        "dev": ["pytest>=8", "transformers>=4.45", "ruff==0.17.6"],  # ruff pinned: its rules and format change
    },
)
