import os

# Tests never touch the hub: a failed lookup costs ~27 s each.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Tests run tiny shapes, where XLA:CPU compile time dwarfs run time; the cheapest backend
# optimisation level cuts compile time 2-4x (measured) without changing the HLO that is tested.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

# Persistent compilation cache keeps repeated jit compiles cheap across runs.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled XLA program after each test module. The whole suite compiles thousands
    of programs; kept alive together, their JIT code mappings grew until XLA:CPU crashed (a
    segfault inside the compiler, ~330 tests in, reproducible in suite order, never in isolation;
    vm.max_map_count is 65530 here). Re-compiles hit the persistent cache above."""
    yield
    jax.clear_caches()
