"""Training-mode fwd+bwd timings on the CPU: native vs eager reference, per fused block and
for the whole SAFFNet (128×96, batch 8, 2 threads). Median of repeated runs, wall clock.

    python benchmarks/profile_native_training_cpu.py
"""
import copy, functools, time, statistics, torch
from saffnet_fast.fast.convert import convert
from saffnet_fast.models import build_model
from saffnet_fast.nn.reference import SCAFF, SAWF, SplitResplice
from saffnet_fast.fast import blocks
native_scaff = functools.partial(blocks.scaff, backend="native")
native_sawf = functools.partial(blocks.sawf, backend="native")
native_split_resplice = functools.partial(blocks.split_resplice, backend="native")
torch.set_num_threads(2)
def timeit(fn, reps=7):
    fn(); ts=[]
    for _ in range(reps):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
def fb(m, f, x):
    def run():
        xx = x.detach().requires_grad_(True); out = f(m, xx); out.backward(torch.ones_like(out))
    return run
rows=[]
for name, m, f, shape in [("SCAFF", SCAFF(64), native_scaff, (8,64,64,48)), ("SAWF", SAWF(32), native_sawf, (8,32,64,48)),
                          ("SR(64)", SplitResplice(64, dropout=0.1), native_split_resplice, (8,64,64,48))]:
    m.train(); x = torch.randn(shape)
    r = timeit(fb(m, lambda mm, t: mm(t), x)); n = timeit(fb(m, f, x))
    print(f"{name} {shape} train fwd+bwd: eager {r:.1f} ms, native {n:.1f} ms, {r/n:.2f}x")
torch.manual_seed(0)
ref = build_model("saffnet", num_joints=17, input_size=(128, 96), backend="reference").train()
nat = convert(copy.deepcopy(ref), backend="native").train()
x = torch.randn(8, 3, 128, 96)
def step(m):
    def run():
        out = m(x); out.sum().backward()
    return run
r = timeit(step(ref), 3); n = timeit(step(nat), 3)
print(f"SAFFNet 128x96 b8 train step (fwd+bwd): eager {r:.0f} ms, native {n:.0f} ms, {r/n:.2f}x")
