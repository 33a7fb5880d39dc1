"""Test set-up, before anything imports JAX: CPU only, 8 fake devices, private data dir."""

import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Datasets are prepared once per test session in a private directory (never the user's
# ~/tensorflow_datasets); subprocesses started by tests inherit it.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="l2t_jax_tfds_")
# Many tests build the same programs (a run and its resumed copy, the same smoke config in
# several modes); JAX's persistent compilation cache, private to this session, compiles
# each once. Subprocesses share it, and so do pytest-xdist's workers: they inherit the
# controller's environment, so the directory is made once (reads and writes are locked).
if "L2T_JAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["L2T_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="l2t_jax_xla_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["L2T_JAX_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """float64 for the test (finite differences need it), restored afterwards."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
