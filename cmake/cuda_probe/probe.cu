// Compiles only if nvcc, the C++20 dialect and the CUDA runtime all work.
#include <cuda_runtime.h>

#include <concepts>

template <std::floating_point T>
__global__ void scale(T* x, T a) { x[threadIdx.x] *= a; }

int main() {
  int n = 0;
  (void)cudaGetDeviceCount(&n);
  scale<float><<<1, 1>>>(nullptr, 2.0f);
  return 0;
}
