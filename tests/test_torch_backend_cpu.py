"""The torch backend on CPU tensors: without dropout the own keys go through PyTorch's fused CPU
attention kernel and the prefix slots are merged by log-sum-exp (see prefix_attn.torch_backend).

Accuracy of that path is checked by every torch-backend case of test_attention.py and test_decode.py
(float64 reference); here: which path runs, and that it never holds more memory than SDPA over the
concatenation, the path the op replaces."""
import os

import pytest
import torch

from prefix_attn import prefix_attn_func
from tests.helpers import Case, PathSpy, check_against_reference, make_inputs


@pytest.mark.parametrize("case", [Case(P=10, mask="left", B=3), Case(P=9, T=3, B=4, prefix_lens=True),
                                  Case(P=10, Lq=7, Lk=30, mask="holes"), Case(P=0, mask="empty_row")], ids=str)
def test_without_dropout_the_fused_kernel_runs_forward_and_backward(monkeypatch, case):
    spy = PathSpy(monkeypatch)
    check_against_reference(case, torch.float32, "torch")
    assert spy.ran == ["_forward_fused_cpu", "_backward_fused_cpu"]


def test_dropout_lse_gradients_and_double_backward_take_the_explicit_path(monkeypatch):
    spy = PathSpy(monkeypatch)
    tensors, kwargs = make_inputs(Case(P=6, B=2), torch.float32)
    out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.2, backend="torch")
    out.sum().backward()
    assert spy.ran == []
    out, lse = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="torch")
    (out.sum() + lse.sum()).backward()  # an lse gradient: the fused backward cannot take one
    assert spy.ran == ["_forward_fused_cpu"]
    check_against_reference(Case(P=6, B=2), torch.float32, "torch", with_dlse=True)
    spy.ran.clear()
    out = prefix_attn_func(**tensors, **kwargs, backend="torch")
    (grad_q,) = torch.autograd.grad(out.square().sum(), tensors["q"], create_graph=True)
    grad_q.sum().backward()  # double backward: the explicit backward is made of differentiable ops
    assert spy.ran == ["_forward_fused_cpu"]


def test_forward_memory_is_at_most_sdpa_over_the_concatenation():
    """Regression: the explicit path held (B, H, chunk, P + Lk) scores, 1.9-2.8x the peak of SDPA over
    the concatenation in the quick benchmark sweep."""
    from benchmarks.measure import peak_memory_mb
    from benchmarks.providers import concat_sdpa

    B, H, L, P, D = 2, 4, 256, 64, 64
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    prefix_k, prefix_v = torch.randn(P, H, D), torch.randn(P, H, D)
    concat_sdpa(q, k, v, prefix_k, prefix_v)  # builds its lower-right mask object outside the count
    ours = peak_memory_mb(lambda: prefix_attn_func(q, k, v, prefix_k, prefix_v, backend="torch"), "cpu")
    baseline = peak_memory_mb(lambda: concat_sdpa(q, k, v, prefix_k, prefix_v), "cpu")
    assert ours <= baseline, f"torch backend peak {ours:.3f} MiB > SDPA over the concatenation {baseline:.3f} MiB"


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k", [(0, 5, 5), (2, 0, 5), (2, 0, 0)])
def test_empty_calls(batch, seqlen_q, seqlen_k):
    """Regression: the fused CPU kernel dies of SIGFPE at Lq = 0; empty calls keep the explicit path."""
    q = torch.randn(batch, seqlen_q, 2, 16, requires_grad=True)
    k, v = (torch.randn(batch, seqlen_k, 2, 16, requires_grad=True) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(4, 2, 16, requires_grad=True) for _ in range(2))
    out, lse = prefix_attn_func(q, k, v, prefix_k, prefix_v, return_lse=True, backend="torch")
    assert out.shape == q.shape and lse.shape == (batch, 2, seqlen_q)
    out.sum().backward()
    assert torch.equal(prefix_k.grad, torch.zeros_like(prefix_k))


