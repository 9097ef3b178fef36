// Runtime values -> template arguments (flash-attention's static_switch idea), so each kernel is
// compiled once per (input dtype x state bucket) and the hot loops see compile-time sizes.
#pragma once

// State buckets: registers hold NMAX states per lane; N <= NMAX is masked at run time.
// Buckets are few to keep the build short: N = 16 and N = 4 (the hot sizes) get their own.
#define SS2D_NMAX_SWITCH(N, NMAX, ...)                 \
  [&] {                                                \
    if ((N) <= 4) {                                    \
      constexpr int NMAX = 4;                          \
      return __VA_ARGS__();                            \
    } else if ((N) <= 16) {                            \
      constexpr int NMAX = 16;                         \
      return __VA_ARGS__();                            \
    } else {                                           \
      constexpr int NMAX = 64;                         \
      return __VA_ARGS__();                            \
    }                                                  \
  }()
