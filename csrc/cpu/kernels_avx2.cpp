// CPU kernels for AVX2 + FMA + F16C, picked at run time by csrc/ops.cpp when the CPU has them
// (the scheme of ATen's per-capability kernels). setup.py compiles this one file with
// -mavx2 -mfma -mf16c and links its object after all the others, so that the linker keeps the
// portable copy of any inline function (C++ library, c10) that this file shares with them.
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (setup.py does this)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CEDM_ISA avx2
#include "kernels_impl.h"
