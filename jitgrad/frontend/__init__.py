"""The front end: the IR, tracing, primitives (ops/), the grad transform, jit/grad."""
