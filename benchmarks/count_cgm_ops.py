"""Host work of one CGM module step (vmambax.models.fusion.CGM, forward + backward): autograd nodes,
top-level ATen ops that do work (views, allocations and no-op casts left out) and Triton launches,
for the fused module path and the PyTorch channel-MLP path. The eager module is host-bound
(benchmarks/NOTES.md, "CGM kernel"), so these counts are what the fused path is for.

    python benchmarks/count_cgm_ops.py [--device cuda]    # CPU: the Triton interpreter, tiny shape

On CPU the counts are those of a GPU run (same code path); the wall time is not.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# ops that launch nothing or only allocate (a no-op aten::to is dropped separately)
_FREE = {"aten::view", "aten::as_strided", "aten::expand", "aten::flatten", "aten::reshape", "aten::unsqueeze",
         "aten::select", "aten::slice", "aten::t", "aten::transpose", "aten::permute", "aten::squeeze", "aten::detach",
         "aten::alias", "aten::_reshape_alias", "aten::empty", "aten::empty_like", "aten::empty_strided",
         "aten::resize_", "aten::lift_fresh", "aten::_unsafe_view", "aten::result_type", "aten::narrow"}


def count(fused: bool, training: bool, device: str, shape=(2, 16, 6, 5)):
    import triton.runtime.interpreter as ti
    from torch.profiler import ProfilerActivity, profile

    from vmambax.models.fusion import CGM
    from vmambax_kernels.cgm import module_triton
    launches = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        cls = ti.InterpretedFunction
        orig = cls.run

        def run(self, *a, **k):
            launches.append(self.fn.__name__)
            with torch.profiler.record_function("triton_launch"):  # its host emulation is not counted
                return orig(self, *a, **k)
    else:
        import triton.runtime.jit as tj
        cls = tj.JITFunction
        orig = cls.run

        def run(self, *a, **k):
            launches.append(self.fn.__name__)
            return orig(self, *a, **k)
    cls.run = run
    supported = module_triton.supported
    if not fused:
        module_triton.supported = lambda *a, **k: "off for the count"
    try:
        torch.manual_seed(0)
        m = CGM(shape[1], backend="triton").to(device).train(training)
        x = [torch.randn(*shape, device=device).requires_grad_() for _ in range(2)]
        g = [torch.ones(shape, device=device) for _ in range(2)]

        def step():
            for t in (*x, *m.parameters()):
                t.grad = None
            ys = m(*x)
            torch.autograd.backward(ys, g)
            return ys
        step()  # warm-up: kernels built
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ys = step()
        nodes, todo = set(), [y.grad_fn for y in ys]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in nodes:
                nodes.add(fn)
                todo += [f for f, _ in fn.next_functions]
    finally:
        module_triton.supported = supported
        cls.run = orig

    def top(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::") or p.name == "triton_launch":
                return False
            p = p.cpu_parent
        return True
    ops = [e for e in prof.events() if e.name.startswith("aten::") and top(e) and e.name not in _FREE]
    ops = [e for e in ops if e.name != "aten::to" or any(c.name == "aten::_to_copy" for c in e.cpu_children)]
    compute_nodes = [n for n in nodes if type(n).__name__ != "AccumulateGrad"]
    return dict(nodes=len(compute_nodes), ops=len(ops), launches=len(launches),
                op_names=Counter(e.name for e in ops), launch_names=Counter(launches))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    for training in (True, False):
        for fused in (False, True):
            r = count(fused, training, args.device)
            print(f"{'fused' if fused else 'torch MLP'} {'train' if training else 'eval'}: autograd nodes "
                  f"{r['nodes']} (AccumulateGrad left out), ATen ops {r['ops']}, Triton launches {r['launches']}, "
                  f"host launches {r['ops'] + r['launches']}")
            print(f"    ops {dict(r['op_names'])}\n    launches {dict(r['launch_names'])}")


if __name__ == "__main__":
    main()
