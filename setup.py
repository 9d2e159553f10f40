"""cm3leon_jax: an open JAX/Flax implementation of CM3Leon.

Pins follow ../shared/DESIGN.md ("Fixed decisions"); keep them together:
scann 1.4.2 needs tensorflow 2.20.*, and sentencepiece 0.2.1 keeps protobuf
compatible with apache-beam so that `import seqio` works.
"""
from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"

install_requires = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.20.*",
    "tensorflow-text==2.20.*",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",
    "grain==0.2.18",
    "scann==1.4.2",
    "apache-beam==2.77.*",
    "webdataset==1.0.2",
    "msgpack",                # prepared-dataset records (data/prepare.py)
    "sentencepiece==0.2.1",
    "gin-config",
    "clu",
    "transformers>=5,<6",
    "safetensors",
    "numpy",
    "scipy",                  # FID's reference test, the shapes checker's components
    "pycocoevalcap==1.2",     # COCO's CIDEr / BLEU scorers (eval/captions.py); PTB tokenizer needs java
    "tqdm",
    "matplotlib",             # the demo report's plots (loss curve, accuracy vs CFG)
]

extras_require = {
    # torch==2.13.0 is the CPU wheel on disk; any other spec pulls a CUDA build.
    # libtpu: `cm3leon compile` AOT-compiles for TPU topologies on this CPU host
    # (tests/train/test_compile.py); nbclient + ipykernel run the Colab notebook;
    # import-linter checks the layers (.importlinter, ARCHITECTURE.md).
    # selenium drives Debian's chromium in the `cm3leon serve` browser test
    # (.ci/run installs chromium and chromium-driver).
    "test": ["pytest", "pytest-xdist", "hypothesis", "torch==2.13.0", "libtpu==0.0.42.*",
             "nbclient", "nbformat", "ipykernel", "import-linter", "gradio==6.31.0", "selenium==4.51.0"],
    "torch": ["torch==2.13.0"],
    # `cm3leon serve`: the page (gradio Blocks) and the HTTP API (FastAPI, uvicorn; gradio's own deps)
    "serve": ["gradio==6.31.0"],
    "tpu": [f"jax[tpu]=={JAX_VERSION}", "libtpu==0.0.42.*"],
}

setup(
    name="cm3leon_jax",
    version="0.1.0",
    description="CM3Leon in JAX/Flax: retrieval-augmented multimodal decoder, "
    "T5X-style gin trainer, sampler and evaluation.",
    packages=find_packages(include=["cm3leon_jax", "cm3leon_jax.*"]),
    package_data={"cm3leon_jax": ["gin/**/*.gin"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["cm3leon=cm3leon_jax.cli:main"]},
)
