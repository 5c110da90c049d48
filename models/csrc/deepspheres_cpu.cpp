// CPU kernels for the two costly steps of a DeepSpheres network, forward and backward:
//
// - sphere_block: a layer of filter banks applied to embedded points, the per-channel bias and
//   the gated normalization;
// - sorted_gram_readout: per sample and channel, the Gram matrix of the points' responses,
//   every row sorted ascending, then the maximum and the mean over the rows at each position.
//
// Layout. Tensors keep the points last, padded to L lanes (16 or 32): points (B, C, n, L),
// responses (B, K, n + 1, L), norms (B, K, L), where B is the batch, N <= L the number of
// points, C the input channels, K = C * W the spheres (output channels, sphere j reading input
// channel j / W) and n the input dimension. The N points of a sample then sit side by side in
// one vector of L lanes (GCC and Clang vector extensions, which arithmetic, comparisons and ?:
// act on lane by lane, a comparison giving -1 where it holds), so every step works on all
// points at once. Padding lanes hold zeros in every tensor the kernels write, and are masked
// wherever the kernels sum or compare over points.
//
// Work is split over samples (or sets) with at::parallel_for. Gradients of the parameters are
// summed per thread and then in a fixed order, so results depend on the number of threads but
// not on timing.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Added to the normalization's denominator, as in models/deepspheres.py.
constexpr double kNormEps = 1e-12;

// Vectors of L values of type scalar_t, and masks of the same width.
template <typename scalar_t, int L>
struct Lanes {
  using mask_t = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  typedef scalar_t Vec __attribute__((vector_size(L * sizeof(scalar_t))));
  typedef mask_t Mask __attribute__((vector_size(L * sizeof(scalar_t))));

  // Unaligned loads and stores: tensors are aligned to their element type only.
  static Vec load(const scalar_t* from) {
    Vec v;
    std::memcpy(&v, from, sizeof(Vec));
    return v;
  }
  static void store(scalar_t* to, const Vec& v) { std::memcpy(to, &v, sizeof(Vec)); }
  static Vec broadcast(scalar_t value) { return Vec{} + value; }

  // Lanes below n: the real points.
  static Mask first(int n) {
    Mask m;
    for (int p = 0; p < L; ++p) m[p] = p < n ? -1 : 0;
    return m;
  }

  // Sum, maximum and count over the lanes, by halving: the compiler turns each level of the
  // tree into one vector operation.
  template <typename T, typename Combine>
  static T reduce(T* values, Combine combine) {
    for (int width = L / 2; width > 0; width /= 2)
      for (int p = 0; p < width; ++p) values[p] = combine(values[p], values[p + width]);
    return values[0];
  }

  static scalar_t sum(const Vec& v, const Mask& real) {
    alignas(sizeof(Vec)) scalar_t values[L];
    store(values, real ? v : Vec{});
    return reduce(values, [](scalar_t a, scalar_t b) { return a + b; });
  }

  // The larger of a and b, or NaN when either is, as torch.amax (std::max drops a NaN b).
  static scalar_t max_nan(scalar_t a, scalar_t b) { return a < b || b != b ? b : a; }

  // The maximum over the real lanes, NaN when one of them is. The NaN test is a separate
  // vector comparison: a reduction with max_nan does not vectorize and made a hulls step 20 %
  // slower.
  static scalar_t max(const Vec& v, const Mask& real) {
    if (count(real & (v != v)) > 0) return std::numeric_limits<scalar_t>::quiet_NaN();
    alignas(sizeof(Vec)) scalar_t values[L];
    store(values, real ? v : broadcast(-std::numeric_limits<scalar_t>::infinity()));
    return reduce(values, [](scalar_t a, scalar_t b) { return std::max(a, b); });
  }

  static int count(const Mask& m) {
    alignas(sizeof(Vec)) mask_t values[L];
    std::memcpy(values, &m, sizeof(values));
    return -static_cast<int>(reduce(values, [](mask_t a, mask_t b) { return a + b; }));
  }

