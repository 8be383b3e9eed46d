"""XLA flags every test process compiles with (conftest.py sets them for the
pytest process; tests that start their own processes pass them on).

LLVM without its optimisations: the suite is compile-bound (tiny models, a
few steps each). The HLO and XLA's own passes are the same; only the CPU
code generation is plainer (tests/test_train.py on 2 cores: 223 s -> 173 s;
the tiny U-Net's compile about halves). The CLI and the benchmarks compile
at the defaults when users run them.
"""

FAST_COMPILE = ('--xla_backend_optimization_level=0 '
                '--xla_llvm_disable_expensive_passes=true')
