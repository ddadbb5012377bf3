"""Builds the fused kernels cedm._C (`make build-ext` = `python setup.py build_ext --inplace`).

CPU sources always (a portable copy, and on x86-64 an AVX2+FMA copy picked at run time;
CEDM_NO_AVX2=1 leaves it out); the CUDA sources too when nvcc is found (CUDA_HOME or PATH) and
CEDM_NO_CUDA is unset, for TORCH_CUDA_ARCH_LIST (default 8.0;9.0).
Package metadata lives in pyproject.toml: `pip install -e .` runs this file too (in an isolated
build environment without torch), so the torch extension is only defined for `build_ext`.
"""
import os
import platform
import shutil
import sys

from setuptools import setup

def _extension_build_requested() -> bool:
    return "build_ext" in sys.argv[1:]


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


AVX2_SOURCE = os.path.join("csrc", "cpu", "kernels_avx2.cpp")
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def _avx2_possible() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32" \
        and os.environ.get("CEDM_NO_AVX2") is None


def _extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class Build(BuildExtension):
        """Compiles csrc/cpu/kernels_avx2.cpp alone with the AVX2 flags (setuptools has no per-file
        flags) and links its object last (extra_objects follow the extension's own objects)."""

        def build_extension(self, ext):
            if getattr(ext, "cedm_avx2", False):
                args = ext.extra_compile_args
                cxx = (args["cxx"] if isinstance(args, dict) else list(args)) + AVX2_FLAGS
                objs = self.compiler.compile(
                    [AVX2_SOURCE], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": cxx, "nvcc": []}, depends=ext.depends)
                ext.extra_objects = [o for o in ext.extra_objects if o not in objs] + objs
            super().build_extension(ext)

    rel = lambda *p: os.path.join("csrc", *p)  # noqa: E731
    sources = [rel("ops.cpp"), rel("cpu", "kernels_base.cpp")]
    depends = [rel("cedm_math.h"), rel("cedm_ops.h"), rel("cpu", "kernels.h"),
               rel("cpu", "kernels_impl.h")]
    # portable: no -march (SIMD through the AVX2 object); no FMA contraction, so that every pass
    # rounds like the reference (z/T in the logsumexp and in log a must be the same number)
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-unknown-pragmas",
           "-Wno-psabi"]
    link = ["-fopenmp"]  # at::parallel_for is OpenMP in the header; same libgomp as torch
    avx2 = _avx2_possible()
    if avx2:
        cxx.append("-DCEDM_HAVE_AVX2")
    use_cuda = os.environ.get("CEDM_NO_CUDA") is None and _find_nvcc() is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # no fast-math and no FMA contraction: the same arithmetic as the CPU kernels
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]
        ext = CUDAExtension(
            "cedm._C", sources + [rel("cuda", "kernels.cu")], depends=depends,
            extra_compile_args={"cxx": cxx + ["-DCEDM_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link)
    else:
        ext = CppExtension("cedm._C", sources, depends=depends,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    ext.cedm_avx2 = avx2
    print(f"cedm: building cedm._C: CPU kernels (portable{' + AVX2' if avx2 else ''})"
          f"{', CUDA kernels for TORCH_CUDA_ARCH_LIST=' + os.environ['TORCH_CUDA_ARCH_LIST'] if use_cuda else ', no CUDA (nvcc not found or CEDM_NO_CUDA set)'}",
          file=sys.stderr)
    return [ext], {"build_ext": Build}


if _extension_build_requested():
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
else:
    setup()