  static Vec sqrt(const Vec& v) {
    scalar_t values[L];
    std::memcpy(values, &v, sizeof(values));
#pragma omp simd
    for (int p = 0; p < L; ++p) values[p] = std::sqrt(values[p]);
    return load(values);
  }
};

// Runs Kernel<scalar_t, L>::run(args...) with the lane count L that the padded tensor
// `padded` has as its last dimension, for its dtype.
template <template <typename, int> class Kernel, typename... Args>
void dispatch(const at::Tensor& padded, Args&&... args) {
  const int64_t lanes = padded.size(-1);
  const bool single = padded.scalar_type() == at::kFloat;
  if (lanes == 16) {
    single ? Kernel<float, 16>::run(args...) : Kernel<double, 16>::run(args...);
  } else {
    TORCH_CHECK(lanes == 32, "deepspheres kernels: points must be padded to 16 or 32 lanes, got ",
                lanes);
    single ? Kernel<float, 32>::run(args...) : Kernel<double, 32>::run(args...);
  }
}

void check_floating(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, ": expected a contiguous CPU "
              "tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), what, ": expected dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, what,
              ": expected float32 or float64, got ", t.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Sphere block
// ---------------------------------------------------------------------------------------------

struct BlockShape {
  int64_t batch, in_channels, width, spheres, dim, points, lanes;  // dim = n
  bool pool_points;  // one norm per sample and channel, the largest over the points
  int64_t rows() const { return dim + 1; }
  int64_t cols() const { return dim + 2; }
  int64_t gates() const { return pool_points ? spheres : points * spheres; }
};

BlockShape block_shape(const at::Tensor& x, const at::Tensor& banks, const at::Tensor& bias,
                       const at::Tensor& gates, int64_t points, bool pool_points) {
  TORCH_CHECK(x.dim() == 4, "sphere_block: expected points (batch, channels, n, lanes), got ",
              x.sizes());
  TORCH_CHECK(banks.dim() == 3 && banks.size(1) == x.size(2) + 1 &&
                  banks.size(2) == x.size(2) + 2 && banks.size(0) % x.size(1) == 0,
              "sphere_block: filter banks of shape ", banks.sizes(),
              " do not fit points of shape ", x.sizes());
  TORCH_CHECK(points >= 1 && points <= x.size(3), "sphere_block: ", points,
              " points do not fit ", x.size(3), " lanes");
  const int64_t spheres = banks.size(0);
  const BlockShape s{x.size(0), x.size(1), spheres / x.size(1), spheres, x.size(2), points,
                     x.size(3), pool_points};
  TORCH_CHECK(bias.numel() == s.gates() && gates.numel() == s.gates(), "sphere_block: expected ",
              s.gates(), " biases and gates, got ", bias.numel(), " and ", gates.numel());
  for (const at::Tensor* t : {&x, &banks, &bias, &gates}) check_floating(*t, x, "sphere_block");
  return s;
}

// A bias or gate value per sphere j as a vector over the points: the same value in every real
// lane when pooling, else value [p * K + j] in lane p. (K, L) vectors, zero in padding lanes.
template <typename scalar_t, int L>
std::vector<typename Lanes<scalar_t, L>::Vec> per_point(const scalar_t* values,
                                                        const BlockShape& s) {
  std::vector<typename Lanes<scalar_t, L>::Vec> out(s.spheres);
  for (int64_t j = 0; j < s.spheres; ++j)
    for (int p = 0; p < L; ++p)
      out[j][p] = p >= s.points ? scalar_t(0)
                  : s.pool_points ? values[j] : values[p * s.spheres + j];
  return out;
}

template <typename scalar_t, int L>
struct BlockKernels {
  using V = Lanes<scalar_t, L>;
  using Vec = typename V::Vec;
  using Mask = typename V::Mask;

  // Embedded points (C, n + 2) of one sample from its points (C, n): (x, -1, -|x|^2 / 2).
  static void embed(const scalar_t* x, const BlockShape& s, Vec* e) {
    const int64_t n = s.dim, cols = s.cols();
    for (int64_t c = 0; c < s.in_channels; ++c) {
      Vec square = Vec{};
      for (int64_t d = 0; d < n; ++d) {
        const Vec coordinate = V::load(x + (c * n + d) * L);
        e[c * cols + d] = coordinate;
        square += coordinate * coordinate;
      }
      e[c * cols + n] = V::broadcast(-1);
      e[c * cols + n + 1] = scalar_t(-0.5) * square;
    }
  }

  // The normalization's denominator g (m - 1) + 1 + eps per point, from the norms of one
  // sphere's responses; with pooling, m is their maximum over the real points.
  static Vec denominator(const Vec& norm, const Vec& gate, const Mask& real,
                         const BlockShape& s, scalar_t* largest) {
    const Vec m = s.pool_points ? V::broadcast(*largest = V::max(norm, real)) : norm;
    return gate * (m - 1) + 1 + scalar_t(kNormEps);
  }

  struct Forward {
    static void run(const at::Tensor& x, const at::Tensor& banks, const at::Tensor& bias,
                    const at::Tensor& gates, const BlockShape& s, at::Tensor& out,
                    at::Tensor& norms) {
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      const scalar_t* bank = banks.const_data_ptr<scalar_t>();
      scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
      scalar_t* norms_data = norms.mutable_data_ptr<scalar_t>();
      const auto bias_lanes = per_point<scalar_t, L>(bias.const_data_ptr<scalar_t>(), s);
      const auto gate_lanes = per_point<scalar_t, L>(gates.const_data_ptr<scalar_t>(), s);
      const int64_t rows = s.rows(), cols = s.cols();
      const Mask real = V::first(static_cast<int>(s.points));
      at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<Vec> e(s.in_channels * cols), r(rows);
        for (int64_t b = begin; b < end; ++b) {
          embed(x_data + b * s.in_channels * s.dim * L, s, e.data());
          for (int64_t j = 0; j < s.spheres; ++j) {
            // Responses r = bank e + bias, their norm, then r / den.
            const Vec* ej = e.data() + (j / s.width) * cols;
            Vec square = Vec{};
            for (int64_t i = 0; i < rows; ++i) {
              const scalar_t* row = bank + (j * rows + i) * cols;
              Vec total = bias_lanes[j];
              for (int64_t k = 0; k < cols; ++k) total += row[k] * ej[k];
              r[i] = total;
              square += total * total;
            }
            const Vec norm = V::sqrt(square);
            scalar_t largest;
            const Vec inverse = 1 / denominator(norm, gate_lanes[j], real, s, &largest);
            scalar_t* y = out_data + (b * s.spheres + j) * rows * L;
            for (int64_t i = 0; i < rows; ++i) V::store(y + i * L, real ? r[i] * inverse : Vec{});
            V::store(norms_data + (b * s.spheres + j) * L, real ? norm : Vec{});
          }
        }
      });
    }
  };

  struct Backward {
    static void run(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& banks,
                    const at::Tensor& gates, const at::Tensor& y, const at::Tensor& norms,
                    const BlockShape& s, bool grad_through_norm, at::Tensor& grad_x,
                    at::Tensor& grad_banks, at::Tensor& grad_bias, at::Tensor& grad_gates) {
      const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      const scalar_t* bank = banks.const_data_ptr<scalar_t>();
      const scalar_t* y_data = y.const_data_ptr<scalar_t>();
      const scalar_t* norms_data = norms.const_data_ptr<scalar_t>();
      scalar_t* grad_x_data = grad_x.mutable_data_ptr<scalar_t>();
      const auto gate_lanes = per_point<scalar_t, L>(gates.const_data_ptr<scalar_t>(), s);
      const int64_t n = s.dim, rows = s.rows(), cols = s.cols(), K = s.spheres;
      const Mask real = V::first(static_cast<int>(s.points));

      // Parameter gradients per chunk of consecutive samples, one chunk per thread, kept per
      // lane: banks (K, n + 1, n + 2), bias and gates (K).
      struct Partial {
        std::vector<Vec> banks, bias, gates;
      };
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                    s.batch));
      std::vector<Partial> partial(chunks);
      at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        std::vector<Vec> e(s.in_channels * cols), grad_e(s.in_channels * cols);
        std::vector<Vec> yj(rows), grad_r(rows);
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
          Partial& acc = partial[chunk];
          acc.banks.assign(K * rows * cols, Vec{});
          acc.bias.assign(K, Vec{});
          acc.gates.assign(K, Vec{});
          for (int64_t b = chunk * s.batch / chunks; b < (chunk + 1) * s.batch / chunks; ++b) {
            const scalar_t* xb = x_data + b * s.in_channels * n * L;
            embed(xb, s, e.data());
            std::fill(grad_e.begin(), grad_e.end(), Vec{});
            for (int64_t j = 0; j < K; ++j) {
              const int64_t at = (b * K + j) * rows * L;
              const Vec norm = V::load(norms_data + (b * K + j) * L);
              scalar_t largest = 0;
              const Vec den = denominator(norm, gate_lanes[j], real, s, &largest);
              const Vec inverse = 1 / den;

              // y = r / den: the gradient of r at a fixed den, and that of den, whose
              // derivative of y is -y / den, summed over the points sharing it.
              Vec dot = Vec{};
              for (int64_t i = 0; i < rows; ++i) {
                yj[i] = V::load(y_data + at + i * L);
                grad_r[i] = V::load(grad_data + at + i * L);
                dot += grad_r[i] * yj[i];
              }
              const Vec grad_den = real ? -dot * inverse : Vec{};

              // den = g (m - 1) + 1 + eps: to the gate, and to m, which is the norm or, with
              // pooling, its maximum, whose gradient is shared among the points reaching it.
              Vec grad_norm;
              if (s.pool_points) {
                const scalar_t total = V::sum(grad_den, real);
                acc.gates[j][0] += total * (largest - 1);
                const Mask reach = real & (norm == largest);
                const scalar_t share = grad_through_norm
                                           ? total * gate_lanes[j][0] / V::count(reach)
                                           : scalar_t(0);
                grad_norm = reach ? V::broadcast(share) : Vec{};
              } else {
                acc.gates[j] += grad_den * (norm - 1);
                grad_norm = grad_through_norm ? grad_den * gate_lanes[j] : Vec{};
              }

              // Through the norm to r = y den, then to the bias.
              const Vec scale = norm > 0 ? grad_norm * den / norm : Vec{};
              Vec grad_bias = Vec{};
              for (int64_t i = 0; i < rows; ++i) {
                grad_r[i] = real ? grad_r[i] * inverse + scale * yj[i] : Vec{};
                grad_bias += grad_r[i];
              }
              if (s.pool_points)
                acc.bias[j][0] += V::sum(grad_bias, real);
              else
                acc.bias[j] += grad_bias;

              // r = bank e + bias: to the bank and to the embedded points.
              const int64_t c = j / s.width;
              for (int64_t i = 0; i < rows; ++i) {
                const scalar_t* row = bank + (j * rows + i) * cols;
                Vec* grad_row = acc.banks.data() + (j * rows + i) * cols;
                for (int64_t k = 0; k < cols; ++k) {
                  grad_row[k] += grad_r[i] * e[c * cols + k];
                  grad_e[c * cols + k] += row[k] * grad_r[i];
                }
              }
            }

            // e = (x, -1, -|x|^2 / 2).
            scalar_t* gx = grad_x_data + b * s.in_channels * n * L;
            for (int64_t c = 0; c < s.in_channels; ++c)
              for (int64_t d = 0; d < n; ++d) {
                const Vec value =
                    grad_e[c * cols + d] - grad_e[c * cols + n + 1] * e[c * cols + d];
                V::store(gx + (c * n + d) * L, real ? value : Vec{});
              }
          }
        }
      });

      // Sum the chunks in order, then the lanes.
      scalar_t* grad_banks_data = grad_banks.mutable_data_ptr<scalar_t>();
      scalar_t* grad_bias_data = grad_bias.mutable_data_ptr<scalar_t>();
      scalar_t* grad_gates_data = grad_gates.mutable_data_ptr<scalar_t>();
      for (const Partial& acc : partial) {
        for (int64_t i = 0; i < K * rows * cols; ++i)
          grad_banks_data[i] += V::sum(acc.banks[i], real);
        for (int64_t j = 0; j < K; ++j)
          for (int64_t p = 0; p < (s.pool_points ? 1 : s.points); ++p) {
            const int64_t g = s.pool_points ? j : p * K + j;
            grad_bias_data[g] += acc.bias[j][p];
            grad_gates_data[g] += acc.gates[j][p];
          }
      }
    }
  };
};

