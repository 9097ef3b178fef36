"""benchmarks/model_floor.py on CPU (meta tensors): the scan elements it counts agree with the scan
op's own multiply-add formula (9 B L D N + B D L with D = 4 Dm, fvcore's convention: between 9 and
10 per element), every part of the model that scans is counted, and the floors it prints add up."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import model_floor  # noqa: E402
from vmambax.models import VMambaX, count_flops  # noqa: E402


def test_elements_match_the_scan_flops():
    model = VMambaX()
    elements = model_floor.scan_elements(model, batch=2, size=128)
    assert elements["encoder"] > 0 and elements["dcim"] > 0 and elements["decoder"] > 0
    assert elements["cgm"] == 0
    scans = count_flops(model, (128, 128), batch=2)["scans"]
    total = sum(elements.values())
    assert 9 * total < scans <= 10 * total


def test_printed_floors(capsys):
    model_floor.main(["--batch", "2", "--size", "128", "--measured-train", "50", "--measured-infer", "10"])
    out = capsys.readouterr().out
    train = float(re.search(r"training step: floor ([\d.]+) ms; measured 50 ms", out).group(1))
    infer = float(re.search(r"inference: floor ([\d.]+) ms; measured 10 ms", out).group(1))
    scan_fb = float(re.search(r"forward \+ backward ([\d.]+) ms", out).group(1))
    assert 0 < infer < train and scan_fb < train
