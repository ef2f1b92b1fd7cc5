// Fused SGD(-momentum) update of class-center rows: one pass per row, in place, no temporaries.
//
// Per updated row w (fp32 math, storage fp32 or bf16 with an optional bf16 residual "lo" so that
// hi + lo carries ~16 significant bits and updates below a bf16 ulp are not lost):
//   g  = P                       (plain gradient row), or
//   g  = P - r^2 (w . P) w       (the tangent projection of norm_linear; r = 1/||w|| of the forward)
//   m  = mu m + wd w + g ;  w -= lr m      (torch.optim.SGD; mu = 0: w = w - lr (g + wd w))
//   inv_norm[row] = 1 / max(||stored w||, eps)
// Dense calls also stream every other row of [row_begin, row_end) with g = 0 (ghost momentum/decay).
// Built and loaded by facescale/heads/native.py (plain C ABI, no torch headers: compiles in ~1 s).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct Args {
  int64_t dim;
  int64_t n_grad;         // gradient rows
  const int64_t* rows;    // shard row of each gradient row (sorted); null = row_base + k
  int64_t row_base;
  const void* grad;       // [n_grad, dim], fp32 (grad_bf16 = 0) or bf16
  int32_t grad_bf16;
  const float* proj_inv;  // [n_grad] r of each gradient row, or null (no projection)
  int64_t row_begin, row_end;  // dense: stream these rows too (zero gradient where not in rows)
  void* centers;          // [rows, dim] fp32 or bf16 (centers_bf16)
  int32_t centers_bf16;
  uint16_t* residual;     // bf16 [rows, dim] or null
  void* momentum;         // [rows, dim] fp32 or bf16 (momentum_bf16), or null when mu == 0
  int32_t momentum_bf16;
  float* inv_norms;       // [rows] or null
  float lr, mu, wd, eps;
};

// a . b with 16 lane sums and a fixed tree: vectorisable, and the same order for every caller and thread
// count, so norms from the update and from facescale_inv_norms agree bit for bit (cached vs recomputed).
inline float dot(const float* a, const float* b, int64_t d) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
  }
  float tail = 0.f;
  for (; j < d; ++j) tail += a[j] * b[j];
  for (int half = 8; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) acc[l] += acc[l + half];
  }
  return acc[0] + tail;
}

inline float inv_norm(const float* w, int64_t d, float eps) { return 1.f / std::max(std::sqrt(dot(w, w, d)), eps); }

