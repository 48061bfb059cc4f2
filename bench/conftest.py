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


@pytest.fixture
def run(benchmark, request):
    """``run(fn, provider, **info)``: time ``fn`` (GPU: many iterations per round) and record ``info``."""
    wanted = request.config.getoption("--bench-providers")

    def _run(fn, provider, **info):
        if wanted and provider not in wanted.split(","):
            pytest.skip(f"provider {provider} not selected")
        benchmark.group = info.pop("group", None) or request.node.originalname
        benchmark.extra_info.update(provider=provider, **info)
        if HAS_CUDA:
            return benchmark.pedantic(fn, rounds=30, iterations=10, warmup_rounds=3)
        return benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)

    return _run
