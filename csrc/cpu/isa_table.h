// The kernel table of one ISA level; included last by isa_<level>.cpp.
#pragma once

namespace torchslim::cpu::TORCHSLIM_ISA_NS {

const KernelTable& kernel_table() {
  static const KernelTable table{TORCHSLIM_ISA_LEVEL,
                                 &quantize_rows,
                                 &int8_gemm,
                                 &w8a16_gemm,
                                 &quantize_q8_blocks,
                                 &w4_gemm,
                                 &attention,
                                 &sparse24_gemm,
                                 &bitmask_gemm,
                                 &csr_gemm,
                                 &block_gemm,
                                 &sliced_gemm,
                                 kSparse24OrderX,
                                 bf16_dot_supported(),
                                 nullptr,
                                 0,
                                 nullptr,
                                 0,
                                 nullptr,
                                 nullptr,
                                 nullptr,
                                 kW4StripMinM,
                                 attention_pack_kernel(),
                                 kAttnPackMinRows,
                                 kAttnPackFp32MinRows,
                                 kInt8StripMinM,
                                 kInt8StripCols,
                                 kSp24StripMinM,
                                 &bitmask_q8_strip_min_m,
                                 &sliced_q8_strip_min_m,
                                 w8a16_pair_kernel(),
                                 kW8A16PairMinM,
                                 kW8A16PairCols};
  return table;
}

}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
