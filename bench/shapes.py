"""Model-shape registry: the linear layers of the models users fine-tune, as (in_features, out_features).

Benchmarks draw shapes from here; none hard-codes its own.
"""
MODELS = {
    "llama3-8b": {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                  "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)},
    "llama2-7b": {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                  "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)},
    "mistral-7b": {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)},
    "qwen2.5-7b": {"q_proj": (3584, 3584), "k_proj": (3584, 512), "v_proj": (3584, 512), "o_proj": (3584, 3584),
                   "gate_proj": (3584, 18944), "up_proj": (3584, 18944), "down_proj": (18944, 3584)},
    "llama3-70b": {"q_proj": (8192, 8192), "k_proj": (8192, 1024), "v_proj": (8192, 1024), "o_proj": (8192, 8192),
                   "gate_proj": (8192, 28672), "up_proj": (8192, 28672), "down_proj": (28672, 8192)},
}

# The three distinct Llama-3-8B MLP/attention shapes every headline number is quoted on (DESIGN.md §5).
HEADLINE = [("llama3-8b", "q_proj"), ("llama3-8b", "gate_proj"), ("llama3-8b", "down_proj")]

# Small stand-ins for CPU-only machines: the same code paths, sizes a laptop core handles in milliseconds.
CPU_SMOKE = {"tiny": {"square": (256, 256), "wide": (256, 704), "tall": (704, 256)}}


def shape(model: str, layer: str):
    """(in_features, out_features) of ``model``'s ``layer``."""
    table = {**MODELS, **CPU_SMOKE}
    if model not in table:
        raise KeyError(f"unknown model {model!r}; known: {sorted(table)}")
    if layer not in table[model]:
        raise KeyError(f"{model} has no layer {layer!r}; known: {sorted(table[model])}")
    return table[model][layer]
