"""pytest-benchmark: a GPT-2 prefix-tuning training step per route (PEFT alone, PEFT + patch,
native PrefixTuning, PEFT prompt tuning)."""
import pytest
import torch

from benchmarks.bench_e2e import ROUTES, E2EShape, build
from benchmarks.conftest import DEVICE, check_records

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
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss.detach()

    benchmark.extra_info.update(model=SHAPE.model, B=SHAPE.B, L=SHAPE.L, P=SHAPE.P, tokens=ids.numel())
    loss = benchmark(step)
    # One more backward, untimed: the gradients the steps applied are finite and not all zero.
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in params]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), "nothing trained"
    check_records(benchmark, [loss, *grads, *params], ["model", "B", "L", "P", "tokens"])
