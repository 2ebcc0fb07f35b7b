import os

# Tests never touch the hub: a failed lookup costs ~27 s each.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Tests run tiny shapes, where XLA:CPU compile time dwarfs run time; the cheapest backend
# optimisation level cuts compile time 2-4x (measured) without changing the HLO that is tested.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")

import jax  # noqa: E402

# Persistent compilation cache keeps repeated jit compiles cheap across runs.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


import pytest  # noqa: E402


# When to drop every compiled XLA program (checked after each test module). The whole suite
# compiles thousands of programs; kept alive together, their JIT code mappings grew until XLA:CPU
# crashed (a segfault inside the compiler, ~330 tests in, reproducible in suite order, never in
# isolation; vm.max_map_count is 65530 here). Clearing after *every* module cost more than it
# saved: each module re-traced and re-lowered the programs it shares with earlier ones (the
# persistent cache below only skips the XLA compile). So clear only near the mapping limit, or as
# a safety valve on memory (a clear hardly lowers the resident size, which plateaus near 5.5 GB per
# worker: the allocator keeps the pages, so a lower memory bound would clear after every module).
_MAX_MAPPINGS = 24000
_MAX_RSS_BYTES = 9 * 2**30


def _process_footprint() -> tuple[int, int]:
    """(memory mappings, resident bytes) of this process; (0, 0) where /proc is not available."""
    try:
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return maps, rss
    except (OSError, ValueError, IndexError):
        return 0, 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    maps, rss = _process_footprint()
    if maps > _MAX_MAPPINGS or rss > _MAX_RSS_BYTES:
        jax.clear_caches()


# Test modules that take longest on a fresh clone (cold compilation cache), longest first; measured
# with `--durations=0`; rerun that and update the list when a module grows. Workers take whole
# modules in collection order (`--dist loadfile --no-loadscope-reorder` in the Makefile: by default
# pytest-xdist >= 3.6 orders modules by their number of tests instead, which left heavy modules with
# few tests, test_cli and test_text_only, for the end and one worker running them alone).
_LONGEST_FIRST = (
    "test_cli.py", "test_mocd.py", "test_calibrate.py", "test_runtime.py", "test_text_only.py", "test_sharding.py",
    "test_small_vlm.py", "test_gptq_method.py", "test_evaluate.py", "test_reliability.py", "test_weight_solver.py",
    "test_export_hf.py", "test_vision_quant.py", "test_gradient_methods.py", "test_quant.py", "test_act_pack.py",
    "test_pipeline.py", "test_packed_acts.py", "test_awq.py", "test_gptq_solver.py", "test_export.py",
    "test_split_gemm.py", "test_qwen2_5_vl.py", "test_llava.py", "test_analysis.py", "test_convert_script.py",
    "test_transforms.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    # stable: tests keep their order inside a module; every worker sorts the same way
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
