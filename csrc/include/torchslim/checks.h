// Argument checks for the binding layer (the only code that includes torch headers).
//
// TORCHSLIM_CHECK(cond, "w_scale must have N=", n, " elements, got ", s) raises a Python
// ValueError whose message states the rule and the actual value; TORCHSLIM_CHECK_TYPE raises
// TypeError (wrong dtype), TORCHSLIM_CHECK_RUNTIME a RuntimeError (device or kernel failures).
#pragma once

#include <c10/util/Exception.h>

#define TORCHSLIM_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define TORCHSLIM_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
#define TORCHSLIM_CHECK_RUNTIME(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
