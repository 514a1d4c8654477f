"""The decode path (a few queries per sequence): prefix read once per tile of stacked rows,
split-KV over each cache, log-sum-exp merge by the last program of each tile, all in one launch.
Against the float64 reference and the main kernel."""
import contextlib
import random

import pytest
import torch

from prefix_attn import prefix_attn_func, triton_launch
from prefix_attn.checks import check_attention_inputs
from tests.conftest import DEVICE
from tests.helpers import Case, check_against_reference, make_inputs

DECODE_CASES = [
    Case(B=3, Lq=1, Lk=40, P=10),                                           # one token, shared prefix
    Case(B=5, Lq=2, Lk=70, P=37, T=3, prefix_lens=True, mask="left"),      # bank, lens, left padding
    Case(B=4, Lq=4, Lk=33, P=0, mask="left"),                               # no prefix, speculative 4
    Case(B=16, Lq=1, Lk=20, P=50, T=2, mask="right"),                       # 16 sequences, 2 tasks
    Case(B=2, Lq=3, Lk=3, P=5, mask="empty_row"),                           # cache = queries, empty row
    Case(B=2, Lq=1, Lk=90, P=20, D=80, H=1, causal=False, mask="holes"),    # head dim 80, non-causal
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_against_reference(case):
    check_against_reference(case, torch.float32, "triton")


@pytest.mark.parametrize("case", DECODE_CASES[:2], ids=str)
def test_decode_fp16(case):
    check_against_reference(case, torch.float16, "triton")


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_path_equals_main_kernel(case, monkeypatch):
    tensors, kwargs = make_inputs(case, requires_grad=False)
    decode = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="triton")
    monkeypatch.setattr(triton_launch, "DECODE_MAX_QUERIES", 0)
    main = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="triton")
    torch.testing.assert_close(decode[0], main[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode[1], main[1], atol=1e-5, rtol=1e-5)


def test_decode_path_is_taken(monkeypatch):
    calls = []
    real = triton_launch.decode_forward
    monkeypatch.setattr(triton_launch, "decode_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    tensors, kwargs = make_inputs(Case(B=2, Lq=1, Lk=30, P=8), requires_grad=False)
    prefix_attn_func(**tensors, **kwargs, backend="triton")
    assert calls
    calls.clear()
    prefix_attn_func(**tensors, **kwargs, backend="triton", dropout_p=0.1)  # dropout: main kernel
    assert not calls


def test_prefix_tiles_stack_sequences_of_one_task():
    """B = 64 one-token rows of 2 tasks: one tile per task (BLOCK_R rows), not one per sequence."""
    B, T = 64, 2
    q = torch.zeros(B, 1, 1, 16, device=DEVICE)
    k = torch.zeros(B, 4, 1, 16, device=DEVICE)
    pk = torch.zeros(T, 8, 1, 16, device=DEVICE)
    idx = torch.arange(B, device=DEVICE) % T
    dims = check_attention_inputs(q, k, k, pk, pk, idx)
    n_tiles, tables = triton_launch._task_pieces(dims, idx, q.device, 1, 32)
    row_order, task_row_start, task_piece_start, piece_task = tables
    assert task_piece_start.tolist() == [0, 1, 2]  # 32 rows of each task: one tile each
    assert piece_task[:2].tolist() == [0, 1] and (piece_task[2:] == -1).all() and n_tiles >= 2
    assert (idx[row_order[:32]] == 0).all() and (idx[row_order[32:]] == 1).all()


def _plan(case):
    """The decode plan (splits per part) the launcher makes for a case."""
    tensors, kwargs = make_inputs(case, requires_grad=False)
    q, k = tensors["q"], tensors["k"]
    mask = kwargs.get("attention_mask")
    return triton_launch._decode_plan(
        case.B, case.Lq, case.H, case.H, case.D, case.Lk, case.P, case.T, bool(case.T), case.prefix_lens, mask is not None,
        case.causal, triton_launch._dot_precision(q.dtype), triton_launch.num_sms(q.device),
        triton_launch.DECODE_BLOCK_R, triton_launch.DECODE_BLOCK_N, triton_launch.DECODE_MIN_SPLIT,
        triton_launch.DECODE_WAVES)


def _splits(plan):
    """(prefix splits, key splits) of a plan."""
    return plan.n_psplits, plan.n_ssplits


# (case, prefix splits, key splits) under the interpreter's constants (2 SMs, 16-key blocks and splits).
SPLIT_CASES = [
    (Case(B=8, Lq=1, Lk=30, H=1, P=12), 1, 1),                                 # one split per part: 2 parts
    (Case(B=4, Lq=1, Lk=30, H=2, P=12, mask="left"), 1, 1),                     # same, with padding
    (Case(B=1, Lq=2, Lk=70, H=1, P=60, T=2, prefix_lens=True), 4, 5),           # several per part, bank, lens
    (Case(B=3, Lq=1, Lk=80, H=1, P=40, mask="holes"), 3, 3),                    # several per part, shared
    (Case(B=9, Lq=1, Lk=20, H=1, P=10, T=2, prefix_lens=True, mask="left"), 1, 1),  # one per part, bank
    (Case(B=7, Lq=3, Lk=40, H=1, P=33, T=3), 2, 2),                             # 5 sequences per tile, 3 tasks
    (Case(B=2, Lq=5, Lk=40, H=1, P=0, mask="right"), 0, 3),                     # no prefix, several key splits
    (Case(B=4, Lq=2, Lk=20, H=2, P=0), 0, 1),                                   # no prefix, one part: no merge
]


@pytest.mark.parametrize("case,prefix_splits,key_splits", SPLIT_CASES, ids=[str(c[0]) for c in SPLIT_CASES])
def test_decode_splits_against_reference(case, prefix_splits, key_splits):
    """Both regimes: one split per part (the single launch merges two parts) and several splits per
    part (prefix splits and key splits merged by the last arrival), against the float64 reference."""
    assert _splits(_plan(case)) == (prefix_splits, key_splits)
    check_against_reference(case, torch.float32, "triton")


@contextlib.contextmanager
def programs_in_order(order):
    """Run the interpreter's programs in another order: ``order(n)`` is a permutation of range(n),
    applied to the flattened grid (every program still runs once). On a GPU any program may finish
    last; in the interpreter it is always the highest program id, unless reordered here."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx
    orders = {}

    def set_grid_idx(x, y, z):
        nx, ny, nz = builder.grid_dim
        n = nx * ny * nz
        perm = orders.setdefault((nx, ny, nz), order(n))
        flat = perm[(x * ny + y) * nz + z]
        real(flat // (ny * nz), flat // nz % ny, flat % nz)

    builder.set_grid_idx = set_grid_idx
    try:
        yield
    finally:
        del builder.set_grid_idx


def _reversed(n):
    return list(range(n))[::-1]


def _shuffled(n):
    perm = list(range(n))
    random.Random(n).shuffle(perm)
    return perm


@pytest.mark.parametrize("case", [SPLIT_CASES[0][0], SPLIT_CASES[2][0], SPLIT_CASES[4][0], SPLIT_CASES[6][0]],
                         ids=str)
def test_decode_result_does_not_depend_on_which_program_finishes_last(case):
    """The last program to arrive at a tile merges it, reading the parts in a fixed order: the
    same bits whichever program that is (in order: a key-split program; reversed: a prefix program)."""
    tensors, kwargs = make_inputs(case, requires_grad=False)
    with torch.no_grad():
        want = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="triton")
        for order in (_reversed, _shuffled):
            with programs_in_order(order):
                got = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="triton")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), order.__name__
    check_against_reference(case, torch.float32, "triton")


def test_decode_is_one_launch_and_leaves_its_counters_zero(monkeypatch):
    """One launch per call, one or several splits per part; the arrival counters it keeps per
    stream are all zero again after each call (the last arrival resets them), so no memset is needed."""
    launches = []
    real = triton_launch.launcher
    monkeypatch.setattr(triton_launch, "launcher", lambda kernel: launches.append(kernel) or real(kernel))
    for case, _, _ in SPLIT_CASES:
        tensors, kwargs = make_inputs(case, requires_grad=False)
        launches.clear()
        with torch.no_grad():
            prefix_attn_func(**tensors, **kwargs, backend="triton")
        assert launches == [triton_launch.decode_kernel], case
        assert all((counters == 0).all() for counters in triton_launch._ARRIVALS.values()), case
    assert triton_launch._ARRIVALS  # the cases with several parts used the kept counters


def test_decode_drops_its_counters_after_a_failed_launch(monkeypatch):
    """Regression guard: a launch that fails part-way (here: after the first program) leaves some
    counters set; they are dropped, not handed to the next call, which is then still right."""
    case = SPLIT_CASES[2][0]
    tensors, kwargs = make_inputs(case, requires_grad=False)
    with torch.no_grad():
        want = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="triton")
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real, seen = builder.set_grid_idx, []

    def fail_on_second_program(x, y, z):
        seen.append((x, y, z))
        if len(seen) == 3:
            raise RuntimeError("injected failure")
        real(x, y, z)

    monkeypatch.setattr(builder, "set_grid_idx", fail_on_second_program, raising=False)
    with pytest.raises(Exception, match="injected failure"), torch.no_grad():
        prefix_attn_func(**tensors, **kwargs, backend="triton")
    monkeypatch.undo()
    assert all((counters == 0).all() for counters in triton_launch._ARRIVALS.values())
    with torch.no_grad():
        got = prefix_attn_func(**tensors, **kwargs, return_lse=True, backend="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- grouped KV heads (k, v and the prefix have Hkv heads; query head h reads KV head h // (H // Hkv)) ----

def _grouped_inputs(case, kv_heads, dtype=torch.float32, contiguous=True):
    """The case's inputs with k, v and the prefix cut to their first kv_heads heads."""
    tensors, kwargs = make_inputs(case, dtype, requires_grad=False)
    for name in ("k", "v", "prefix_k", "prefix_v"):
        if name in tensors:
            cut = tensors[name][..., :kv_heads, :]
            tensors[name] = cut.contiguous() if contiguous else cut  # a view: strides of H heads
    return tensors, kwargs


def _check_grouped(case, kv_heads, dtype=torch.float32, contiguous=True):
    """out and lse of the Triton decode path (through its launcher) vs the float64 reference,
    FlashAttention's oracle."""
    from prefix_attn.reference import prefix_attn_ref
    from tests.helpers import ATOL, max_err

    tensors, kwargs = _grouped_inputs(case, kv_heads, dtype, contiguous)
    t = dict(tensors)
    q, k, v = t.pop("q"), t.pop("k"), t.pop("v")
    got = triton_launch.prefix_attn_fwd(q, k, v, t.get("prefix_k"), t.get("prefix_v"), **kwargs)
    ref = prefix_attn_ref(**{n: x.double() for n, x in tensors.items()}, **kwargs, return_lse=True)
    low = prefix_attn_ref(**tensors, **kwargs, return_lse=True)
    for name, g, r, lo in zip(("out", "lse"), got, ref, low):
        assert g.shape == r.shape and not torch.isnan(g).any(), name
        err, low_err = max_err(g, r), max_err(lo, r)
        bound = 2 * low_err + ATOL[dtype] * max(1.0, r[torch.isfinite(r)].abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {low_err:.3g})"
    return got


# (case, KV heads): Hkv = 1 (every query head of one group) and Hkv = H / 2; a shared prefix and a
# bank with prefix_lens; masks; one split per part and several; Lq * group rows that fill a tile
# (Lq 4, group 4: 16 rows) and that do not (Lq 5, group 4: chunks of 2 heads; Lq 9, group 2: 1 head).
GROUPED_CASES = [
    (Case(B=3, Lq=1, Lk=40, H=4, P=10), 1),
    (Case(B=5, Lq=2, Lk=70, H=4, P=37, T=3, prefix_lens=True, mask="left"), 2),
    (Case(B=4, Lq=4, Lk=33, H=4, P=0, mask="left"), 1),
    (Case(B=2, Lq=5, Lk=80, H=4, P=40, mask="holes"), 1),
    (Case(B=9, Lq=1, Lk=20, H=2, P=10, T=2, prefix_lens=True, mask="right"), 1),
    (Case(B=2, Lq=9, Lk=60, H=2, P=20, T=2, causal=False), 1),
    (Case(B=2, Lq=3, Lk=3, H=6, P=5, mask="empty_row"), 3),
    (Case(B=2, Lq=1, Lk=90, H=2, D=80, P=20), 1),
]


@pytest.mark.parametrize("case,kv_heads", GROUPED_CASES, ids=[f"{c}-Hkv{h}" for c, h in GROUPED_CASES])
def test_decode_grouped_heads_against_reference(case, kv_heads):
    _check_grouped(case, kv_heads)


def test_decode_grouped_heads_cover_both_split_regimes_and_chunks():
    """The grouped cases above reach one split per part, several, and groups cut into chunks."""
    plans = [_grouped_plan(case, kv_heads) for case, kv_heads in GROUPED_CASES]
    splits = {(p.n_psplits > 1 or p.n_ssplits > 1) for p in plans if p.n_psplits}
    assert splits == {False, True}
    assert {p.heads_per_chunk < case.H // kv_heads for p, (case, kv_heads) in zip(plans, GROUPED_CASES)} == {False, True}


def _grouped_plan(case, kv_heads):
    q = torch.empty(case.B, case.Lq, case.H, case.D)
    return triton_launch._decode_plan(
        case.B, case.Lq, case.H, kv_heads, case.D, case.Lk, case.P, case.T, bool(case.T), case.prefix_lens,
        case.mask is not None, case.causal, triton_launch._dot_precision(q.dtype), triton_launch.num_sms(q.device),
        triton_launch.DECODE_BLOCK_R, triton_launch.DECODE_BLOCK_N, triton_launch.DECODE_MIN_SPLIT,
        triton_launch.DECODE_WAVES)


def test_decode_grouped_heads_fp16_and_strided_views():
    _check_grouped(GROUPED_CASES[1][0], 2, torch.float16)
    _check_grouped(GROUPED_CASES[3][0], 1, contiguous=False)


def test_decode_grouped_heads_equal_expanded_heads():
    """Grouped heads give the bits of the same call with each KV head repeated for its query heads."""
    case, kv_heads = GROUPED_CASES[1]
    tensors, kwargs = _grouped_inputs(case, kv_heads)
    t = dict(tensors)
    q, k, v, pk, pv = t.pop("q"), t.pop("k"), t.pop("v"), t.pop("prefix_k"), t.pop("prefix_v")
    group = case.H // kv_heads
    grouped = triton_launch.prefix_attn_fwd(q, k, v, pk, pv, **kwargs)
    expanded = triton_launch.prefix_attn_fwd(q, *(x.repeat_interleave(group, dim=-2) for x in (k, v, pk, pv)),
                                             **kwargs)
    torch.testing.assert_close(grouped[0], expanded[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grouped[1], expanded[1], atol=1e-6, rtol=1e-6)


def test_decode_grouped_heads_read_each_kv_head_once_per_group(monkeypatch):
    """Axis 1 of the grid runs over KV heads (times chunks), not query heads: with Lq * group rows
    fitting a tile, each KV head's prefix and cache are read by one program per tile or sequence."""
    case, kv_heads = GROUPED_CASES[0]  # H 4, Hkv 1, Lq 1: the 4 query heads in one chunk
    plan = _grouped_plan(case, kv_heads)
    assert plan.heads_per_chunk == 4 and plan.grid[1] == 1
    launches = []
    real = triton_launch.launcher

    def spy(kernel):
        found = real(kernel)
        return lambda grid, args, constexprs: launches.append(grid) or found(grid, args, constexprs)

    monkeypatch.setattr(triton_launch, "launcher", spy)
    _check_grouped(case, kv_heads)
    assert launches == [plan.grid]


def test_decode_gradients(monkeypatch):
    """Small-Lq training calls take the decode forward; its out and lse feed the main backward."""
    check_against_reference(Case(B=3, Lq=2, Lk=25, P=12, T=2, mask="left"), torch.float32, "triton", with_dlse=True)


def _static_cache_step(q, k_new, v_new, k_cache, v_cache, filled, step, pk, pv, backend):
    """One decode step with a preallocated cache: write the new token's K/V at position ``step``
    and attend over the filled slots (the unfilled tail is masked)."""
    k_cache[:, step] = k_new[:, 0]
    v_cache[:, step] = v_new[:, 0]
    mask = filled | (torch.arange(k_cache.shape[1], device=q.device) == step)[None, :]
    # Queries sit at the end of the cache: attend over all slots with the mask, non-causal.
    return prefix_attn_func(q, k_cache, v_cache, pk, pv, attention_mask=mask, causal=False, backend=backend), mask


def test_static_cache_step_compiles_fullgraph_cpu():
    """A decode step over a static cache compiles with fullgraph=True (torch backend on CPU)."""
    torch._dynamo.reset()
    B, H, D, L, P = 2, 2, 16, 12, 5
    q, k_new, v_new = (torch.randn(B, 1, H, D) for _ in range(3))
    pk, pv = torch.randn(P, H, D), torch.randn(P, H, D)
    filled = torch.zeros(B, L, dtype=torch.bool)
    filled[:, :4] = True

    def step(q, k_new, v_new, k_cache, v_cache, filled, pk, pv):
        return _static_cache_step(q, k_new, v_new, k_cache, v_cache, filled, 4, pk, pv, "torch")

    caches = [torch.randn(B, L, H, D), torch.randn(B, L, H, D)]
    eager_caches = [c.clone() for c in caches]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (out_c, _), (out_e, _) = (compiled(q, k_new, v_new, *caches, filled, pk, pv),
                              step(q, k_new, v_new, *eager_caches, filled, pk, pv))
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(caches[0], eager_caches[0])


@pytest.mark.gpu
def test_decode_step_cuda_graph():
    """The decode path captures in a CUDA graph (no host sync) and replays with new inputs."""
    B, H, D, L, P, T = 8, 4, 64, 256, 32, 2
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, 1, H, D, device=dev, dtype=dt)
    k, v = (torch.randn(B, L, H, D, device=dev, dtype=dt) for _ in range(2))
    pk, pv = (torch.randn(T, P, H, D, device=dev, dtype=dt) for _ in range(2))
    idx = torch.arange(B, device=dev) % T
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    run = lambda: prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, attention_mask=mask)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up: compiles and checks prefix_idx outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    q.copy_(torch.randn_like(q))
    mask[:, :100] = False
    graph.replay()
    torch.testing.assert_close(static_out, run(), atol=0, rtol=0)
