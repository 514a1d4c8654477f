"""prefix_attn_func against the float64 reference: output, lse and every gradient, both backends."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefix_attn import prefix_attn_func
from tests.helpers import Case, check_against_reference, make_inputs, one_case_per_launch_path

BACKENDS = ["triton", "torch"]

CASES = [
    Case(),                                                     # plain causal attention, P = 0
    Case(P=10),                                                 # shared prefix, one ragged prefix block
    Case(P=37, Lq=23, Lk=23, D=40),                             # several prefix blocks, head dim 40
    Case(P=5, causal=False, D=24),                              # non-causal
    Case(P=10, Lq=7, Lk=30),                                    # Lq < Lk: bottom-right alignment
    Case(P=10, Lq=1, Lk=33, B=3),                               # decode shape
    Case(P=12, mask="left", B=3),                               # left padding
    Case(P=12, mask="right", B=3, D=80),                        # right padding, head dim 80
    Case(P=12, mask="holes", causal=False),                     # holes
    Case(P=0, mask="empty_row"),                                # a row that sees nothing
    Case(P=9, T=3, B=4),                                        # bank, mixed tasks
    Case(P=20, T=3, B=5, prefix_lens=True, mask="left"),        # bank + prefix_lens + padding
    Case(P=16, prefix_lens=True, D=96, H=1),                    # shared prefix with prefix_lens
    Case(P=10, strided=True, mask="left"),                      # HF-style strided views
    Case(P=33, B=1, Lq=40, Lk=40, H=3, D=16),                   # odd sizes, smallest head dim
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_against_reference(case, backend):
    check_against_reference(case, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", one_case_per_launch_path(CASES), ids=str)
def test_fp16_against_reference(case, backend):
    check_against_reference(case, torch.float16, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient(backend):
    check_against_reference(Case(P=10, T=2, B=3, mask="left"), torch.float32, backend, with_dlse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_output_gradients(backend):
    """Regression: the gradient of lse.sum() (and out.sum()) arrives as a stride-0 expansion."""
    case = Case(P=10, B=2, mask="left")
    tensors, kwargs = make_inputs(case)
    out, lse = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend=backend)
    grads = torch.autograd.grad(out.sum() + lse.sum(), list(tensors.values()))
    ref_t = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
    from prefix_attn.reference import prefix_attn_ref

    ref_out, ref_lse = prefix_attn_ref(**ref_t, **kwargs, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), list(ref_t.values()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_128(backend):
    check_against_reference(Case(P=10, B=1, H=1, D=128, Lq=17, Lk=17), torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_are_zero_not_nan(backend):
    """Left padding + causal leaves early queries of a sequence with nothing to see when P = 0."""
    case = Case(P=0, B=2, Lq=12, Lk=12, mask="left")
    tensors, kwargs = make_inputs(case)
    kwargs["attention_mask"][0, :6] = False
    out, lse = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend=backend)
    assert torch.all(out[0, :6] == 0) and torch.all(torch.isneginf(lse[0, :, :6]))
    out.sum().backward()
    for name, t in tensors.items():
        assert torch.isfinite(t.grad).all(), name
    check_against_reference(case, torch.float32, backend, tensors_kwargs=(tensors, kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_prefix_is_plain_attention(backend):
    case = Case(P=0)
    tensors, kwargs = make_inputs(case)
    empty = tensors["q"].new_zeros((0, case.H, case.D))
    a = prefix_attn_func(**tensors, **kwargs, backend=backend)
    b = prefix_attn_func(**tensors, prefix_k=empty, prefix_v=empty, **kwargs, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_lens_zero_equals_no_prefix(backend):
    case = Case(P=8, prefix_lens=True)
    tensors, kwargs = make_inputs(case)
    kwargs["prefix_lens"] = torch.zeros(1, dtype=torch.int64, device=tensors["q"].device)
    with_prefix = prefix_attn_func(**tensors, **kwargs, backend=backend)
    plain = {k: tensors[k] for k in ("q", "k", "v")}
    without = prefix_attn_func(**plain, causal=True, backend=backend)
    torch.testing.assert_close(with_prefix, without, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_matches_one_call_per_task(backend):
    """A mixed-task batch gives each row what a single-task call with that task's prefix gives."""
    case = Case(P=11, T=3, B=5, mask="left")
    tensors, kwargs = make_inputs(case, requires_grad=False)
    out = prefix_attn_func(**tensors, **kwargs, backend=backend)
    for b in range(case.B):
        t = int(kwargs["prefix_idx"][b])
        single = prefix_attn_func(
            tensors["q"][b:b + 1], tensors["k"][b:b + 1], tensors["v"][b:b + 1],
            tensors["prefix_k"][t], tensors["prefix_v"][t],
            attention_mask=kwargs["attention_mask"][b:b + 1], causal=True, backend=backend)
        torch.testing.assert_close(out[b:b + 1], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_integer_mask(backend):
    case = Case(P=7, mask="holes")
    tensors, kwargs = make_inputs(case)
    kwargs["attention_mask"] = kwargs["attention_mask"].to(torch.int64)
    kwargs["softmax_scale"] = 0.05
    check_against_reference(case, torch.float32, backend, tensors_kwargs=(tensors, kwargs))


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    B=st.integers(1, 3), Lq=st.integers(1, 40), extra_k=st.integers(0, 20), H=st.integers(1, 3),
    D=st.sampled_from([16, 24, 40, 64]), P=st.integers(0, 40), T=st.integers(0, 3),
    causal=st.booleans(), mask=st.sampled_from([None, "left", "right", "holes"]), prefix_lens=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_random_shapes(B, Lq, extra_k, H, D, P, T, causal, mask, prefix_lens, backend):
    case = Case(B=B, Lq=Lq, Lk=Lq + extra_k, H=H, D=D, P=P if (P or not T) else 1, T=T, causal=causal,
                mask=mask, prefix_lens=prefix_lens and (P > 0 or T > 0))
    check_against_reference(case, torch.float32, backend)