template <typename scalar_t, int L>
struct BlockForward {
  template <typename... Args>
  static void run(Args&&... args) { BlockKernels<scalar_t, L>::Forward::run(args...); }
};

template <typename scalar_t, int L>
struct BlockBackward {
  template <typename... Args>
  static void run(Args&&... args) { BlockKernels<scalar_t, L>::Backward::run(args...); }
};

std::tuple<at::Tensor, at::Tensor> sphere_block(const at::Tensor& x, const at::Tensor& banks,
                                                const at::Tensor& bias, const at::Tensor& gates,
                                                int64_t points, bool pool_points) {
  const BlockShape s = block_shape(x, banks, bias, gates, points, pool_points);
  at::Tensor out = at::empty({s.batch, s.spheres, s.rows(), s.lanes}, x.options());
  at::Tensor norms = at::empty({s.batch, s.spheres, s.lanes}, x.options());
  dispatch<BlockForward>(x, x, banks, bias, gates, s, out, norms);
  return {out, norms};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sphere_block_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& banks, const at::Tensor& bias,
    const at::Tensor& gates, const at::Tensor& y, const at::Tensor& norms, int64_t points,
    bool pool_points, bool grad_through_norm) {
  const BlockShape s = block_shape(x, banks, bias, gates, points, pool_points);
  const at::Tensor grad_c = grad.contiguous();
  for (const at::Tensor* t : {&grad_c, &y, &norms}) check_floating(*t, x, "sphere_block");
  TORCH_CHECK(grad_c.sizes() == y.sizes() && y.numel() == s.batch * s.spheres * s.rows() *
                  s.lanes && norms.numel() == s.batch * s.spheres * s.lanes,
              "sphere_block_backward: gradient, output or norms do not match the input");
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_banks = at::zeros_like(banks);
  at::Tensor grad_bias = at::zeros_like(bias);
  at::Tensor grad_gates = at::zeros_like(gates);
  dispatch<BlockBackward>(x, grad_c, x, banks, gates, y, norms, s, grad_through_norm, grad_x,
                          grad_banks, grad_bias, grad_gates);
  return {grad_x, grad_banks, grad_bias, grad_gates};
}