// fp32 storage, no residual: the row and its momentum are updated where they lie (one read, one write).
void update_row_f32(const Args& a, int64_t row, int64_t k, float* g) {
  const int64_t d = a.dim, off = row * d;
  float* __restrict w = static_cast<float*>(a.centers) + off;
  const float* p = nullptr;
  float coef = 0.f;
  if (k >= 0) {
    if (a.grad_bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(a.grad) + k * d;
      for (int64_t j = 0; j < d; ++j) g[j] = bf16_to_f32(src[j]);
      p = g;
    } else {
      p = static_cast<const float*>(a.grad) + k * d;
    }
    if (a.proj_inv) coef = dot(w, p, d) * a.proj_inv[k] * a.proj_inv[k];
  }
  if (a.momentum) {
    float* __restrict m = static_cast<float*>(a.momentum) + off;
    if (p) {
      for (int64_t j = 0; j < d; ++j) {
        const float mj = a.mu * m[j] + a.wd * w[j] + (p[j] - coef * w[j]);
        m[j] = mj;
        w[j] -= a.lr * mj;
      }
    } else {
      for (int64_t j = 0; j < d; ++j) {
        const float mj = a.mu * m[j] + a.wd * w[j];
        m[j] = mj;
        w[j] -= a.lr * mj;
      }
    }
  } else {
    const float decay = 1.f - a.lr * a.wd;
    if (p) {
      for (int64_t j = 0; j < d; ++j) w[j] = w[j] * decay - a.lr * (p[j] - coef * w[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) w[j] *= decay;
    }
  }
  if (a.inv_norms) a.inv_norms[row] = inv_norm(w, d, a.eps);
}

// Half-precision storage: the row is up-cast (plus its residual) into a per-thread buffer, updated, rounded.
void update_row(const Args& a, int64_t row, int64_t k, float* w, float* g) {
  if (!a.centers_bf16 && !a.residual && !a.momentum_bf16) {
    update_row_f32(a, row, k, g);
    return;
  }
  const int64_t d = a.dim, off = row * d;
  float* cf = a.centers_bf16 ? nullptr : static_cast<float*>(a.centers) + off;
  uint16_t* ch = a.centers_bf16 ? static_cast<uint16_t*>(a.centers) + off : nullptr;
  if (cf) {
    std::memcpy(w, cf, d * sizeof(float));
  } else {
    for (int64_t j = 0; j < d; ++j) w[j] = bf16_to_f32(ch[j]);
  }
  if (k >= 0) {
    if (a.grad_bf16) {
      const uint16_t* p = static_cast<const uint16_t*>(a.grad) + k * d;
      for (int64_t j = 0; j < d; ++j) g[j] = bf16_to_f32(p[j]);
    } else {
      std::memcpy(g, static_cast<const float*>(a.grad) + k * d, d * sizeof(float));
    }
    if (a.proj_inv) {  // uses the stored (forward) row, before the residual is added
      const float coef = dot(w, g, d) * a.proj_inv[k] * a.proj_inv[k];
      for (int64_t j = 0; j < d; ++j) g[j] -= coef * w[j];
    }
  }
  uint16_t* lo = a.residual ? a.residual + off : nullptr;
  if (lo) {
    for (int64_t j = 0; j < d; ++j) w[j] += bf16_to_f32(lo[j]);
  }
  if (a.momentum) {
    if (a.momentum_bf16) {
      uint16_t* m = static_cast<uint16_t*>(a.momentum) + off;
      for (int64_t j = 0; j < d; ++j) {
        float mj = a.mu * bf16_to_f32(m[j]) + a.wd * w[j];
        if (k >= 0) mj += g[j];
        m[j] = f32_to_bf16(mj);
        w[j] -= a.lr * mj;
      }
    } else {
      float* m = static_cast<float*>(a.momentum) + off;
      for (int64_t j = 0; j < d; ++j) {
        float mj = a.mu * m[j] + a.wd * w[j];
        if (k >= 0) mj += g[j];
        m[j] = mj;
        w[j] -= a.lr * mj;
      }
    }
  } else {
    const float decay = 1.f - a.lr * a.wd;
    if (k >= 0) {
      for (int64_t j = 0; j < d; ++j) w[j] = w[j] * decay - a.lr * g[j];
    } else {
      for (int64_t j = 0; j < d; ++j) w[j] *= decay;
    }
  }
  if (cf) {
    std::memcpy(cf, w, d * sizeof(float));
  } else {
    for (int64_t j = 0; j < d; ++j) {
      const uint16_t h = f32_to_bf16(w[j]);
      ch[j] = h;
      const float stored = bf16_to_f32(h);
      if (lo) lo[j] = f32_to_bf16(w[j] - stored);
      w[j] = stored;
    }
  }
  if (a.inv_norms) a.inv_norms[row] = inv_norm(w, d, a.eps);
}

inline int64_t grad_row(const Args& a, int64_t k) { return a.rows ? a.rows[k] : a.row_base + k; }

// Gradient rows [k0, k1) and, for dense calls, shard rows [r0, r1).
void run_range(const Args& a, int64_t k0, int64_t k1, int64_t r0, int64_t r1) {
  std::vector<float> w(a.dim), g(a.dim);
  if (r1 <= r0) {
    for (int64_t k = k0; k < k1; ++k) update_row(a, grad_row(a, k), k, w.data(), g.data());
    return;
  }
  int64_t k = k0;
  for (int64_t row = r0; row < r1; ++row) {
    const bool has = k < k1 && grad_row(a, k) == row;
    update_row(a, row, has ? k : -1, w.data(), g.data());
    if (has) ++k;
  }
}

int64_t first_grad_at_or_after(const Args& a, int64_t row) {  // binary search in the sorted rows
  int64_t lo = 0, hi = a.n_grad;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (grad_row(a, mid) < row) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace

extern "C" {

int facescale_center_sgd(
    int64_t dim, int64_t n_grad, const int64_t* rows, int64_t row_base, const void* grad, int32_t grad_bf16,
    const float* proj_inv, int64_t row_begin, int64_t row_end, void* centers, int32_t centers_bf16,
    uint16_t* residual, void* momentum, int32_t momentum_bf16, float* inv_norms, float lr, float mu, float wd,
    float eps, int32_t threads) {
  if (dim <= 0 || dim > 65536) return 1;
  const Args a{dim, n_grad, rows, row_base, grad, grad_bf16, proj_inv, row_begin, row_end, centers,
               centers_bf16, residual, momentum, momentum_bf16, inv_norms, lr, mu, wd, eps};
  const bool dense = row_end > row_begin;
  const int64_t work = dense ? row_end - row_begin : n_grad;
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, work / 64));
  std::vector<std::thread> pool;
  for (int64_t p = 0; p < parts; ++p) {
    int64_t k0, k1, r0 = 0, r1 = 0;
    if (dense) {
      r0 = row_begin + work * p / parts;
      r1 = row_begin + work * (p + 1) / parts;
      k0 = first_grad_at_or_after(a, r0);
      k1 = first_grad_at_or_after(a, r1);
    } else {
      k0 = work * p / parts;
      k1 = work * (p + 1) / parts;
    }
    if (p + 1 == parts) {
      run_range(a, k0, k1, r0, r1);
    } else {
      pool.emplace_back(run_range, std::cref(a), k0, k1, r0, r1);
    }
  }
  for (auto& t : pool) t.join();
  return 0;
}

// out[i] = 1 / max(||row i||, eps) for n rows of fp32 or bf16, with the update kernel's summation order.
int facescale_inv_norms(const void* rows, int32_t bf16, int64_t n, int64_t dim, float* out, float eps,
                        int32_t threads) {
  auto body = [=](int64_t i0, int64_t i1) {
    std::vector<float> w(dim);
    for (int64_t i = i0; i < i1; ++i) {
      if (bf16) {
        const uint16_t* row = static_cast<const uint16_t*>(rows) + i * dim;
        for (int64_t j = 0; j < dim; ++j) w[j] = bf16_to_f32(row[j]);
        out[i] = inv_norm(w.data(), dim, eps);
      } else {
        out[i] = inv_norm(static_cast<const float*>(rows) + i * dim, dim, eps);
      }
    }
  };
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / 1024));
  std::vector<std::thread> pool;
  for (int64_t p = 0; p + 1 < parts; ++p) pool.emplace_back(body, n * p / parts, n * (p + 1) / parts);
  body(n * (parts - 1) / parts, n);
  for (auto& t : pool) t.join();
  return 0;
}

// dst[k] = src[index[k]] for rows of `row_bytes` bytes (the forward's gather of sampled centers).
int facescale_gather_rows(const char* src, const int64_t* index, int64_t n, int64_t row_bytes, char* dst,
                          int32_t threads) {
  auto body = [=](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) std::memcpy(dst + k * row_bytes, src + index[k] * row_bytes, row_bytes);
  };
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / 256));
  std::vector<std::thread> pool;
  for (int64_t p = 0; p + 1 < parts; ++p) pool.emplace_back(body, n * p / parts, n * (p + 1) / parts);
  body(n * (parts - 1) / parts, n);
  for (auto& t : pool) t.join();
  return 0;
}

}  // extern "C"
