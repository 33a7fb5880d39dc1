"""The benchmarks run: the two frameworks of the meta-gradient benchmark agree (skipped
without torch), the distillation cost benchmark runs in quick mode, and the GPU check's
plan runs on CPU (``--dry``) and refuses without a GPU."""

import importlib.util
import json
import os
import sys

import jax
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


def test_gpu_check_dry(tmp_path):
    # The GPU check's plan on CPU, tiny shapes: what a GPU run will write. The L2T-DLN
    # iteration is left out here: compiling it takes about 30 s on 2 cores whatever the
    # shapes (`python -m benchmarks.gpu_check --dry` runs it).
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry", f"--out={out}", "--skip=dln_iteration"]) == 0
    records = json.loads(out.read_text())
    timed = {(r["benchmark"], r["framework"], r["student"]): r for r in records
             if "median_s" in r}
    expected = {("gemm", "jax", "64x64x64"), ("population16_vmap", "jax", "mlp64-128-10"),
                ("population16_sequential", "jax", "mlp64-128-10")}
    expected |= {(name, "jax", student) for name in ("meta_grad", "forward_unroll")
                 for student in gpu_check.STUDENTS}
    assert expected <= set(timed)
    for r in timed.values():
        assert r["device"] == ("cpu" if r["backend"] == "torch" else jax.devices("cpu")[0]
                               .device_kind)
        assert r["median_s"] > 0 and r["gflop"] > 0 and r["gflop_source"]
        assert r["frac_of_peak"] == pytest.approx(r["gflops"] / r["peak_gflops"])
        assert "ratio_vs_torch" in r
    # The forward unroll is part of the meta-gradient's work.
    for student in gpu_check.STUDENTS:
        meta = timed["meta_grad", "jax", student]
        assert meta["gflop"] > 1.5 * timed["forward_unroll", "jax", student]["gflop"]
        assert meta["meta_over_forward"] > 0
    assert timed["population16_vmap", "jax", "mlp64-128-10"]["ratio_vs_sequential"] > 0
    assert not [r for r in records if "error" in r]
    torch_cases = {("gemm", "64x64x64")}
    torch_cases |= {("meta_grad", student) for student in gpu_check.STUDENTS}
    if importlib.util.find_spec("torch") is None:
        skipped = {(r["benchmark"], r["student"]) for r in records
                   if r.get("skipped") == "torch not installed"}
        assert skipped == torch_cases
    else:
        ran = {(r["benchmark"], r["student"]) for r in timed.values() if r["backend"] == "torch"}
        assert ran == torch_cases


def test_gpu_check_refuses_without_gpu(capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--out=unused.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GPU" in err[0]