// ---------------------------------------------------------------------------------------------
// Sorted Gram readout
// ---------------------------------------------------------------------------------------------

// Comparators (i, j), i < j, of Batcher's odd-even merge sort for L = 2^k inputs, at compile
// time; applied in order, each putting the smaller value at i, they sort any L values.
constexpr int network_length(int L) {
  int count = 0;
  for (int p = 1; p < L; p *= 2)
    for (int k = p; k >= 1; k /= 2)
      for (int j = k % p; j + k < L; j += 2 * k)
        for (int i = 0; i < k && i + j + k < L; ++i)
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) ++count;
  return count;
}

template <int L>
struct SortingNetwork {
  static constexpr int size = network_length(L);
  static constexpr std::array<std::pair<int, int>, size> pairs = [] {
    std::array<std::pair<int, int>, size> out{};
    int at = 0;
    for (int p = 1; p < L; p *= 2)
      for (int k = p; k >= 1; k /= 2)
        for (int j = k % p; j + k < L; j += 2 * k)
          for (int i = 0; i < k && i + j + k < L; ++i)
            if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) out[at++] = {i + j, i + j + k};
    return out;
  }();
};

// Lanes per vector in the readout: one register of the widest vectors the target has. Wider
// generic vectors are not split into registers when they are compared and selected lane by
// lane: GCC then emits scalar code, tens of times slower.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