def test_memory_counter_charges_allocations_not_views_of_inputs():
    """Regression: benchmarks.measure's counter charged an input's storage as soon as the call took a view
    of it (k.transpose(1, 2)), so the op (which views q, k and v) was charged 2 * |k| that SDPA over the
    concatenation (which reads k and v in torch.cat) was not."""
    from benchmarks.measure import peak_memory_mb

    x = torch.randn(64, 1024)  # 256 KiB
    assert peak_memory_mb(lambda: x.transpose(0, 1)[1:].unsqueeze(0), "cpu") == 0
    assert peak_memory_mb(lambda: x.add_(1), "cpu") == 0
    assert peak_memory_mb(lambda: x.t().contiguous(), "cpu") == 0.25
    assert peak_memory_mb(lambda: (x + 1).transpose(0, 1), "cpu") == 0.25


@pytest.mark.parametrize("L,P", [(64, 16), (128, 16), (128, 64)])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_memory_is_at_most_sdpa_over_the_concatenation_at_the_quick_sweep_shapes(L, P, mode):
    """The quick sweep's CPU op rows (B 2, H 4, D 64): peak of the op <= peak of SDPA over the concatenation."""
    from benchmarks.measure import peak_memory_mb
    from benchmarks.providers import concat_sdpa

    B, H, D = 2, 4, 64
    q, k, v = (torch.randn(B, L, H, D, requires_grad=True) for _ in range(3))
    prefix_k, prefix_v = (torch.randn(P, H, D, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, L, H, D)

    def run(fn):
        if mode == "fwd":
            with torch.no_grad():
                return fn()
        fn().backward(dout)

    ours = lambda: prefix_attn_func(q, k, v, prefix_k, prefix_v, backend="torch")  # noqa: E731
    baseline = lambda: concat_sdpa(q, k, v, prefix_k, prefix_v)  # noqa: E731
    run(baseline)  # its lower-right mask object is built once, outside the count
    mine, theirs = peak_memory_mb(lambda: run(ours), "cpu"), peak_memory_mb(lambda: run(baseline), "cpu")
    assert mine <= theirs, f"{mode}: torch backend peak {mine:.3f} MiB > SDPA over the concatenation {theirs:.3f} MiB"


def _bank_case_with_every_kind_of_task():
    """A bank of 4 tasks: task 0 with every slot, task 1 with none (prefix_lens 0), task 2 with some, task 3
    unused; row 2 (task 1) has every key masked, so it sees nothing at all."""
    g = torch.Generator().manual_seed(3)
    B, Lq, Lk, H, Hkv, D, T, P = 5, 6, 9, 4, 2, 16, 4, 5
    tensors = {"q": torch.randn(B, Lq, H, D, generator=g), "k": torch.randn(B, Lk, Hkv, D, generator=g),
               "v": torch.randn(B, Lk, Hkv, D, generator=g), "prefix_k": torch.randn(T, P, Hkv, D, generator=g),
               "prefix_v": torch.randn(T, P, Hkv, D, generator=g)}
    tensors = {name: t.requires_grad_(True) for name, t in tensors.items()}
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[2] = False
    mask[3, :4] = False
    kwargs = {"prefix_idx": torch.tensor([0, 2, 1, 2, 0]), "prefix_lens": torch.tensor([P, 0, 3, P]),
              "attention_mask": mask, "causal": True}
    return tensors, kwargs


def test_fused_path_merges_each_task_of_a_bank_over_its_own_rows(monkeypatch):
    """The fused path runs the kernel once on the own keys and once per task with a visible slot (rows of
    that task only, slots up to its prefix_lens) and merges by log-sum-exp; a task without slots adds
    nothing and a row that sees nothing gets zeros and lse -inf."""
    spy = PathSpy(monkeypatch)
    tensors, kwargs = _bank_case_with_every_kind_of_task()
    out, lse, _ = check_against_reference(Case(B=5, Lq=6, Lk=9, H=4, D=16, T=4, P=5), torch.float32, "torch",
                                          tensors_kwargs=(tensors, kwargs))
    assert spy.ran == ["_forward_fused_cpu", "_backward_fused_cpu"]
    assert torch.isneginf(lse[2]).all() and torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_path_in_half_precision(dtype):
    """Half-precision inputs: the kernel computes in them, the merge in fp32."""
    check_against_reference(Case(P=7, B=3, Lq=5, Lk=11, mask="left"), dtype, "torch")


def test_a_mask_of_ones_is_not_applied_on_cpu(monkeypatch):
    """A CPU attention_mask that lets every key through is read on the host and dropped (no masking
    ops, no dispatched read: not a host sync); the result is that of no mask."""
    from prefix_attn import torch_backend
    from prefix_attn.host_syncs import HostSyncCounter

    monkeypatch.setattr(torch_backend, "DECODE_C_MAX_MACS", -1)  # the fused path's masks (C: test_decode_cpu.py)
    masks = []
    real = torch_backend.own_key_mask
    monkeypatch.setattr(torch_backend, "own_key_mask", lambda *a: masks.append(real(*a)) or masks[-1])
    tensors, kwargs = make_inputs(Case(P=4, B=2, Lq=1, Lk=7), torch.float32)
    ones = torch.ones(2, 7, dtype=torch.long)
    with HostSyncCounter() as syncs:
        out = prefix_attn_func(**tensors, **kwargs, attention_mask=ones, backend="torch")
    assert syncs.count == 0 and masks == [(False, None, None)]
    assert torch.equal(out, prefix_attn_func(**tensors, **kwargs, backend="torch"))


def test_under_torch_func_grad():
    """Regression: the host reads of the mask, prefix_idx and prefix_lens (NumPy views of their memory)
    failed on functorch's wrapped tensors under torch.func.grad ("Cannot access data pointer")."""
    tensors, kwargs = _bank_case_with_every_kind_of_task()
    q = tensors.pop("q").detach()

    def loss(q, attention_mask, prefix_idx, prefix_lens):
        return prefix_attn_func(q, **{k: t.detach() for k, t in tensors.items()}, attention_mask=attention_mask,
                                prefix_idx=prefix_idx, prefix_lens=prefix_lens, backend="torch").square().sum()

    mask = kwargs["attention_mask"]
    for attention_mask in (mask, torch.ones_like(mask)):
        args = (attention_mask, kwargs["prefix_idx"], kwargs["prefix_lens"])
        grad = torch.func.grad(loss)(q, *args)
        q_eager = q.clone().requires_grad_(True)
        loss(q_eager, *args).backward()
        torch.testing.assert_close(grad, q_eager.grad)


@pytest.mark.parametrize("case", [Case(P=10, B=3, Lq=1, Lk=12, mask="left"), Case(P=9, B=4, Lq=5, Lk=11),
                                  Case(P=6, B=3, Lq=1, Lk=8, H=4, strided=True),
                                  Case(P=9, T=3, B=4, Lq=1, Lk=7, prefix_lens=True),
                                  Case(P=5, T=2, B=4, Lq=3, Lk=9, mask="holes")], ids=str)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "per-row"])
