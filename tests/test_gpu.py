"""GPU-only checks: bf16 (the interpreter cannot compute it), large shapes, every shipped config,
64-bit offsets. Skipped without CUDA."""
import pytest
import torch

from csrc_triton.attn_bwd import BWD_GPU_CONFIGS, bwd_kernel
from csrc_triton.attn_fwd import FWD_GPU_CONFIGS, prefix_attn_fwd_kernel
from prefix_attn import prefix_attn_func
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import Case, check_against_reference

pytestmark = pytest.mark.gpu

BF16_CASES = [
    Case(P=10, B=2, Lq=300, Lk=300, H=3, D=64),
    Case(P=200, B=2, Lq=257, Lk=257, H=2, D=64, mask="left"),
    Case(P=20, T=3, B=4, Lq=130, Lk=190, H=2, D=80, prefix_lens=True, mask="right"),
    Case(P=10, B=3, Lq=1, Lk=333, H=4, D=128),
    Case(P=37, B=2, Lq=100, Lk=100, H=2, D=96, causal=False, mask="holes", strided=True),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=str)
def test_bf16_against_reference(case):
    check_against_reference(case, torch.bfloat16, "triton")


@pytest.mark.parametrize("case", BF16_CASES[:3], ids=str)
def test_fp16_large_against_reference(case):
    check_against_reference(case, torch.float16, "triton")


def test_gpt2_shape_bf16():
    check_against_reference(Case(P=64, B=4, Lq=1024, Lk=1024, H=12, D=64), torch.bfloat16, "triton")


@pytest.fixture
def one_config(monkeypatch):
    """Force the autotuned kernels to one config at a time; restore afterwards.

    The direct launch path keeps compiled kernels per specialisation (prefix_attn._launch) and plans keep
    bound launches: both are emptied, or every forced config after the first would reuse the first one's
    compiled kernel (regression: the check covered one config)."""
    from prefix_attn import _launch
    from prefix_attn import triton_launch as launch

    saved = [(k, k.configs, dict(k.cache)) for k in (prefix_attn_fwd_kernel, bwd_kernel)]

    def forget_compiled():
        for launcher in _launch._LAUNCHERS.values():
            launcher.clear()
        monkeypatch.setattr(launch, "_BACKWARD_PLANS", {})
        monkeypatch.setattr(launch, "_FORWARD_PLANS", {})

    def force(kernel, config):
        kernel.configs = [config]
        kernel.cache.clear()
        forget_compiled()

    yield force
    for kernel, configs, cache in saved:
        kernel.configs = configs
        kernel.cache.clear()
        kernel.cache.update(cache)
    forget_compiled()


@pytest.mark.parametrize("index", range(max(len(FWD_GPU_CONFIGS), len(BWD_GPU_CONFIGS))))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_config(one_config, index, head_dim):
    one_config(prefix_attn_fwd_kernel, FWD_GPU_CONFIGS[index % len(FWD_GPU_CONFIGS)])
    one_config(bwd_kernel, BWD_GPU_CONFIGS[index % len(BWD_GPU_CONFIGS)])
    check_against_reference(Case(P=40, B=2, Lq=200, Lk=260, H=2, D=head_dim, mask="left"), torch.float16, "triton")


def test_64bit_offsets():
    """B * L * H * D > 2**31 elements in q and out: the last rows must be right too."""
    B, L, H, D, P = 2200, 512, 16, 128, 16
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    assert B * L * H * D > 2**31
    q = torch.randn(B, L, H, D, device="cuda", dtype=torch.float16)
    # k, v shared by the batch through a stride-0 view: only q and out are huge.
    k = torch.randn(1, L, H, D, device="cuda", dtype=torch.float16).expand(B, -1, -1, -1)
    v = torch.randn(1, L, H, D, device="cuda", dtype=torch.float16).expand(B, -1, -1, -1)
    pk, pv = (torch.randn(P, H, D, device="cuda", dtype=torch.float16) for _ in range(2))
    out = prefix_attn_func(q, k, v, pk, pv, causal=True)
    for b in (0, B - 1):
        ref = prefix_attn_ref(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(), pk.float(), pv.float())
        torch.testing.assert_close(out[b:b + 1].float(), ref, atol=2e-3, rtol=2e-3)


def test_backward_is_deterministic_at_scale():
    case = Case(P=64, T=2, B=8, Lq=512, Lk=512, H=12, D=64, mask="left")
    from tests.helpers import make_inputs

    tensors, kwargs = make_inputs(case, torch.bfloat16)
    dout = torch.randn_like(tensors["q"])
    grads = []
    for _ in range(2):
        torch.manual_seed(5)
        out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.1)
        grads.append(torch.autograd.grad(out, list(tensors.values()), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
