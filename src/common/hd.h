// MOEDIST_HD marks pure arithmetic that both the host compiler and nvcc compile (for the CPU paths and
// tests, and for the CUDA kernels), so the two share one definition of the contract's formulas.
#pragma once

#if defined(__CUDACC__)
#define MOEDIST_HD __host__ __device__ __forceinline__
#else
#define MOEDIST_HD inline
#endif
