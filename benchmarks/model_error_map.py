"""Where a fast backend's error comes from in the whole model: the tolerance rule's ratio
(max|fast - ref64| / allowed) per gradient of the whole model, and per SS2D and CGM module run alone
on the activations the float64 reference model feeds it (its output, its input's gradient and its
parameters' gradients), so a miss of the whole-model test can be traced to one module.

    python benchmarks/model_error_map.py [--backends cuda,triton] [--size 128] [--top 12]

Same model, weights and inputs as tests/models/test_gpu.py::test_forward_backward_by_the_rule
(eval mode, batch 2, fp32, TF32 off). A ratio above 1 breaks the rule.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

sys.path.insert(0, ".")
from tests.models.conftest import published_keys, published_tensor  # noqa: E402  (the fixture weights)
from vmambax.models import from_reference_checkpoint  # noqa: E402
from vmambax.models.fusion import CGM  # noqa: E402
from vmambax_kernels.modules import SS2D  # noqa: E402
from vmambax_kernels.testing import tolerance  # noqa: E402


def ratio(out, r64, r32) -> float:
    tol = tolerance(r64.cpu(), r32.cpu())
    return (out.double().cpu() - r64.double().cpu()).abs().max().item() / tol if tol > 0 else 0.0


def run(model, ct, pet, g, dtype, device):
    model.zero_grad(set_to_none=True)
    out = model(ct.to(device, dtype), pet.to(device, dtype))
    out.backward(g.to(out))
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def module_run(mod, inputs, gs):
    """mod(*inputs) -> one tensor or a tuple (CGM); backprop gs, one gradient per output."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    mod.zero_grad(set_to_none=True)
    outs = mod(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o) for o, g in zip(outs, gs)])
    res = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    res.update({f"d_input{i}": x.grad for i, x in enumerate(xs)})
    res.update({n: p.grad for n, p in mod.named_parameters() if p.grad is not None})
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    sd = {k: published_tensor(k, shape) for k, shape, _ in published_keys()}
    model = from_reference_checkpoint(sd).to(args.device).eval()
    gen = torch.Generator().manual_seed(7)
    s = args.size
    ct, pet = (torch.rand(2, 1, s, s, generator=gen) * 3.2 - 1.6 for _ in range(2))
    g = torch.randn(2, 1, s, s, generator=gen)

    # the float64 reference run, with every SS2D's and CGM's inputs captured
    captured = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, [x.detach() for x in i]))
             for n, m in model.named_modules() if isinstance(m, (SS2D, CGM))]
    runs = {"ref64": run(model.double().set_backend("reference"), ct, pet, g, torch.float64, args.device)}
    for h in hooks:
        h.remove()
    runs["ref32"] = run(model.float().set_backend("reference"), ct, pet, g, torch.float32, args.device)
    for be in args.backends.split(","):
        runs[be] = run(model.float().set_backend(be), ct, pet, g, torch.float32, args.device)
        r = {n: ratio(runs[be][1][n], runs["ref64"][1][n], runs["ref32"][1][n]) for n in runs["ref64"][1]}
        r["logits"] = ratio(runs[be][0], runs["ref64"][0], runs["ref32"][0])
        worst = sorted(r.items(), key=lambda kv: -kv[1])[: args.top]
        print(f"== whole model, {be}: {sum(v > 1 for v in r.values())} of {len(r)} break the rule; worst:")
        for n, v in worst:
            print(f"   {v:6.3f}  {n}")

    mods = dict(model.named_modules())
    print("== each module alone on the float64 model's activations: worst ratio (of output, input"
          " gradients, parameter gradients) per backend")
    rows = []
    for name, xs64 in captured.items():
        m64 = copy.deepcopy(mods[name]).double()
        _set_backend(m64, "reference")
        with torch.no_grad():
            outs = m64(*xs64)
        gm = [torch.randn(o.shape, generator=gen) for o in (outs if isinstance(outs, tuple) else (outs,))]
        r64 = module_run(m64, xs64, gm)
        row = {}
        for be in ["reference"] + args.backends.split(","):
            mb = copy.deepcopy(mods[name]).float()
            _set_backend(mb, be)
            row[be] = module_run(mb, [x.float() for x in xs64], gm)
        worst = {}
        for be in args.backends.split(","):
            items = {k: ratio(row[be][k], r64[k], row["reference"][k]) for k in r64}
            worst[be] = max(items.items(), key=lambda kv: kv[1])
        rows.append((name, worst))
    for name, worst in sorted(rows, key=lambda r: -max(v for _, v in r[1].values()))[: 3 * args.top]:
        print(f"   {name:60s} " + "  ".join(f"{be} {v:6.3f} ({k})" for be, (k, v) in worst.items()))


def _set_backend(mod, backend):
    for m in mod.modules():
        if isinstance(m, SS2D):
            m.backend = backend
        elif isinstance(m, CGM):
            m.backend = None if backend == "cuda" else backend  # as VMambaX.set_backend


if __name__ == "__main__":
    main()
