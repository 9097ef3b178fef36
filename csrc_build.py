"""Sources and compiler flags of the CUDA extension: used by setup.py and by the CPU compile test."""
from pathlib import Path


def sources(root: Path) -> list[str]:
    csrc = root / "csrc"
    return sorted(str(p.relative_to(root)) for p in list(csrc.rglob("*.cu")) + list(csrc.rglob("*.cpp")))


def gencode_flags(archs: str) -> list[str]:
    flags = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if a:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


# No --use_fast_math: the tolerance rule (2x the fp32 reference error) leaves no room for __expf /
# __logf in softplus; the scan exps are exp2f, one MUFU ex2 either way.
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def extension_kwargs(root: Path, archs: str) -> dict:
    return dict(
        sources=sources(root),
        include_dirs=[str(root / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": NVCC_FLAGS + gencode_flags(archs)},
    )
