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
