"""The XLA compile options of the lab's programs (train steps, sweep epochs, evaluation).

On CPU, jaxlib 0.10 hands convolutions (all but the smallest) to YNNPACK, a
`__ynn_fusion` around each `convolution`, beside dots and reductions. On the benchmark
machine (Intel Xeon, 2 cores) its backward convolutions are about 3× slower than XLA's
own kernel: the reference CNN's 32→64 convolution's backward pass 56 → 18 ms, the whole
train step 97 → 70 ms (benchmarks/HISTORY.md, "2026-11-24 (late)"). So the lab keeps
dots and reductions on YNNPACK and convolutions off it. Use `options()` in your own
`jax.jit(..., compiler_options=...)` for the same effect; set
`--xla_cpu_experimental_ynn_fusion_type` in `XLA_FLAGS` to choose yourself (the lab then
passes nothing)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from wdjax.lab import ops

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def _ynn_convolution(options: dict[str, str]) -> bool:
    """Whether XLA compiles a small convolution into a YNNPACK fusion under `options`."""
    x, w, same = jnp.zeros((2, 8, 8, 32)), jnp.zeros((3, 3, 32, 32)), ((1, 1), (1, 1))
    conv = jax.jit(ops.conv2d, static_argnums=2, compiler_options=options)
    text = conv.lower(x, w, same).compile().as_text()
    return '"__ynn_fusion"' in text


@functools.cache
def options() -> dict[str, str]:
    """`CPU_OPTIONS` where they apply: the default backend is CPU, `XLA_FLAGS` does not
    choose YNNPACK's fusions, this jaxlib sends convolutions to YNNPACK by default and
    accepts the options (checked once, by compiling a small convolution); else `{}`."""
    if jax.default_backend() != "cpu" or YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
        return {}
    try:
        if _ynn_convolution({}) and not _ynn_convolution(CPU_OPTIONS):
            return dict(CPU_OPTIONS)
    except jax.errors.JaxRuntimeError:  # a jaxlib without these options
        pass
    return {}
