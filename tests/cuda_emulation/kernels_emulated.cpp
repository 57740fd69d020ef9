// src/cuda/kernels.cu for the CPU, against the fake CUDA runtime: with fake_runtime.cpp and
// src/cuda/cuda_group.cpp, a whole CudaGroup runs without a GPU (cuda_group_emulation_test).
#define MOEDIST_CUDA_EMULATION 1
#define MOEDIST_CUDA_FAKE_RUNTIME 1
#include "cuda_emulation/host_cuda.h"
#include "cuda/kernels.cu"
