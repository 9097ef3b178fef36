"""The tolerance rule (vmambax_kernels.testing) applied to the whole model.

- ``model_runs``: the model's logits and every parameter's gradient on the reference backend in
  float64 and float32 and on each fast backend in float32, optionally capturing the inputs that
  chosen modules receive in the float64 run.
- ``module_ratios``: each captured module run alone on those float64 activations (rounded to
  float32), on each backend: the rule's ratio (max error / allowed; above 1 breaks it) of its
  outputs, its inputs' gradients and its parameters' gradients.
- ``activation_errors``: each chosen module's output error in the whole model's forward, per
  backend and for the float32 reference, in the order the modules run.

A miss of the whole-model test can thus be traced to a module, or shown to come from the
compounding of modules that each keep the rule.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from vmambax_kernels.testing import tolerance


def rule_ratio(out: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor) -> float:
    """max|out - ref64| over the rule's allowed error (0 when both are 0)."""
    tol = tolerance(ref64.cpu(), ref32.cpu())
    err = (out.double().cpu() - ref64.double().cpu()).abs().max().item()
    return err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))


def _run(model: nn.Module, ct, pet, grad_out, dtype):
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    out = model(ct.to(device, dtype), pet.to(device, dtype))
    out.backward(grad_out.to(out))
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def model_runs(model, ct, pet, grad_out, backends: Iterable[str], capture: Iterable[str] = ()):
    """{"ref64" | "ref32" | backend: (logits, {parameter: gradient})} and {module name: [its float64
    inputs]} for the modules named in ``capture``. ``model`` (with ``set_backend``) is left in float32."""
    mods = dict(model.named_modules())
    captured = {}
    def keep(name):
        return lambda mod, inputs, out: captured.__setitem__(name, [x.detach() for x in inputs])
    hooks = [mods[n].register_forward_hook(keep(n)) for n in capture]
    try:
        runs = {"ref64": _run(model.double().set_backend("reference"), ct, pet, grad_out, torch.float64)}
    finally:
        for h in hooks:
            h.remove()
    runs["ref32"] = _run(model.float().set_backend("reference"), ct, pet, grad_out, torch.float32)
    for be in backends:
        runs[be] = _run(model.float().set_backend(be), ct, pet, grad_out, torch.float32)
    return runs, captured


def activation_errors(model, ct, pet, backends: Iterable[str], names: Iterable[str]) -> dict[str, dict]:
    """Forward only (no_grad): for each module in ``names``, in the order the float64 reference ran
    them, {"ref32": {"max": max|e|, "bias": mean(e) / mean|e|}, backend: {...}, ...} of the error
    e = out - ref64 of its output (a tuple's tensors taken together). Where a fast backend's max
    error grows from one module to the next faster than the float32 reference's, its forward is where
    a whole-model miss starts. The bias, in [-1, 1], is near 0 when the errors have no preferred sign
    and near +-1 for a systematic offset, which a later mean over many pixels (a pooling) keeps while
    it averages unbiased errors away. ``model`` (with ``set_backend``) is left in float32."""
    mods = dict(model.named_modules())
    device = next(model.parameters()).device

    def outputs(backend, dtype):
        got = {}

        def keep(name):
            def hook(mod, inputs, out):
                ts = out if isinstance(out, (tuple, list)) else (out,)
                got[name] = torch.cat([t.detach().double().flatten().cpu() for t in ts])
            return hook
        hooks = [mods[n].register_forward_hook(keep(n)) for n in names]
        try:
            with torch.no_grad():
                model.to(dtype).set_backend(backend)(ct.to(device, dtype), pet.to(device, dtype))
        finally:
            for h in hooks:
                h.remove()
        return got

    ref64 = outputs("reference", torch.float64)
    runs = {"ref32": outputs("reference", torch.float32)}
    runs.update({be: outputs(be, torch.float32) for be in backends})
    model.float()

    def measure(e):
        mean_abs = e.abs().mean().item()
        return {"max": e.abs().max().item(), "bias": e.mean().item() / mean_abs if mean_abs else 0.0}
    return {n: {k: measure(r[n] - ref64[n]) for k, r in runs.items()} for n in ref64}


def whole_model_ratios(runs, backend: str) -> dict[str, float]:
    """The rule's ratio of the logits and of every parameter's gradient of one backend's run."""
    (out, grads), (r32, g32), (r64, g64) = runs[backend], runs["ref32"], runs["ref64"]
    ratios = {n: rule_ratio(grads[n], g64[n], g32[n]) for n in g64}
    ratios["logits"] = rule_ratio(out, r64, r32)
    return ratios


def _module_run(mod, inputs, grads_out):
    """Outputs, inputs' gradients and parameters' gradients of mod(*inputs) (one output or a tuple)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    mod.zero_grad(set_to_none=True)
    outs = mod(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o) for o, g in zip(outs, grads_out)])
    res = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    res.update({f"d_input{i}": x.grad for i, x in enumerate(xs)})
    res.update({n: p.grad for n, p in mod.named_parameters() if p.grad is not None})
    return res


def module_ratios(model: nn.Module, captured: dict, backends: Iterable[str],
                  set_backend: Callable[[nn.Module, str], None], seed: int = 0) -> dict[str, dict[str, dict]]:
    """{module: {backend: {output / input gradient / parameter gradient: ratio}}}: each captured module
    (a copy) alone on its float64 inputs, against itself on the reference backend in float64 and
    float32; ``set_backend(module, backend)`` switches a module's kernels."""
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    result = {}
    for name, xs64 in captured.items():
        m64 = copy.deepcopy(mods[name]).double()
        set_backend(m64, "reference")
        with torch.no_grad():
            outs = m64(*xs64)
        gs = [torch.randn(o.shape, generator=gen) for o in (outs if isinstance(outs, tuple) else (outs,))]
        r64 = _module_run(m64, xs64, gs)
        runs = {}
        for be in ["reference", *backends]:
            m = copy.deepcopy(mods[name]).float()
            set_backend(m, be)
            runs[be] = _module_run(m, [x.float() for x in xs64], gs)
        result[name] = {be: {k: rule_ratio(runs[be][k], r64[k], runs["reference"][k]) for k in r64}
                        for be in backends}
    return result
