"""Test session set-up, done before any test module imports JAX or the PyTorch references.

- 8 simulated host devices, so that sharding tests run on a plain CPU.
- the PyTorch references' torchvision stand-in (see tests/torch_refs.py).
"""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import tests.torch_refs  # noqa: E402,F401
from tests.inference_fixtures import photos, tiny_emu2  # noqa: E402,F401  (shared fixtures)
