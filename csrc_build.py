"""Sources and compiler flags of the CUDA extension: used by setup.py and by the CPU compile test."""
import os
import subprocess
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


def loaded_libstdcxx() -> str | None:
    """The libstdc++ shared library mapped into this process (torch, once imported, maps it)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None


def linker_candidates() -> list[str]:
    """The C++ compilers setuptools may link the extension with ($CXX, then Python's own CXX)."""
    import sysconfig
    names = [os.environ.get("CXX"), (sysconfig.get_config_var("CXX") or "").split(" ")[0], "c++"]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def cxx_runtime_link_args(compilers: list[str]) -> list[str]:
    """Link the C++ runtime that torch runs with when the compiler can only link a static one.

    A compiler that ships libstdc++.a but no libstdc++.so links a second, private copy of libstdc++
    into the extension (no libstdc++.so.6 among its NEEDED libraries). Seen on a GPU machine whose
    $CXX was such a g++: every TORCH_CHECK of the extension died with SIGSEGV inside the
    extension's operator<< while formatting the message's numbers (a shape, a stride), instead of
    raising. Naming the loaded libstdc++.so.6 on the link line makes the extension use the one
    runtime of the process; all the checks then raise RuntimeError with their messages.
    """
    def links_shared(cxx: str) -> bool:
        try:
            found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                                   timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return True  # not a compiler here: nothing to fix
        return os.path.isabs(found) and os.path.exists(found)

    if all(links_shared(c) for c in compilers):
        return []
    lib = loaded_libstdcxx()
    return [lib] if lib else []


def extension_kwargs(root: Path, archs: str) -> dict:
    return dict(
        sources=sources(root),
        include_dirs=[str(root / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": NVCC_FLAGS + gencode_flags(archs)},
        extra_link_args=cxx_runtime_link_args(linker_candidates()),
    )
