"""Benchmark setup: options, device clock, shape / token-count / mode / provider selection, the ``run`` timing
fixture, peak-memory measurement, machine info recorded with every result."""
import os

import pytest
import torch

from bench import shapes
from bench.timing import hold_gpu
from bench.progress import Progress

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

MODES = ("forward", "backward", "fwd+bwd", "fwd+bwd-graph")  # of the layer benchmarks (test_forward.py,
# test_backward.py)


def pytest_addoption(parser):
    group = parser.getgroup("lowrank_kernels bench")
    group.addoption("--bench-models", default=None,
                    help="comma-separated models from bench/shapes.py: their layer shapes, and the model of the "
                         "training step (default: the headline Llama-3-8B shapes and llama3-8b on CUDA, tiny "
                         "stand-ins on CPU)")
    group.addoption("--bench-providers", default=None,
                    help="comma-separated providers to run; the other tests are deselected (default: all)")
    group.addoption("--bench-m", default=None,
                    help="comma-separated token counts M for the layer benchmarks (default: per benchmark file)")
    group.addoption("--bench-modes", default=None,
                    help=f"comma-separated layer modes among {','.join(MODES)} (default: all)")
    group.addoption("--bench-eager", action="store_true",
                    help="on CUDA, time eager calls (includes Python launch overhead) instead of CUDA-graph replay")
    group.addoption("--bench-layers", type=int, default=None,
                    help="decoder layers of the training-step model (default: 4 on CUDA, 2 on CPU)")
    group.addoption("--bench-grad-ckpt", action="store_true",
                    help="training step with gradient checkpointing (default: off)")
    group.addoption("--bench-liger", action="store_true",
                    help="training step with Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy "
                         "applied to the model of every provider (CUDA; needs liger-kernel)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # GPU time through CUDA events unless the user chose another --benchmark-timer.
    if config.getoption("benchmark_timer", None) == "time.perf_counter":
        config.option.benchmark_timer = "bench.timing.device_clock"
    config.pluginmanager.register(Progress(config), "bench-progress")


def pytest_benchmark_update_machine_info(config, machine_info):
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "triton", "bitsandbytes", "peft", "transformers", "lowrank_kernels"):
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


def selected_models(config):
    """Models of the training-step benchmark: those of --bench-models in shapes.MODELS, or "tiny" (a toy config
    of test_train_step.py); default llama3-8b on CUDA, tiny on CPU."""
    models = config.getoption("--bench-models")
    if models:
        return [m for m in models.split(",") if m in shapes.MODELS or m == "tiny"]
    return ["llama3-8b"] if HAS_CUDA else ["tiny"]


def _csv(config, option):
    value = config.getoption(option)
    return value.split(",") if value else None


def pytest_generate_tests(metafunc):
    """``shape`` and ``model`` come from --bench-models; ``M`` from --bench-m or the test module's ``TOKENS``."""
    if "shape" in metafunc.fixturenames:
        chosen = selected_shapes(metafunc.config)
        metafunc.parametrize("shape", [dims for _, dims in chosen], ids=[name for name, _ in chosen])
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", selected_models(metafunc.config))
    if "M" in metafunc.fixturenames:
        tokens = _csv(metafunc.config, "--bench-m")
        metafunc.parametrize("M", [int(m) for m in tokens] if tokens else metafunc.module.TOKENS)


def pytest_collection_modifyitems(config, items):
    """Deselects the tests whose ``mode`` or ``provider`` parameter --bench-modes / --bench-providers leave out."""
    wanted = {"mode": _csv(config, "--bench-modes"), "provider": _csv(config, "--bench-providers")}
    unknown = set(wanted["mode"] or ()) - set(MODES)
    if unknown:
        raise pytest.UsageError(f"--bench-modes: unknown {sorted(unknown)}; known: {', '.join(MODES)}")
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        out = any(chosen and key in params and params[key] not in chosen for key, chosen in wanted.items())
        (dropped if out else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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


def peak_memory(step):
    """``(peak, baseline)`` bytes allocated on the CUDA device around one ``step()``, after a warm-up call:
    ``baseline`` is what was allocated before it (inputs, weights, optimizer state), ``peak`` the maximum
    during it. ``(None, None)`` without CUDA."""
    if not HAS_CUDA:
        return None, None
    step()  # first-call allocations (cuBLAS workspace, allocator pools) are not the step's own
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), baseline


@pytest.fixture
def run(benchmark, request):
    """``run(fn, provider, eager=False, rounds=30, **info)``: time ``fn`` and record ``info`` with the result.

    CUDA: median over rounds of CUDA-graph replays (``GRAPH_CALLS`` calls each), per call, each round timed from
    behind a spin kernel (``bench.timing.hold_gpu``: device time, without the graph's launch latency);
    ``eager=True`` (or ``--bench-eager``) times eager calls instead (host launch time included), for work that
    cannot be captured. CPU: a few eager rounds.
    extra_info gets ``provider``, ``timing`` (eager / cuda-graph) and ``info`` (``group`` names the group).
    """
    eager = request.config.getoption("--bench-eager")

    def _run(fn, provider, eager=eager, rounds=30, **info):
        benchmark.group = info.pop("group", None) or request.node.originalname
        if not HAS_CUDA:
            benchmark.extra_info.update(provider=provider, timing="eager", **info)
            return benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(provider=provider, timing="eager" if eager else "cuda-graph", **info)
        if eager:
            return benchmark.pedantic(fn, rounds=rounds, iterations=GRAPH_CALLS, warmup_rounds=3)
        replay = cuda_graph_of(fn)
        # the GPU spins while the host records the start event and launches the graph (bench/timing.py)
        benchmark.pedantic(replay, setup=hold_gpu, rounds=rounds, iterations=1, warmup_rounds=2)
        stats = benchmark.stats.stats  # per replay -> per call; drop any statistic cached from the old data
        stats.data[:] = [d / GRAPH_CALLS for d in stats.data]
        for key in [k for k in vars(stats) if k != "data"]:
            delattr(stats, key)

    return _run
