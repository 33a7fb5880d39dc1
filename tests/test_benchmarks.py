"""The benchmarks run: the two frameworks of the meta-gradient benchmark agree (skipped
without torch), and the distillation cost benchmark runs in quick mode."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import distill_cost, meta_grad  # noqa: E402
from benchmarks.remat import make_meta_grad  # noqa: E402


def test_torch_and_jax_meta_gradients_agree():
    pytest.importorskip("torch")
    from benchmarks import torch_meta

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


def test_distill_cost_quick(tmp_path):
    out = tmp_path / "distill_cost.json"
    # kd and ce only: the l2t-kd outer step's compile would double the test's time.
    distill_cost.main(["--quick", "--settings=mnist1d", "--methods=ce,kd",
                       "--repeats=1", f"--out={out}"])
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"ce", "kd"}
    assert records["kd"]["ratio_to_kd"] == 1.0
    for r in records.values():
        assert r["T"] == 10 and r["config"] == "configs/distill.py:mnist1d,smoke"
        assert r["median_s"] > 0 and r["compile_s"] > 0 and r["visible_cores"] >= 1
        assert r["gflop_per_step"] > 0 and r["gflops_achieved"] > 0
    # The target model's forward pass is in kd's count.
    assert records["kd"]["gflop_per_step"] > records["ce"]["gflop_per_step"]
