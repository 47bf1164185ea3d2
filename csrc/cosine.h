// The cosine loss of both ops, 1 − cos(x, y) as torch.nn.functional.cosine_similarity computes it (each norm
// clamped to kCosineEps), and its gradient, from a row's dot product x·y and norms |x|, |y|. One definition for
// the CPU (losses_cpu.cpp) and CUDA (losses_cuda.cu) kernels; the reductions that produce the dot products stay
// with each device.
#pragma once

#include "losses.h"

#include <algorithm>

#ifdef __CUDACC__
#define ADAFACE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ADAFACE_HOST_DEVICE inline
#endif

namespace adaface {

// max(n, kCosineEps): fmaxf on the device, std::max on the host, as each kernel has always clamped.
ADAFACE_HOST_DEVICE float clamp_norm(float n) {
  const float ce = static_cast<float>(kCosineEps);
#ifdef __CUDA_ARCH__
  return fmaxf(n, ce);
#else
  return std::max(n, ce);
#endif
}

ADAFACE_HOST_DEVICE float cosine_loss(float xy, float nx, float ny) {
  return 1.f - xy / (clamp_norm(nx) * clamp_norm(ny));
}

// g·d(1 − cos)/dx = alpha·y + beta_x·x and g·d(1 − cos)/dy = alpha·x + beta_y·y, as torch's autograd of
// cosine_similarity (it differentiates the norm even where the clamp is active; 0 for a zero vector).
struct CosineGrad {
  float alpha, beta_x, beta_y;
};

ADAFACE_HOST_DEVICE CosineGrad cosine_grad(float g, float xy, float nx, float ny) {
  const float n1 = clamp_norm(nx), n2 = clamp_norm(ny);
  return {-g / (n1 * n2), nx > 0.f ? g * xy / (n1 * n1 * n2 * nx) : 0.f,
          ny > 0.f ? g * xy / (n2 * n2 * n1 * ny) : 0.f};
}

}  // namespace adaface
