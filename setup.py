"""normistral-jax: NorMistral-11b-long in JAX/Flax for TPU and GPU meshes."""

from setuptools import find_packages, setup

# Versions tested together (the CI and the Makefile install exactly these).
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "ml_dtypes==0.6.0",
    "numpy==2.4.6",
    "pyyaml==6.0.4",
    "tqdm==4.70.1",
    "psutil==7.2.2",
    "tensorboardX==2.6.5",  # training curves in WORKDIR/tensorboard (metrics.jsonl has the same values)
    "fsspec==2026.9.0",  # jaxmodel/storage.py: one code path for local paths and gs://
    "gcsfs==2026.10.1",
    "zstandard==0.25.0",  # prepare-data: .jsonl.zst inputs (training/sources.py reads frames: a cut file errs)
    "pyarrow==26.0.1",  # prepare-data: Parquet and save_to_disk (Arrow) inputs
    "fastapi==0.165.0",  # normistral serve (OpenAI-compatible completions)
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "huggingface_hub==2.4.0",  # jaxmodel/hub.py: model ids (org/name) resolved into the standard cache
]
# torch 2.13.0: the CPU build on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
# accelerate: lm-eval's `hf` model (HFLM), the reference the evaluation tests compare against, imports it.
TEST = ["pytest==9.2.0", "torch==2.13.0", "accelerate==1.15.0",
        "gcp-storage-emulator==2026.7.19",  # the GCS JSON API on localhost (tests/conftest.py starts it)
        "datasets==5.2.0", "ray==2.60.0",  # tests write a save_to_disk dataset; run prepare-data on Ray
        "openai==3.57.0", "httpx==0.28.1",  # the serve tests talk to a real server with the official client
        "peft==0.21.2"]  # LoRA parity: adapters load in and come from PEFT (tests/jaxmodel/test_lora.py)
# lm-evaluation-harness: `normistral eval`, train.eval_tasks and the lm-eval model `normistral`.
EVAL = ["lm_eval==0.4.13"]

setup(
    name="normistral-jax",
    version="0.1.0",
    description="NorMistral-11b-long (Mistral architecture) in JAX/Flax NNX: model, converter, training, inference",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxmodel", "jaxmodel.*", "training", "training.*",
                                    "inference", "inference.*"]) + ["normistral_configs"],
    # The run configs ship inside the package (configs/ -> normistral_configs), so `normistral demo` and
    # `normistral train --config tiny-cpu` work after a plain (non-editable) install, from any directory.
    package_dir={"normistral_configs": "configs"},
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "eval": EVAL,
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda": ["jax[cuda12]==0.10.2"],
        # The demo's loss-curve PNG. Not torch (a multi-GB CUDA build from PyPI): without it the demo skips
        # its step 7 (parity against transformers' PyTorch model) with a line saying how to install it.
        "demo": ["matplotlib==3.11.2"],
        "ray": ["ray==2.60.0"],  # prepare-data --engine ray (training/prepare_ray.py)
        "hub": ["datasets==5.2.0"],  # prepare-data --input hf:NAME:SPLIT (streamed from the hub)
    },
    py_modules=["normistral", "normistral_demo"],
    # The bundled corpus (the tiny configs and the demo build their tokenizer and data from it).
    package_data={"training": ["corpus/*.jsonl", "corpus/README.md"], "normistral_configs": ["*.yaml"]},
    entry_points={"console_scripts": ["normistral=normistral:main"]},
)