// The Gram matrix of one set of N <= L points with its rows sorted side by side. Gram matrices
// are symmetric, so the rows are taken G at a time (G lanes of one vector): slot r of group g
// holds entry r of rows gG to gG + G - 1, lane p belonging to row gG + p, and a comparator
// orders entries i and j of G rows at once. Padding: rows from N on hold -inf, which never wins
// a maximum; slots from N on hold +inf, which sorts after every entry.
template <typename scalar_t, int L>
struct SortedGram {
  static constexpr int G = std::min(L, kVectorBytes / static_cast<int>(sizeof(scalar_t)));
  static constexpr int kGroups = L / G;
  using V = Lanes<scalar_t, G>;
  using Vec = typename V::Vec;
  using Mask = typename V::Mask;
  using Network = SortingNetwork<L>;
  static constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();

  // Rows of group g that are real points.
  static Mask real_rows(int n, int g) { return V::first(n - g * G); }

  // Sort the Gram entries of group g of the points (dim, L) of one set into `slots`; when
  // `swaps` is given, record which lanes each comparator swapped.
  static void sort(const scalar_t* points, int n, int dim, int g, Vec* slots, Mask* swaps) {
    const Mask real = real_rows(n, g);
    for (int r = 0; r < n; ++r) {
      Vec total = Vec{};
      for (int d = 0; d < dim; ++d) total += points[d * L + r] * V::load(points + d * L + g * G);
      slots[r] = real ? total : V::broadcast(-kInf);
    }
    for (int r = n; r < L; ++r) slots[r] = V::broadcast(kInf);
    if (swaps)
      apply<true>(slots, swaps, std::make_index_sequence<Network::size>());
    else
      apply<false>(slots, swaps, std::make_index_sequence<Network::size>());
  }

