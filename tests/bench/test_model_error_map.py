"""benchmarks/model_error_map.py on CPU: the reference backend against itself (the same float32
computation twice) must land at the rule's ratio of one half or below everywhere, which checks the
script's capture of each module's inputs, its per-module runs and its ratios."""
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import model_error_map  # noqa: E402


def test_reference_against_itself(capsys):
    model_error_map.main(["--device", "cpu", "--backends", "reference", "--size", "32", "--top", "200",
                          "--activations", "--repeat", "2", "--deterministic"])
    assert not torch.are_deterministic_algorithms_enabled()   # the switch is restored
    out = capsys.readouterr().out
    # --activations: the reference backend in float32 repeats the float32 reference's forward exactly
    # (ratio 1.00), with the same sign balance of its errors ([mean(e) / mean|e|])
    forward = re.findall(r"ref32\s+\S+ \[([+-][\d.]+)\]\s+reference\s+\S+ \(\s*([\d.]+)x\) \[([+-][\d.]+)\]", out)
    assert forward and all(x == "1.00" and b32 == b for b32, x, b in forward), forward
    out = out.replace(out[out.index("== forward"):out.index("== each module alone")], "")
    assert len(re.findall(r"whole model, run [12], reference: 0 of \d+ break the rule", out)) == 2
    modules = [line for line in out.splitlines() if re.match(r"\s+\S+\s+reference\s+[\d.]+ \(", line)]
    assert any(".op " in line for line in modules) and any("modal_fusion" in line for line in modules)
    ratios = [float(x) for x in re.findall(r"reference\s+([\d.]+) \(", out)]
    ratios += [float(x) for x in re.findall(r"^\s+([\d.]+)\s+\S", out, flags=re.M)]
    assert ratios and max(ratios) <= 0.5 + 1e-9, max(ratios)
