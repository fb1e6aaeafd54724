"""torchslim microbenchmarks (installed as torchslim.benchmarks; run via `torchslim bench`)."""
