// Runtime values -> template arguments (flash-attention's static_switch idea), so each kernel is
// compiled once per (input dtype x state bucket) and the hot loops see compile-time sizes.
#pragma once

// State buckets: N <= NMAX, states n >= N masked by zero B / C and A2 = 0 (decay 1).
#define SS2D_NMAX_SWITCH(N, NMAX, ...)                                       \
  [&] {                                                                      \
    if ((N) <= 4) { constexpr int NMAX = 4; return __VA_ARGS__(); }          \
    else if ((N) <= 8) { constexpr int NMAX = 8; return __VA_ARGS__(); }     \
    else if ((N) <= 16) { constexpr int NMAX = 16; return __VA_ARGS__(); }   \
    else if ((N) <= 32) { constexpr int NMAX = 32; return __VA_ARGS__(); }   \
    else { constexpr int NMAX = 64; return __VA_ARGS__(); }                  \
  }()

