// Fused attention on the AMX tile unit (pair_attention.h, its multiplies issued a step at a time
// on the tiles beside the softmax's AVX-512 work), for the amx level.
#pragma once

#include "amx_gemm.h"
#include "pair_attention.h"

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

// The jobs on the tile unit, in tmm0-3: A tiles (tmm4-5) are row groups of `a`, B tiles (tmm6-7)
// the pair at b and b + b_pair.
class TilePipe {
 public:
  TilePipe() : scope_(full_tiles()) {}

  void add(const TileJob& job) {
    if (job.blocks > 0 && job.steps > 0) jobs_[count_++] = job;
  }
  int64_t steps_left() const {
    if (job_ == count_) return 0;
    int64_t n = 0;
    for (int j = job_; j < count_; ++j) n += int64_t{jobs_[j].blocks} * jobs_[j].steps;
    return n - (block_ * int64_t{jobs_[job_].steps} + step_);
  }
  // Issues the next n steps (fewer if the queue runs out).
  TORCHSLIM_INLINE void issue(int64_t n) {
    for (; n > 0 && job_ < count_; --n) step();
  }
  void drain() {
    while (job_ < count_) step();
    count_ = job_ = 0;
    tile_reads_memory();
  }

 private:
  TORCHSLIM_INLINE void step() {
    const TileJob& j = jobs_[job_];
    const int64_t ldc_floats = j.ldc / static_cast<int64_t>(sizeof(float));
    float* c = j.c + 32 * block_;
    if (step_ == 0) {
      if (j.accumulate) {
        _tile_loadd(0, c, j.ldc);
        _tile_loadd(1, c + 16, j.ldc);
        if (j.groups > 1) {
          _tile_loadd(2, c + 16 * ldc_floats, j.ldc);
          _tile_loadd(3, c + 16 * ldc_floats + 16, j.ldc);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
    }
    const uint16_t* b = j.b + block_ * j.b_block + step_ * j.b_step;
    const uint16_t* a = j.a + 32 * step_;
    for (int i = 0; i < j.parts; ++i) {  // the products a_i b_e, i + e < parts
      const uint16_t* ai = a + i * j.a_plane;
      _tile_loadd(4, ai, j.lda);
      if (j.groups > 1) _tile_loadd(5, ai + 8 * j.lda, j.lda);  // 16 rows on: 16 lda bytes
      for (int e = 0; i + e < j.parts; ++e) {
        const uint16_t* be = b + e * j.b_plane;
        _tile_loadd(6, be, 64);
        _tile_loadd(7, be + j.b_pair, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (j.groups > 1) {
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
    if (++step_ < j.steps) return;
    _tile_stored(0, c, j.ldc);
    _tile_stored(1, c + 16, j.ldc);
    if (j.groups > 1) {
      _tile_stored(2, c + 16 * ldc_floats, j.ldc);
      _tile_stored(3, c + 16 * ldc_floats + 16, j.ldc);
    }
    step_ = 0;
    if (++block_ < j.blocks) return;
    block_ = 0;
    ++job_;
  }

  TileScope scope_;  // the tiles, configured while the pipe lives
  TileJob jobs_[2];
  int count_ = 0, job_ = 0, block_ = 0, step_ = 0;
};

void amx_attention(const AttentionArgs& a, int64_t b, int64_t h0, int64_t nh, int64_t i0,
                   int64_t i1, int64_t j_begin, int64_t j_end, float* work, float* partial) {
  if (a.k_tiles != nullptr && nh * (i1 - i0) >= kAttnTileMinRows) {
    return attention_on_tiles<TilePipe>(a, b, h0, nh, i0, i1, j_begin, j_end, partial);
  }
  avx512::kernel_table().attention(a, b, h0, nh, i0, i1, j_begin, j_end, work, partial);
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
