"""Benchmark setup: device clock, shape selection, machine info recorded with every result."""
import os

import pytest
import torch

from bench import shapes

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    group = parser.getgroup("lowrank_kernels bench")
    group.addoption("--bench-models", default=None,
                    help="comma-separated models from bench/shapes.py (default: the headline Llama-3-8B shapes on "
                         "CUDA, tiny CPU stand-ins otherwise)")
    group.addoption("--bench-providers", default=None, help="comma-separated providers to run (default: all)")
    group.addoption("--bench-eager", action="store_true",
                    help="on CUDA, time eager calls (includes Python launch overhead) instead of CUDA-graph replay")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # GPU time through CUDA events unless the user chose another --benchmark-timer.
    if config.getoption("benchmark_timer", None) == "time.perf_counter":
        config.option.benchmark_timer = "bench.timing.device_clock"


def pytest_benchmark_update_machine_info(config, machine_info):
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "triton", "bitsandbytes", "peft", "lowrank_kernels"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    machine_info["packages"] = versions
    machine_info["gpu"] = torch.cuda.get_device_name() if HAS_CUDA else None


def selected_shapes(config):
    """[(id, (in_features, out_features))] chosen by --bench-models."""
    models = config.getoption("--bench-models")
    if models:
        picked = [(m, layer) for m in models.split(",") for layer in shapes.MODELS[m] if m in shapes.MODELS] + \
                 [(m, layer) for m in models.split(",") if m in shapes.CPU_SMOKE for layer in shapes.CPU_SMOKE[m]]
    elif HAS_CUDA:
        picked = shapes.HEADLINE
    else:
        picked = [("tiny", layer) for layer in shapes.CPU_SMOKE["tiny"]]
    seen, out = set(), []
    for model, layer in picked:
        dims = shapes.shape(model, layer)
        if dims not in seen:
            seen.add(dims)
            out.append((f"{model}.{layer}-{dims[0]}x{dims[1]}", dims))
    return out


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        chosen = selected_shapes(metafunc.config)
        metafunc.parametrize("shape", [dims for _, dims in chosen], ids=[name for name, _ in chosen])


GRAPH_CALLS = 10  # calls captured per CUDA graph; the reported time is per call


def cuda_graph_of(fn, calls=GRAPH_CALLS):
    """A callable replaying ``calls`` captured calls of ``fn``: device time without Python launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compile kernels, fill allocator pools
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


@pytest.fixture
def run(benchmark, request):
    """``run(fn, provider, eager=False, **info)``: time ``fn`` and record ``info`` with the result.

    CUDA: median over rounds of CUDA-graph replays (``GRAPH_CALLS`` calls each), per call; ``eager=True`` (or
    ``--bench-eager``) times eager calls instead, for work that cannot be captured. CPU: a few eager rounds.
    """
    wanted = request.config.getoption("--bench-providers")
    eager = request.config.getoption("--bench-eager")

    def _run(fn, provider, eager=eager, **info):
        if wanted and provider not in wanted.split(","):
            pytest.skip(f"provider {provider} not selected")
        benchmark.group = info.pop("group", None) or request.node.originalname
        if not HAS_CUDA:
            benchmark.extra_info.update(provider=provider, mode="eager", **info)
            return benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(provider=provider, mode="eager" if eager else "cuda-graph", **info)
        if eager:
            return benchmark.pedantic(fn, rounds=30, iterations=GRAPH_CALLS, warmup_rounds=3)
        replay = cuda_graph_of(fn)
        benchmark.pedantic(replay, rounds=30, iterations=1, warmup_rounds=2)
        stats = benchmark.stats.stats  # per replay -> per call; drop any statistic cached from the old data
        stats.data[:] = [d / GRAPH_CALLS for d in stats.data]
        for key in [k for k in vars(stats) if k != "data"]:
            delattr(stats, key)

    return _run