def test_prefix_part_folded_into_one_batch_of_query_rows_or_per_batch_row(monkeypatch, case, fold):
    """A prefix part runs as one batch of n * Lq query rows against the (1, Hkv, P, D) block (above
    FOLD_MIN_ROWS_X_SLOTS, when q's rows merge into one dimension) or per batch row against a batch-stride-0
    block; both give the reference's output, lse and gradients (decoding and prefill, a bank's task rows,
    prefix_lens, HF's strided views)."""
    from prefix_attn import torch_backend

    monkeypatch.setattr(torch_backend, "FOLD_MIN_ROWS_X_SLOTS", 0 if fold else 2**62)
    monkeypatch.setattr(torch_backend, "DECODE_C_MAX_MACS", -1)  # decoding calls too: the fused path's parts
    batches = []
    real = torch_backend._flash_cpu
    monkeypatch.setattr(torch_backend, "_flash_cpu",
                        lambda q, k, *a: batches.append((q.shape[0], k.shape[0])) or real(q, k, *a))
    check_against_reference(case, torch.float32, "torch")
    prefix_calls = batches[1:]  # the first call is the own keys'
    assert prefix_calls, "no prefix part ran"
    folded = [q_batch == k_batch == 1 for q_batch, k_batch in prefix_calls]
    if not fold or not (case.Lq == 1 or case.T == 0):  # a bank's gathered task rows merge only when Lq == 1
        assert all(q_batch == k_batch for q_batch, k_batch in prefix_calls)
    else:
        assert all(folded)


