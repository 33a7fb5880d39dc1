"""PyTorch implementations of the meta-gradient `benchmarks/meta_grad.py` times.

The same computation as the JAX side: T plain-SGD steps of an MLP student (ReLU hidden
layer, kernels laid out (in, out) as in Flax) on the L2T-DLF bilinear sigmoid loss
``-mean_i sigmoid(log_softmax(z_i) @ W + b)[y_i]``, then the dev cross-entropy of the
trained student, differentiated with respect to the loss parameters (W, b). Variants:

* ``torch-autograd``: `torch.autograd.grad(..., create_graph=True)` in a Python loop;
* ``torch-func``: `torch.func.grad` for the inner step, `grad_and_value` outside;
* ``torch-higher``: `higher.innerloop_ctx` with a differentiable `torch.optim.SGD`;
* ``torchopt``: `torchopt.MetaSGD` on an `nn.Module`.

Each variant is ``make(problem, device="cpu") -> call() -> (dev loss, dW, db)`` as NumPy
values; the problem's tensors are built once on `device`, outside the timed call, and the
call ends by copying its results to the host, which waits for the device. The PyTorch
side gets its best CPU settings: `torch.set_num_threads` equal to the JAX side's thread
count, one inter-op thread, no autograd anomaly mode, no profiler.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F


def configure(threads: int) -> None:
    """Sets PyTorch's intra-op threads to `threads` and inter-op threads to 1."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    torch.autograd.set_detect_anomaly(False)


def _tensors(problem: dict, device: str) -> dict:
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in problem.items()
         if isinstance(v, np.ndarray)}
    t["ys"] = t["ys"].long()
    t["dev_y"] = t["dev_y"].long()
    t["params"] = [torch.from_numpy(np.array(p)).to(device) for p in problem["params"]]
    return t


def mlp(params, x):
    """``params = [K1 (D, H), b1 (H,), K2 (H, C), b2 (C,)]``; returns logits (B, C)."""
    k1, b1, k2, b2 = params
    return torch.addmm(b2, torch.relu(torch.addmm(b1, x, k1)), k2)


def bilinear_sigmoid_loss(weight, bias, logits, labels):
    """Same math as `l2t_jax.losses.bilinear.bilinear_sigmoid_loss`."""
    scores = torch.log_softmax(logits, -1) @ weight + bias
    return -torch.sigmoid(scores).gather(1, labels[:, None]).mean()


def _result(dev, grads):
    return dev.item(), grads[0].detach().cpu().numpy(), grads[1].detach().cpu().numpy()


def make_autograd(problem: dict, device: str = "cpu"):
    t, lr, steps = _tensors(problem, device), problem["lr"], problem["xs"].shape[0]

    def call():
        weight = t["W"].clone().requires_grad_()
        bias = t["b"].clone().requires_grad_()
        params = [p.clone().requires_grad_() for p in t["params"]]
        for i in range(steps):
            loss = bilinear_sigmoid_loss(weight, bias, mlp(params, t["xs"][i]), t["ys"][i])
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = [p - lr * g for p, g in zip(params, grads)]
        dev = F.cross_entropy(mlp(params, t["dev_x"]), t["dev_y"])
        return _result(dev, torch.autograd.grad(dev, (weight, bias)))

    return call


def make_func(problem: dict, device: str = "cpu"):
    t, lr, steps = _tensors(problem, device), problem["lr"], problem["xs"].shape[0]

    def inner_loss(params, weight, bias, x, y):
        return bilinear_sigmoid_loss(weight, bias, mlp(params, x), y)

    inner_grad = torch.func.grad(inner_loss)

    def meta_loss(weight, bias):
        params = tuple(t["params"])
        for i in range(steps):
            grads = inner_grad(params, weight, bias, t["xs"][i], t["ys"][i])
            params = tuple(p - lr * g for p, g in zip(params, grads))
        return F.cross_entropy(mlp(params, t["dev_x"]), t["dev_y"])

    meta_grad = torch.func.grad_and_value(meta_loss, argnums=(0, 1))

    def call():
        grads, dev = meta_grad(t["W"], t["b"])
        return _result(dev, grads)

    return call


class TorchMLP(torch.nn.Module):
    """The student as an `nn.Module` (for higher and TorchOpt), from Flax-layout kernels."""

    def __init__(self, params):
        super().__init__()
        k1, b1, k2, b2 = params
        self.fc1 = torch.nn.Linear(*k1.shape, device=k1.device)
        self.fc2 = torch.nn.Linear(*k2.shape, device=k2.device)
        with torch.no_grad():
            self.fc1.weight.copy_(k1.T)
            self.fc1.bias.copy_(b1)
            self.fc2.weight.copy_(k2.T)
            self.fc2.bias.copy_(b2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make_higher(problem: dict, device: str = "cpu"):
    import higher

    t, lr, steps = _tensors(problem, device), problem["lr"], problem["xs"].shape[0]
    model = TorchMLP(t["params"])
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def call():
        weight = t["W"].clone().requires_grad_()
        bias = t["b"].clone().requires_grad_()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for i in range(steps):
                diffopt.step(bilinear_sigmoid_loss(weight, bias, fmodel(t["xs"][i]), t["ys"][i]))
            dev = F.cross_entropy(fmodel(t["dev_x"]), t["dev_y"])
            return _result(dev, torch.autograd.grad(dev, (weight, bias)))

    return call


def make_torchopt(problem: dict, device: str = "cpu"):
    import torchopt

    t, lr, steps = _tensors(problem, device), problem["lr"], problem["xs"].shape[0]

    def call():
        model = TorchMLP(t["params"])  # MetaSGD replaces its parameters as it steps
        inner_opt = torchopt.MetaSGD(model, lr=lr)
        weight = t["W"].clone().requires_grad_()
        bias = t["b"].clone().requires_grad_()
        for i in range(steps):
            inner_opt.step(bilinear_sigmoid_loss(weight, bias, model(t["xs"][i]), t["ys"][i]))
        dev = F.cross_entropy(model(t["dev_x"]), t["dev_y"])
        return _result(dev, torch.autograd.grad(dev, (weight, bias)))

    return call


VARIANTS = {
    "torch-autograd": (make_autograd, "torch"),
    "torch-func": (make_func, "torch"),
    "torch-higher": (make_higher, "higher"),
    "torchopt": (make_torchopt, "torchopt"),
}


def available_variants() -> dict:
    """The variants whose package imports here: name -> make."""
    return {
        name: make for name, (make, module) in VARIANTS.items()
        if importlib.util.find_spec(module) is not None
    }
