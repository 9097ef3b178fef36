"""Where a fast backend's error comes from in the whole model: the tolerance rule's ratio
(max|fast - ref64| / allowed) per gradient of the whole model, and per SS2D and CGM module run alone
on the activations the float64 reference model feeds it (its outputs, its inputs' gradients and its
parameters' gradients), so a miss of the whole-model test can be traced to one module.

    python benchmarks/model_error_map.py [--backends cuda,triton] [--size 128] [--top 12] [--activations]
                                         [--repeat N] [--deterministic]

--repeat N runs the whole model N times and prints each run's verdict (the cuda backend's verdict
changes from run to run on one commit); --deterministic asks PyTorch and cuDNN for deterministic
algorithms (warnings where an op has none), to tell the kernels' error from run-to-run noise.

Same model, weights and inputs as tests/models/test_gpu.py::test_forward_backward_by_the_rule
(eval mode, batch 2, fp32, TF32 off). A ratio above 1 breaks the rule.
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
from tests.models.conftest import published_keys, published_tensor  # noqa: E402  (the fixture weights)
from vmambax.engine.common import deterministic_algorithms  # noqa: E402
from vmambax.models import from_reference_checkpoint  # noqa: E402
from vmambax.models.fusion import CGM  # noqa: E402
from vmambax.models.vmambax import set_backend  # noqa: E402
from vmambax.testing import activation_errors, model_runs, module_ratios, whole_model_ratios  # noqa: E402
from vmambax_kernels.modules import SS2D  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--activations", action="store_true",
                    help="also each SS2D and CGM output's forward error in the whole model, in order")
    ap.add_argument("--repeat", type=int, default=1, help="whole-model runs, each with its verdict")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic PyTorch/cuDNN/cuBLAS algorithms (warn where an op has none)")
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    with deterministic_algorithms(args.deterministic):  # restored for a caller in the same process
        return _report(args, backends)


def _report(args, backends):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    sd = {k: published_tensor(k, shape) for k, shape, _ in published_keys()}
    model = from_reference_checkpoint(sd).to(args.device).eval()
    gen = torch.Generator().manual_seed(7)
    s = args.size
    ct, pet = (torch.rand(2, 1, s, s, generator=gen) * 3.2 - 1.6 for _ in range(2))
    g = torch.randn(2, 1, s, s, generator=gen)
    names = [n for n, m in model.named_modules() if isinstance(m, (SS2D, CGM))]
    for run in range(args.repeat):
        runs, captured = model_runs(model, ct, pet, g, backends, capture=names)
        for be in backends:
            r = whole_model_ratios(runs, be)
            worst = sorted(r.items(), key=lambda kv: -kv[1])
            print(f"== whole model, run {run + 1}, {be}: {sum(v > 1 for v in r.values())} of {len(r)} break the"
                  f" rule; worst {worst[0][1]:.3f} ({worst[0][0]})")
            for n, v in worst[: args.top] if run == 0 else ():
                print(f"   {v:6.3f}  {n}")

    if args.activations:
        print("== forward, each module's output in the whole model (in the order they run): max|x - ref64|"
              " of the float32 reference and each backend, each backend's as a multiple of the reference's,"
              " and [mean(e) / mean|e|] of each error e (near 0: no preferred sign; near +-1: an offset)")
        for name, err in activation_errors(model, ct, pet, backends, names).items():
            ref = err["ref32"]["max"]
            print(f"   {name:60s} ref32 {ref:9.2e} [{err['ref32']['bias']:+.2f}]  " + "  ".join(
                f"{be} {err[be]['max']:9.2e} ({err[be]['max'] / ref if ref else float('inf'):5.2f}x)"
                f" [{err[be]['bias']:+.2f}]" for be in backends))

    print("== each module alone on the float64 model's activations: worst ratio (of outputs, input"
          " gradients, parameter gradients) per backend")
    worst = {name: {be: max(r.items(), key=lambda kv: kv[1]) for be, r in per.items()}
             for name, per in module_ratios(model, captured, backends, set_backend).items()}
    for name, w in sorted(worst.items(), key=lambda kv: -max(v for _, v in kv[1].values()))[: 3 * args.top]:
        print(f"   {name:60s} " + "  ".join(f"{be} {v:6.3f} ({k})" for be, (k, v) in w.items()))


if __name__ == "__main__":
    main()
