"""Build of torchslim's compiled extension, torchslim._C.

The CPU kernels are always built (each kernel compiled once per ISA level and chosen at run time,
so no -march=native). The CUDA kernels are added when torch was built with CUDA and nvcc is
found; TORCH_CUDA_ARCH_LIST is honoured (default: sm_80 and sm_90a, plus sm_80's PTX, which newer
GPUs compile when loaded, so a build runs on them rather than finding no kernel image).

Environment:
    TORCHSLIM_NO_EXTENSION=1   install the pure-Python package only (reference path)
    TORCHSLIM_NO_CUDA=1        skip the CUDA kernels even where they could be built
    MAX_JOBS=N                 parallel compile jobs (ninja)
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _extensions():
    if _flag("TORCHSLIM_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    sources += [
        f"csrc/bindings/{name}.cpp" for name in ("module", "registry", "cpu_ops", "cpu_sparse_ops")
    ]
    # -fopenmp: at::parallel_for is a header template that parallelises only in units compiled
    # with OpenMP; the libgomp.so.1 it links is the one torch has already loaded (same soname),
    # so torch.set_num_threads governs our threads too.
    # -ffp-contract=off: a plain a * b + c rounds twice at every ISA level (the kernels' FMAs are
    # intrinsics), so a scalar epilogue gives the same bits as PyTorch adding the bias after.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
    cxx.append(f'-DTORCHSLIM_TORCH_VERSION="{torch.__version__}"')
    link = ["-fopenmp"]
    include_dirs = [str(CSRC / "include"), str(CSRC)]

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    with_cuda = with_cuda and not _flag("TORCHSLIM_NO_CUDA")
    if not with_cuda:
        ext = CppExtension(
            "torchslim._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
        return [ext], {"build_ext": BuildExtension}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    sources += ["csrc/bindings/cuda_ops.cpp"]
    nvcc = ["-O3", "-lineinfo", "-DTORCHSLIM_WITH_CUDA", "--expt-relaxed-constexpr"]
    ext = CUDAExtension(
        "torchslim._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": [*cxx, "-DTORCHSLIM_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
