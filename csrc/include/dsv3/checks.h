// Argument checks that raise Python ValueError/TypeError naming the op and the argument.
#pragma once
#include <c10/util/Exception.h>

// DSV3_CHECK(cond, op, "argument must ...", extra...) -> ValueError "op: argument must ... extra"
#define DSV3_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)
#define DSV3_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, op, ": ", __VA_ARGS__)
