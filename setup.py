"""emu2_jax: Emu2 / Emu in JAX and Flax, trainable on TPU pods and GPU meshes."""
import pathlib

from setuptools import find_packages, setup

# The runtime path never imports torch; the PyTorch references are test/convert extras only.
RUNTIME = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "sentencepiece>=0.2",
    "ml_collections>=1.1",
    "absl-py>=2.3",
    "chex>=0.1.92",
    "numpy>=2.0",
    "pillow>=10",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
]

EXTRAS = {
    # torch 2.13.0 is the CPU build available here; anything else would pull CUDA wheels.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "ruff>=0.15",  # lint, configured in pyproject.toml; .ci/run fails on findings
        "torch==2.13.0",
        "transformers>=5",  # the tokenizer parity test uses the v5 SentencePieceBackend
        "timm>=1.0.9",
        "diffusers>=0.30",
        "safetensors>=0.4",
        "libtpu==0.0.42.*",  # compiles for TPU topologies on CPU (tests/test_aot.py); jax 0.10.2's own pin
        "pycocoevalcap>=1.2",  # CIDEr-D parity with coco-caption's pure-Python scorer (tests/evaluation)
        "av>=14",  # MP4 / WebM clips (tests/test_video_io.py, tests/data/test_video.py)
    ],
    "convert": ["torch==2.13.0", "safetensors>=0.4"],
    "tpu": ["libtpu==0.0.42.*"],
    # PyAV (FFmpeg): reading video files (also in webdataset shards at ingestion), writing MP4 / WebM
    "video": ["av>=14"],
    # `python -m emu2_jax.data.prepare --runner=...`. Not in "test": Beam 2.77 caps protobuf<7,
    # pillow<13 and pyarrow<26, so pip would downgrade this stack (README.md#data); the Beam tests
    # skip without it.
    "beam": ["apache-beam>=2.60,<3"],
}

setup(
    name="emu2_jax",
    version="0.1.0",
    description="Emu2 and Emu generative multimodal models in JAX/Flax: training, conversion, inference",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["emu2_jax", "emu2_jax.*"]),
    include_package_data=True,
    package_data={"emu2_jax": ["data/embedded/**/*"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
