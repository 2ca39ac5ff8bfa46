#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../entropy.h"
#include "ops.h"

namespace afie::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

namespace {
__global__ void entropy_kernel(int64_t B, int64_t p, const double* s, double* out) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < B) out[b] = spectrum_entropy(s + b * p, p);
}
}  // namespace

void spectra_entropy(int64_t B, int64_t p, const double* s, double* out, std::uintptr_t stream) {
  if (B == 0) return;
  const int threads = 128;
  entropy_kernel<<<unsigned((B + threads - 1) / threads), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(B, p, s, out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("spectra_entropy launch: ") + cudaGetErrorString(err));
}

}  // namespace afie::cuda
