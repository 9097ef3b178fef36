"""benchmarks/count_copies.py on CPU (its only home): it counts the model's copies, scales those that
grow with the batch, and charges backward copies to the forward line that made their autograd node."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import count_copies  # noqa: E402


def test_counts_and_attributes_copies(capsys):
    count_copies.main(["--size", "64", "--top", "100"])
    out = capsys.readouterr().out
    total = float(re.search(r"512x512: ([\d.]+) GB", out).group(1))
    rows = re.findall(r"^\s*([\d.]+)\s+[\d.]+\s+(\d+)\s+(forward|backward)\s+(\S+)\s+(\S+)$", out, flags=re.M)
    fixed = float(re.search(r"; ([\d.]+) GB of it does not grow with the batch", out).group(1))
    assert total > 0 and rows and 0 <= fixed <= total   # parameter-sized copies counted once, not scaled
    assert abs(sum(float(r[0]) for r in rows) - total) <= 0.01 * total + 0.01 * len(rows)  # all rows shown
    assert any(r[2] == "backward" and r[4] != "?" for r in rows)   # anomaly-mode attribution works
    assert all("reference.py" not in r[4] or "cgm" in r[4] for r in rows)  # the scan is the stand-in