  // Route gradients given at the sorted positions back to the Gram entries by undoing the
  // recorded swaps in reverse order: afterwards slot q, lane p holds the gradient of
  // G[gG + p, q].
  static void unsort(Vec* slots, const Mask* swaps) {
    undo(slots, swaps, std::make_index_sequence<Network::size>());
  }

 private:
  // The comparators unrolled at compile time, so that the slots can stay in registers.
  template <bool kRecord, std::size_t... K>
  static void apply(Vec* slots, Mask* swaps, std::index_sequence<K...>) {
    (exchange<kRecord, K>(slots, swaps), ...);
  }

  template <bool kRecord, std::size_t K>
  [[gnu::always_inline]] static inline void exchange(Vec* slots, Mask* swaps) {
    constexpr int i = Network::pairs[K].first, j = Network::pairs[K].second;
    const Vec low = slots[i], high = slots[j];
    const Mask swap = low > high;
    slots[i] = swap ? high : low;
    slots[j] = swap ? low : high;
    if constexpr (kRecord) swaps[K] = swap;
  }

  template <std::size_t... K>
  static void undo(Vec* slots, const Mask* swaps, std::index_sequence<K...>) {
    (exchange_back<Network::size - 1 - K>(slots, swaps), ...);
  }

  template <std::size_t K>
  [[gnu::always_inline]] static inline void exchange_back(Vec* slots, const Mask* swaps) {
    constexpr int i = Network::pairs[K].first, j = Network::pairs[K].second;
    const Vec low = slots[i], high = slots[j];
    slots[i] = swaps[K] ? high : low;
    slots[j] = swaps[K] ? low : high;
  }

