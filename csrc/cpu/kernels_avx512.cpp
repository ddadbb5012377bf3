// CPU kernels for AVX-512 (F, BW, VL, DQ) + FMA + F16C, picked at run time by csrc/ops.cpp when
// the CPU has them (ATen's own CPU kernels use their AVX-512 copy there: at 16 lanes, an
// elementwise kernel with an exp per element (the fused GroupNorm+SiLU) would otherwise lose to
// them). setup.py compiles this one file with the flags below and links its object after the
// portable one, as it does the AVX2 copy.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define CEDM_ISA avx512
#include "kernels_impl.h"
