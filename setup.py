"""Build script for lps_fast.

Two compiled extensions, each optional at run time:

* ``lps_fast._C``     C++ CPU kernels (always built unless LPS_FAST_NO_EXTENSION=1);
* ``lps_fast._C_cuda`` CUDA kernels (built when nvcc and a CUDA build of torch are present,
  or forced with LPS_FAST_FORCE_CUDA=1; skipped with LPS_FAST_CPU_ONLY=1).

The Triton kernels in ``kernels/`` are plain Python and install as ``lps_fast.kernels``.
Every switch is listed in README.md ("Environment variables").
"""

import glob
import platform
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"[lps_fast setup] {message}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _has_cudart(root: str) -> bool:
    candidates = [
        os.path.join(root, "lib64", "libcudart.so"),
        os.path.join(root, "lib", "libcudart.so"),
        os.path.join(root, "targets", "x86_64-linux", "lib", "libcudart.so"),
        os.path.join(root, "targets", "sbsa-linux", "lib", "libcudart.so"),
    ]
    return any(os.path.exists(path) for path in candidates)


def _find_cuda_home():
    """The toolkit root: the folder holding bin/nvcc and the CUDA runtime library.

    torch guesses the root as the parent of the first ``nvcc`` on PATH, which is wrong when that
    nvcc is a wrapper script. Check each candidate for both files before trusting it, and export
    the answer so torch.utils.cpp_extension (imported afterwards) agrees with us.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # A wrapper script names the real compiler inside it.
        try:
            with open(nvcc, "r", errors="ignore") as handle:
                head = handle.read(4096)
            for token in head.replace('"', " ").replace("'", " ").split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return os.path.realpath(root)
    return None


def _extensions():
    if _flag("LPS_FAST_NO_EXTENSION"):
        _log("LPS_FAST_NO_EXTENSION=1: building no compiled extension (reference path only)")
        return [], {}

    cuda_home = None
    want_cuda = not _flag("LPS_FAST_CPU_ONLY")
    if want_cuda:
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    # Imported only now: cpp_extension reads CUDA_HOME when it is first imported.
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    debug = _flag("LPS_FAST_DEBUG_BUILD")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    if not debug and not _flag("LPS_FAST_PORTABLE") and platform.machine() in ("x86_64", "AMD64"):
        # The extension is built on the machine that runs it: use its vector units.
        cxx_flags.append("-march=native")
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    link_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []

    version_macro = [("LPS_FAST_TORCH_VERSION", '"%s"' % torch.__version__.split("+")[0])]
    cpu_sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
    )
    extensions = [
        CppExtension(
            name="lps_fast._C",
            sources=cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=version_macro,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]
    _log(f"building the CPU extension lps_fast._C from {len(cpu_sources)} sources")

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if not want_cuda:
        _log("LPS_FAST_CPU_ONLY=1: skipping the CUDA extension")
    elif torch.version.cuda is None:
        _log(f"skipping the CUDA extension: torch {torch.__version__} is not a CUDA build")
    elif cuda_home is None:
        _log("skipping the CUDA extension: no CUDA toolkit found "
             "(set CUDA_HOME to the folder holding bin/nvcc and lib64/libcudart.so)")
    elif not cuda_sources:
        _log("skipping the CUDA extension: no sources under csrc/cuda")
    else:
        # Without a GPU, torch would compile for every architecture it knows; Ampere and Hopper
        # are the targets we support and measure.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # No --use_fast_math: the kernels are memory-bound, and exact division and sqrt keep them
        # within float32 rounding of the reference.
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        if debug:
            nvcc_flags = ["-O0", "-g", "-G"]
        extensions.append(
            CUDAExtension(
                name="lps_fast._C_cuda",
                sources=["csrc/module.cpp"] + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=version_macro + [("LPS_FAST_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        )
        _log(f"building the CUDA extension lps_fast._C_cuda with {cuda_home} "
             f"(CUDA {torch.version.cuda}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
    if _flag("LPS_FAST_FORCE_CUDA") and len(extensions) < 2:
        raise RuntimeError("LPS_FAST_FORCE_CUDA=1 but the CUDA extension cannot be built (see above)")

    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return extensions, cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["lps_fast", "lps_fast.*"]) + ["lps_fast.kernels"],
    package_dir={"lps_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