 public:
  struct Forward {
    static void run(const at::Tensor& y, int n, at::Tensor& out) {
      const int64_t batch = y.size(0), channels = y.size(1);
      const int dim = static_cast<int>(y.size(2));
      const scalar_t* y_data = y.const_data_ptr<scalar_t>();
      scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, batch * channels, 8, [&](int64_t begin, int64_t end) {
        std::vector<Vec> slots(L);
        std::array<scalar_t, L> top, sum;
        for (int64_t set = begin; set < end; ++set) {
          const scalar_t* points = y_data + set * dim * L;
          top.fill(-kInf);
          sum.fill(0);
          for (int g = 0; g * G < n; ++g) {
            sort(points, n, dim, g, slots.data(), nullptr);
            const Mask real = real_rows(n, g);
            for (int r = 0; r < n; ++r) {
              top[r] = V::max_nan(top[r], V::max(slots[r], real));
              sum[r] += V::sum(slots[r], real);
            }
          }
          const int64_t b = set / channels, c = set % channels;
          scalar_t* out_top = out_data + b * 2 * n * channels + c;  // out[b, 0, :, c]
          scalar_t* out_mean = out_top + n * channels;              // out[b, 1, :, c]
          for (int r = 0; r < n; ++r) {
            out_top[r * channels] = top[r];
            out_mean[r * channels] = sum[r] / static_cast<scalar_t>(n);
          }
        }
      });
    }
  };

  struct Backward {
    static void run(const at::Tensor& grad, const at::Tensor& y, int n, at::Tensor& grad_y) {
      const int64_t batch = y.size(0), channels = y.size(1);
      const int dim = static_cast<int>(y.size(2));
      const scalar_t* y_data = y.const_data_ptr<scalar_t>();
      const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
      scalar_t* grad_y_data = grad_y.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, batch * channels, 8, [&](int64_t begin, int64_t end) {
        std::vector<Vec> slots(kGroups * L);
        std::vector<Mask> swaps(kGroups * Network::size);
        // entries[q * L + p] is the gradient of G[p, q]; transposed[q * L + p] of G[q, p].
        std::vector<scalar_t> entries(L * L), transposed(L * L);
        std::array<scalar_t, L> top;
        std::array<int, L> reach_count;
        for (int64_t set = begin; set < end; ++set) {
          const scalar_t* points = y_data + set * dim * L;
          const int groups = (n + G - 1) / G;
          top.fill(-kInf);
          reach_count.fill(0);
          for (int g = 0; g < groups; ++g) {
            Vec* group_slots = slots.data() + g * L;
            sort(points, n, dim, g, group_slots, swaps.data() + g * Network::size);
            for (int r = 0; r < n; ++r)
              top[r] = V::max_nan(top[r], V::max(group_slots[r], real_rows(n, g)));
          }
          for (int g = 0; g < groups; ++g)
            for (int r = 0; r < n; ++r)
              reach_count[r] += V::count(real_rows(n, g) & (slots[g * L + r] == top[r]));

          // Gradient at each sorted position: the mean's share, plus the maximum's, shared
          // among the rows that reach it. Then back to the Gram entries.
          const int64_t b = set / channels, c = set % channels;
          const scalar_t* grad_top = grad_data + b * 2 * n * channels + c;
          const scalar_t* grad_mean = grad_top + n * channels;
          std::fill(entries.begin(), entries.end(), scalar_t(0));
          for (int g = 0; g < groups; ++g) {
            Vec* group_slots = slots.data() + g * L;
            const Mask real = real_rows(n, g);
            for (int r = 0; r < n; ++r) {
              const Mask reach = real & (group_slots[r] == top[r]);
              const scalar_t share =
                  grad_top[r * channels] / static_cast<scalar_t>(reach_count[r]);
              const scalar_t spread = grad_mean[r * channels] / static_cast<scalar_t>(n);
              group_slots[r] = reach ? V::broadcast(spread + share) : V::broadcast(spread);
            }
            for (int r = n; r < L; ++r) group_slots[r] = Vec{};
            unsort(group_slots, swaps.data() + g * Network::size);
            for (int q = 0; q < n; ++q) V::store(entries.data() + q * L + g * G, group_slots[q]);
          }

          // G[p, q] = <y_p, y_q>, so grad y_p = sum_q (grad G[p, q] + grad G[q, p]) y_q.
          for (int q = 0; q < L; ++q)
            for (int p = 0; p < L; ++p) transposed[q * L + p] = entries[p * L + q];
          for (int g = 0; g < kGroups; ++g) {
            const Mask real = real_rows(n, g);
            for (int d = 0; d < dim; ++d) {
              Vec total = Vec{};
              for (int q = 0; q < n; ++q)
                total += (V::load(entries.data() + q * L + g * G) +
                          V::load(transposed.data() + q * L + g * G)) * points[d * L + q];
              V::store(grad_y_data + (set * dim + d) * L + g * G, real ? total : Vec{});
            }
          }
        }
      });
    }
  };
};

