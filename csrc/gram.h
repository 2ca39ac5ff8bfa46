// The upper triangle of A·Aᵀ for a row-major float block A, and the fill that writes A:
// the co-moment kernel of layers under 1024 channels in the channel-major (NCHW) layout,
// without BLAS.
//
// Why not SSYRK: a chunk's rows are channels with their observations contiguous, the
// dot-product form of the product. OpenBLAS first repacks them into its outer-product
// panels, a third pass over data that the fill and the centring have just written; for
// 64–256 channels that packing and its bookkeeping cost more than the FLOPs. Reading
// the rows in place from an L2-sized chunk halves the update of a 64-channel layer.
#pragma once
#include <cstdint>

namespace afie {

// Rows a block must be padded to (with zero rows) and the multiple its row length must
// have (zero columns past the data): the kernel works in whole 3×4 tiles of 8-wide rows
// (AVX2) or 6×4 tiles of 16-wide rows (AVX-512).
constexpr int64_t kGramRows = 24;
constexpr int64_t kGramCols = 16;

// True when this CPU has the AVX2 and FMA instructions the kernel is built with.
bool gram_available();

// The kernel gram_upper_add runs here: "avx512", "avx2" or "none" (BLAS does the work).
const char* gram_kernel();

// c[i·n + j] += Σ_t a[i·ld + t]·a[j·ld + t] for i in [i_begin, i_end), i ≤ j < n (the lower
// triangle is left alone). a holds round_up(n, kGramRows) rows of ld floats, ld a
// multiple of kGramCols; the padding must be zero. Products accumulate in float, in 8
// lanes per entry, and each call's sums are added to c in double. Calls on disjoint row
// ranges write disjoint rows of c; i_begin must be a multiple of kGramTile (the rows of
// one tile), and i_end too unless it is n.
constexpr int64_t kGramTile = 6;
void gram_upper_add(const float* a, int64_t n, int64_t ld, double* c, int64_t i_begin, int64_t i_end);

// One run of a chunk's observations, sL elements apart in memory: element offset of its
// first observation (channel 0), its length, and its position in the chunk's rows.
struct GramRun {
  int64_t off, len, j;
};

// Fills rows [c0, c1) of a channel-major chunk of k observations from float32 data with
// channel stride sC and observation stride sL within a run: sums[c] = Σ x in double,
// then row c of out (row length ld) = x − μ_c in float, μ_c = sums[c] / k, zero past k.
// A row is centred while it is still in L1, so the data is read from memory once.
void gram_fill_f32(const float* x, int64_t sC, int64_t sL, const GramRun* runs, int64_t nruns, int64_t k, int64_t c0,
                   int64_t c1, float* out, int64_t ld, double* sums);

}  // namespace afie
