"""Build hessgap and its torch C++ extension ``hessgap._C``.

The CUDA kernels are built when the installed torch is a CUDA build and nvcc can be found (or when
``HESSGAP_FORCE_CUDA=1``); the decision never depends on a GPU being present, so a GPU-less build
machine still produces the CUDA extension. ``HESSGAP_FORCE_CPU=1`` builds the CPU kernels only.
``TORCH_CUDA_ARCH_LIST`` picks the architectures, as in any torch extension.
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The version written once, in hessgap/_version.py."""
    with open(os.path.join(ROOT, "hessgap", "_version.py"), encoding="utf-8") as handle:
        return re.search(r'^__version__ = "([^"]+)"', handle.read(), re.M).group(1)


VERSION = _version()


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _want_cuda():
    import torch

    if _env_flag("HESSGAP_FORCE_CPU"):
        return False
    if _env_flag("HESSGAP_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and _find_nvcc() is not None


def _cuda_include_dirs():
    """Headers of the CUDA math libraries that torch's headers include (cusparse.h, cublas_v2.h).

    pip-installed CUDA builds of torch ship them in ``site-packages/nvidia/<library>/include`` (CUDA 13:
    ``nvidia/cu13/include``) rather than in the toolkit, so add every such folder that exists.
    """
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(
            "hessgap compiles its extension against the installed torch, and none was found in this build "
            "environment. Install torch first (e.g. `pip install torch==2.13.0`), then build without "
            "isolation: `pip install --no-build-isolation .`"
        ) from None


def _extensions():
    _require_torch()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = _want_cuda()
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    define_macros = [
        ("HESSGAP_VERSION", f'"{VERSION}"'),
        ("HESSGAP_CUDA_ARCHS", f'"{arch_list}"'),
    ]
    # no -std flag: torch's build helper picks the standard its headers need (C++17 or C++20)
    cxx_flags = ["-O3", "-fopenmp"] if os.name != "nt" else ["/O2"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        define_macros.append(("HESSGAP_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-lineinfo"]
        return [
            CUDAExtension(
                "hessgap._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs + _cuda_include_dirs(),
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "hessgap._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="hessgap",
    version=VERSION,
    description="Sharpness, Hessian spectra and the large-batch generalization gap (Keskar et al. 2017)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hessgap", "hessgap.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    python_requires=">=3.10",
    # what the package imports at run time; the build needs torch, pybind11 and ninja installed beforehand
    # (`pip install --no-build-isolation` builds against them; the "build" extra lists them)
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "build": ["pybind11", "ninja"],
        # transformers: the graph engine's tests build Hugging Face models from small random configs;
        # accelerate and lightning: the tracker's callbacks are tested in the real Trainer and Lightning Trainer
        "test": ["pytest>=7", "pytest-benchmark", "ruff", "transformers", "accelerate", "lightning"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["hessgap=hessgap.cli:main"]},
    zip_safe=False,
)
