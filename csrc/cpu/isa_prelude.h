// Everything a per-ISA translation unit includes from outside, included BEFORE the unit
// enables its target. Inline functions from these headers are then compiled for the baseline
// ISA, so the linker can never pick an AVX-512 copy of a shared inline function for code that
// runs on a CPU without AVX-512. Kernel code after the target switch includes no standard header
// itself: the ones it uses (std::vector) come from here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>  // the SpMM's per-block state

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernels.h"
