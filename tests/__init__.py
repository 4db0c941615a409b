"""Test suite. Importing this package (pytest does so before any conftest) simulates an
8-device host so that sharding tests run on a plain CPU; it must happen before JAX starts."""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
