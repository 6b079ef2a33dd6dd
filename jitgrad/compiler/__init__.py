"""The compiler: passes, recomputation, fusion, code generation, the memory planner,
kernels, the cache and the backends, joined by the pipeline."""