def test_test_inputs_do_not_depend_on_the_hash_seed():
    """Regression: make_inputs seeded its generator with hash(str(case)), salted per process, so every run drew
    other inputs, and the bank case above with prefix_lens failed when its tasks in use all drew 0 slots."""
    import subprocess
    import sys

    script = ("from tests.helpers import Case, make_inputs; t, kw = make_inputs(Case(P=9, T=3, B=4, Lq=1, Lk=7, "
              "prefix_lens=True)); print(kw['prefix_idx'].tolist(), kw['prefix_lens'].tolist(), float(t['q'].sum()))")
    draws = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout for seed in ("1", "2")}
    assert len(draws) == 1, draws


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folded_prefix_part_in_half_precision(monkeypatch, dtype):
    from prefix_attn import torch_backend

    monkeypatch.setattr(torch_backend, "FOLD_MIN_ROWS_X_SLOTS", 0)
    check_against_reference(Case(P=7, B=3, Lq=1, Lk=11, mask="left"), dtype, "torch")


def test_a_call_without_autograd_that_returns_no_lse_skips_the_merged_lse(monkeypatch):
    """Decoding and evaluation (no autograd node, return_lse=False) skip the merged lse's logaddexp; the
    output is the same bits as with it."""
    from prefix_attn import torch_backend

    monkeypatch.setattr(torch_backend, "DECODE_C_MAX_MACS", -1)  # the fused path's merge (C: test_decode_cpu.py)
    with_lse = []
    real = torch_backend._merge
    monkeypatch.setattr(torch_backend, "_merge",
                        lambda *a, **kw: with_lse.append(kw.get("with_lse", True)) or real(*a, **kw))
    tensors, kwargs = make_inputs(Case(P=4, B=2, Lq=1, Lk=7), torch.float32, requires_grad=False)
    out = prefix_attn_func(**tensors, **kwargs, backend="torch")
    out_with_lse, lse = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="torch")
    assert with_lse == [False, True] and torch.equal(out, out_with_lse) and torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["q", "k", "v", "prefix_k", "prefix_v"])
@pytest.mark.parametrize("case", [Case(P=3, B=2, Lq=5, Lk=5, H=2, D=16), Case(P=3, B=2, Lq=1, Lk=6, H=2, D=16)],
                         ids=["prefill", "decode"])
def test_an_input_whose_head_dim_stride_is_not_1(case, name, backend):
    """Regression: the fused CPU path handed such views to PyTorch's fused CPU kernels, which read head_dim as
    dense and silently computed something else (errors of 1-5 on outputs and gradients); SDPA itself takes its
    math path for them. Now they are read through a copy; the C decoding step leaves them to that path."""
    tensors, kwargs = make_inputs(case, torch.float32)
    view = torch.repeat_interleave(tensors[name].detach(), 2, dim=-1)[..., ::2]  # the same values, stride 2
    tensors[name] = view.requires_grad_(True)
    assert tensors[name].stride(-1) == 2
    check_against_reference(case, torch.float32, backend, tensors_kwargs=(tensors, kwargs))
