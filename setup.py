"""Build minalign and its C++/CUDA extension `minalign._C`.

Install without build isolation, so the extension is compiled against the torch
already installed (an isolated build would fetch and build against another one):

    pip install --no-build-isolation -e .

The CUDA kernels are compiled whenever torch is a CUDA build and nvcc is found;
no GPU is needed to compile them. MINALIGN_CUDA=1 forces the CUDA build (and fails
if it cannot be done), MINALIGN_CUDA=0 builds the CPU kernels only.
"""

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, from CUDA_HOME/CUDA_PATH or from the nvcc on the PATH.

    torch would take the folder above nvcc's folder, which is wrong when nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc`):
    follow links and such a wrapper to the real binary.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper script: find the binary it runs
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if match:
            nvcc = os.path.realpath(match.group(1).decode())
    return str(Path(nvcc).parent.parent)


def nvidia_pip_includes() -> list[str]:
    """Header folders of the nvidia-* pip packages (cuBLAS, cuSPARSE ... that ATen includes)."""
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(site, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def loaded_libstdcxx_dir() -> list[str]:
    """A folder whose libstdc++.so is the libstdc++ this Python process runs with.

    A C++ compiler newer than that library (say one in /opt, named by CXX) links its
    own libstdc++ - statically, where it ships no shared one - and two libstdc++ in
    one process crash at the first error message that formats a number. Linking
    against the loaded library keeps one. Empty where it cannot be found (no /proc).
    """
    import torch  # noqa: F401  (loads the libstdc++ that the extension will run with)

    try:
        with open("/proc/self/maps") as f:
            path = next((line.split()[-1] for line in f if "/libstdc++.so" in line), None)
    except OSError:
        return []
    if path is None or not os.path.isfile(path):
        return []
    folder = ROOT / "build" / "libstdcxx"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "libstdc++.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(path)
    return [str(folder)]


def openmp_flags() -> list[str]:
    """-fopenmp where torch runs its threads with OpenMP (its Linux builds), else nothing.

    There at::parallel_for is a `#pragma omp parallel` in a header: compiled without
    -fopenmp, the CPU kernels would run on one thread. Only compiled with it, not
    linked: the OpenMP calls then resolve to the runtime torch itself depends on
    (libgomp, or Intel's in some builds), never to a second one.
    """
    import torch

    return ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []


def want_cuda() -> bool:
    import torch

    forced = os.environ.get("MINALIGN_CUDA")
    possible = torch.version.cuda is not None and find_cuda_home() is not None
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            raise RuntimeError(
                "MINALIGN_CUDA=1 but the CUDA build is impossible: "
                f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={find_cuda_home()}"
            )
        return True
    return possible


def extensions():
    cuda = want_cuda()
    if cuda:
        os.environ["CUDA_HOME"] = find_cuda_home()  # before cpp_extension reads it
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20"] + openmp_flags()  # torch >= 2.10 headers need C++20
    if not sources:
        return [], {}
    if cuda:
        sources += sorted(glob.glob("csrc/*.cu"))
        ext = CUDAExtension(
            "minalign._C",
            sources,
            include_dirs=nvidia_pip_includes(),
            library_dirs=loaded_libstdcxx_dir(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            define_macros=[("MINALIGN_WITH_CUDA", None)],
        )
    else:
        ext = CppExtension("minalign._C", sources, library_dirs=loaded_libstdcxx_dir(),
                           extra_compile_args={"cxx": cxx_flags})
    print(f"minalign: building the {'CUDA + CPU' if cuda else 'CPU'} extension", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="minalign",
    version="0.1.0",
    description="Minimal, readable SFT, reward modelling, RLHF (PPO) and DPO with fused kernels",
    packages=find_packages(include=["minalign", "minalign.*"]),
    package_data={"minalign": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "tiktoken", "vaderSentiment"],
    extras_require={"plots": ["matplotlib"]},  # the figures of experiments/ (CSV without it)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
