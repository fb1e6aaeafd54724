// The element types the torch-free CUDA kernel APIs take (csrc/cuda/*.h).
#pragma once

#include <cstdint>

namespace torchslim::cuda {

// Element type of a float (or int32 output) operand.
enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kInt32 = 3 };

}  // namespace torchslim::cuda
