"""Builds the fused kernels cedm._C (`make build-ext` = `python setup.py build_ext --inplace`).

CPU sources always (a portable copy, and on x86-64 an AVX2+FMA and an AVX-512 copy picked at
run time; CEDM_NO_AVX2=1 leaves both out, CEDM_NO_AVX512=1 the AVX-512 one); the CUDA sources too when nvcc is found (CUDA_HOME or PATH) and
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


# Per-ISA copies of csrc/cpu/kernels_impl.h: (source, flags, macro that enables its dispatch).
ISA_COPIES = {
    "avx2": (os.path.join("csrc", "cpu", "kernels_avx2.cpp"), ["-mavx2", "-mfma", "-mf16c"],
             "CEDM_HAVE_AVX2"),
    "avx512": (os.path.join("csrc", "cpu", "kernels_avx512.cpp"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-Wno-maybe-uninitialized"],  # GCC 12's avx512fintrin.h false positive
               "CEDM_HAVE_AVX512"),
}


def _isa_copies() -> list[str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
    if not x86 or os.environ.get("CEDM_NO_AVX2") is not None:
        return []
    return ["avx2"] + ([] if os.environ.get("CEDM_NO_AVX512") is not None else ["avx512"])


def _extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class Build(BuildExtension):
        """Compiles each ISA copy (csrc/cpu/kernels_<isa>.cpp) alone with its flags (setuptools
        has no per-file flags) and links the objects last (extra_objects follow the extension's
        own objects, so the linker keeps the portable copy of any shared inline function)."""

        def build_extension(self, ext):
            for isa in getattr(ext, "cedm_isas", []):
                source, flags, _ = ISA_COPIES[isa]
                args = ext.extra_compile_args
                cxx = (args["cxx"] if isinstance(args, dict) else list(args)) + flags
                objs = self.compiler.compile(
                    [source], output_dir=self.build_temp, macros=ext.define_macros,
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
    isas = _isa_copies()
    cxx += [f"-D{ISA_COPIES[isa][2]}" for isa in isas]
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
    ext.cedm_isas = isas
    print(f"cedm: building cedm._C: CPU kernels (portable{''.join(' + ' + i.upper() for i in isas)})"
          f"{', CUDA kernels for TORCH_CUDA_ARCH_LIST=' + os.environ['TORCH_CUDA_ARCH_LIST'] if use_cuda else ', no CUDA (nvcc not found or CEDM_NO_CUDA set)'}",
          file=sys.stderr)
    return [ext], {"build_ext": Build}


if _extension_build_requested():
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
else:
    setup()
