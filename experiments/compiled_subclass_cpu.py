"""Host time of a compiled training step of a converted bnb-QLoRA Llama (tiny, CPU, inductor) with the operators'
weights handed on as bitsandbytes' ``Params4bit`` (as inductor passes them) against plain tensors of the same
storage (``NF4Weight.from_op_args`` now converts them), rounds alternated. Result:
bench/results/compiled-subclass-cpu.txt.

    python experiments/compiled_subclass_cpu.py
"""
import os, statistics, sys, tempfile, time, warnings
import torch
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowrank_kernels import NF4Weight  # noqa: E402
from lowrank_kernels.nf4 import DTYPES  # noqa: E402
from tests.test_training_stack import lora_pair, qlora_llama  # noqa: E402

converting = NF4Weight.from_op_args.__func__


def passing_subclass(cls, tensors, meta):  # from_op_args before the conversion
    self = cls.__new__(cls)
    self.packed, self.absmax, self.code = tensors[:3]
    self.absmax2, self.code2, self.offset = tensors[3:] if len(tensors) == 6 else (None, None, None)
    self.blocksize, self.nested_blocksize = meta[0], meta[1]
    self.dtype, self.shape = DTYPES[meta[2]], torch.Size(meta[3:])
    return self


_, model = lora_pair(qlora_llama(tempfile.mkdtemp()), dropout=0.0)
model.train()
ids = torch.randint(0, 128, (2, 9))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
compiled = torch.compile(model)


def step():
    compiled(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(5):
    step()
times = {"Params4bit handed on": [], "plain tensors": []}
for _ in range(9):
    for name, impl in (("Params4bit handed on", passing_subclass), ("plain tensors", converting)):
        NF4Weight.from_op_args = classmethod(impl)
        step()
        t = time.perf_counter()
        for _ in range(20):
            step()
        times[name].append((time.perf_counter() - t) / 20 * 1e3)
print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 layers x 7 projections, 2 x 9 tokens, inductor")
for name, ts in times.items():
    print(f"{name:22s} median {statistics.median(ts):6.2f} ms/step (min {min(ts):.2f})")
