// CPU kernels built with the compiler's default flags (portable; generic at::vec lanes).
#define CPU_CAPABILITY DEFAULT
#define CEDM_ISA base
#include "kernels_impl.h"