template <typename scalar_t, int L>
struct ReadoutForward {
  template <typename... Args>
  static void run(Args&&... args) { SortedGram<scalar_t, L>::Forward::run(args...); }
};

template <typename scalar_t, int L>
struct ReadoutBackward {
  template <typename... Args>
  static void run(Args&&... args) { SortedGram<scalar_t, L>::Backward::run(args...); }
};

void check_readout(const at::Tensor& y, int64_t points) {
  TORCH_CHECK(y.dim() == 4, "sorted_gram_readout: expected responses (batch, channels, dim, "
              "lanes), got ", y.sizes());
  check_floating(y, y, "sorted_gram_readout");
  TORCH_CHECK(points >= 1 && points <= y.size(3), "sorted_gram_readout: ", points,
              " points do not fit ", y.size(3), " lanes");
}

at::Tensor sorted_gram_readout(const at::Tensor& y, int64_t points) {
  check_readout(y, points);
  at::Tensor out = at::empty({y.size(0), 2, points, y.size(1)}, y.options());
  dispatch<ReadoutForward>(y, y, static_cast<int>(points), out);
  return out;
}

at::Tensor sorted_gram_readout_backward(const at::Tensor& grad, const at::Tensor& y,
                                        int64_t points) {
  check_readout(y, points);
  const at::Tensor grad_c = grad.contiguous();
  check_floating(grad_c, y, "sorted_gram_readout_backward");
  TORCH_CHECK(grad_c.numel() == 2 * y.size(0) * points * y.size(1),
              "sorted_gram_readout_backward: gradient does not match the output");
  at::Tensor grad_y = at::empty_like(y);
  dispatch<ReadoutBackward>(y, grad_c, y, static_cast<int>(points), grad_y);
  return grad_y;
}

}  // namespace

TORCH_LIBRARY(deepspheres, m) {
  m.def("sphere_block(Tensor x, Tensor banks, Tensor bias, Tensor gates, int points, "
        "bool pool_points) -> (Tensor, Tensor)");
  m.def("sphere_block_backward(Tensor grad, Tensor x, Tensor banks, Tensor bias, Tensor gates, "
        "Tensor y, Tensor norms, int points, bool pool_points, bool grad_through_norm) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sorted_gram_readout(Tensor y, int points) -> Tensor");
  m.def("sorted_gram_readout_backward(Tensor grad, Tensor y, int points) -> Tensor");
}

TORCH_LIBRARY_IMPL(deepspheres, CPU, m) {
  m.impl("sphere_block", sphere_block);
  m.impl("sphere_block_backward", sphere_block_backward);
  m.impl("sorted_gram_readout", sorted_gram_readout);
  m.impl("sorted_gram_readout_backward", sorted_gram_readout_backward);
}
