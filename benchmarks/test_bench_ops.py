"""pytest-benchmark: op-level attention and decode steps, per provider."""
import dataclasses

import pytest
import torch

from benchmarks.bench_attention import AttnShape, _inputs
from benchmarks.bench_decode import PROVIDERS as DECODE_PROVIDERS
from benchmarks.bench_decode import DecodeShape
from benchmarks.conftest import DEVICE, check_records
from benchmarks.providers import PROVIDERS, unavailable_reason

ON_GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ATTN = AttnShape(8, 12, 1024, 10) if ON_GPU else AttnShape(1, 2, 64, 8)
DECODE = DecodeShape(128, 2048, 1024) if ON_GPU else DecodeShape(2, 16, 32, H=2)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_attention(benchmark, sync, provider, mode):
    reason = unavailable_reason(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    fn = PROVIDERS[provider]
    inputs = _inputs(ATTN, DTYPE, DEVICE)
    dout = torch.randn_like(inputs[0])

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(*inputs)
        else:
            out = fn(*inputs)
            out.backward(dout)
        sync()
        return out

    benchmark.extra_info.update(dataclasses.asdict(ATTN), dtype=str(DTYPE), gflop=ATTN.flops(mode) / 1e9)
    out = benchmark(run)
    grads = [x.grad for x in inputs if x is not None] if mode == "fwd+bwd" else []
    check_records(benchmark, [out, *grads], [*dataclasses.asdict(ATTN), "dtype", "gflop"])


@pytest.mark.parametrize("provider", list(DECODE_PROVIDERS))
def test_decode_step(benchmark, sync, provider):
    reason = unavailable_reason(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    fn = DECODE_PROVIDERS[provider]
    s = DECODE
    q = torch.randn(s.B, 1, s.H, s.D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(s.B, s.L, s.H, s.D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    pk, pv = (torch.randn(s.P, s.H, s.D, device=DEVICE, dtype=DTYPE) for _ in range(2))

    def run():
        with torch.no_grad():
            out = fn(q, k, v, pk, pv)
        sync()
        return out

    benchmark.extra_info.update(dataclasses.asdict(s), dtype=str(DTYPE), bytes=s.bytes_to_move(q.element_size()))
    out = benchmark(run)
    assert out.shape == q.shape
    check_records(benchmark, [out], [*dataclasses.asdict(s), "dtype", "bytes"])
