"""pytest-benchmark: a GPT-2 prefix-tuning training step per route (PEFT alone, PEFT + patch,
native PrefixTuning, PEFT prompt tuning)."""
import pytest
import torch

from benchmarks.bench_e2e import ROUTES, E2EShape, build
from benchmarks.conftest import DEVICE

ON_GPU = DEVICE == "cuda"
SHAPE = E2EShape("small", 8, 512, 200) if ON_GPU else E2EShape("tiny", 2, 32, 8)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.mark.parametrize("route", ROUTES)
def test_train_step(benchmark, sync, route):
    if route != "native":
        pytest.importorskip("peft")
    model, params = build(route, SHAPE, DEVICE, DTYPE)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, SHAPE.config().vocab_size, (SHAPE.B, SHAPE.L), device=DEVICE)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    benchmark.extra_info.update(model=SHAPE.model, B=SHAPE.B, L=SHAPE.L, P=SHAPE.P, tokens=ids.numel())
    benchmark(step)
