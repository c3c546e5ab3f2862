// hessgap::box_ascent_step's CPU kernel compiled for AVX2 (the kernel source is
// include/hessgap/box_ascent_cpu.h; csrc/box_ascent.cpp picks this variant at run time when the CPU
// and torch's ATEN_CPU_CAPABILITY allow it). Only the kernel lives here: everything in this file is
// compiled for AVX2, so nothing else may be.
//
// No FMA on purpose: a fused multiply-add would round differently from PyTorch's separate mul and add,
// and the step must equal its plain-PyTorch twin bit for bit.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define HESSGAP_AVX2_KERNELS 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define HESSGAP_KERNEL_NS avx2
#define HESSGAP_COMPILE_STEP_RANGE
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC target("avx2")
// torch's vector headers pass __m256 values between inline functions, all compiled here for AVX2
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// The target pragma does not define these; sleef.h (through torch's AVX2 vectors) declares its
// 256-bit functions only when they are.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#endif

#include <ATen/cpu/vec/vec.h>

#include "hessgap/box_ascent_cpu.h"

namespace hessgap {

StepRangeKernels box_ascent_avx2_kernels() {
#ifdef HESSGAP_AVX2_KERNELS
  return step_range_kernels();
#else
  return {};
#endif
}

}  // namespace hessgap

#if defined(HESSGAP_AVX2_KERNELS) && defined(__clang__)
#pragma clang attribute pop
#endif
