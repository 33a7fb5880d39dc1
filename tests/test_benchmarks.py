"""The benchmark's two frameworks compute the same meta-gradient (skipped without torch)."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import meta_grad, torch_meta  # noqa: E402
from benchmarks.remat import make_meta_grad  # noqa: E402


def test_torch_and_jax_meta_gradients_agree():
    (step_fn, objective, args), problem = meta_grad.make_problem("mlp64-128-10", 3)
    value, grad = make_meta_grad(step_fn, objective, "none")(*args)
    for name in ("torch-autograd", "torch-func"):
        make = torch_meta.available_variants()[name]
        dev, grad_w, grad_b = make(problem)()
        np.testing.assert_allclose(dev, float(value), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(grad_w, np.asarray(grad["W"]), rtol=1e-4, atol=1e-7,
                                   err_msg=name)
        np.testing.assert_allclose(grad_b, np.asarray(grad["b"]), rtol=1e-4, atol=1e-7,
                                   err_msg=name)
    assert np.abs(np.asarray(grad["W"])).max() > 1e-4  # not trivially zero
