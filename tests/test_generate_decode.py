"""generate() through both GPT-2 routes with static caches, torch.compile, and the Triton decode kernels.

Oracle of generated tokens: a full recompute without a cache (use_cache=False) every step, through
PEFT's own prefix tuning over eager attention (the prefix concatenated with the keys) for the PEFT
route, and through the concatenation reference (prefix_attn_ref) for the native route; never PEFT's
cached generate, which drifts from its own no-cache output on transformers 5.24. Cached steps are
also compared with transformers' dynamic cache, the Triton kernels with the torch backend, and
compiled steps with eager execution. Generated tokens must be identical. Logits are
compared at 2e-5 relative to the largest value (float32 rounding of a 2-layer model is ~1e-7; any
masking or alignment error, such as one unfilled static-cache slot attended, moves them by 1e-2).

Static caches: transformers hands the attention function the whole (max_cache_len) buffer. A decode
step must see it with a (B, max_cache_len) key mask of constant shape (padding AND slot <= the
query's cache position); a step of several queries attends over the filled slots only (a view),
which needs the fill level on the host and is refused inside torch.compile(fullgraph=True). See
prefix_attn.integrations.gpt2.
"""
import copy

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from transformers import CompileConfig, DynamicCache, GPT2Config, GPT2LMHeadModel, StaticCache

import prefix_attn.integrations.gpt2 as gpt2_integration
from prefix_attn import PrefixTuning, apply_prefix_attn_to_peft, triton_launch
from prefix_attn.integrations.peft import peft_prefix_kv
from tests.conftest import DEVICE
from tests.helpers import VOCAB, OpSpy, make_batch, no_cache_generate

P, T, N_LAYER, HEADS, HEAD_DIM = 5, 3, 2, 2, 16
MAX_NEW = 5
MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sample": dict(do_sample=True, top_k=0, temperature=0.25),  # sharp enough that a changed prefix shows
}


def tiny_base(seed=0):
    config = GPT2Config(n_layer=N_LAYER, n_embd=HEADS * HEAD_DIM, n_head=HEADS, n_positions=64, vocab_size=VOCAB,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=None,
                        pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def peft_pair(projection=False, device="cpu"):
    """(PEFT's own prefix tuning over eager attention, the same model through apply_prefix_attn_to_peft)."""
    peft = pytest.importorskip("peft")
    base = tiny_base()
    torch.manual_seed(1)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24)
    ref = peft.get_peft_model(base, config).to(device)
    return ref, apply_prefix_attn_to_peft(copy.deepcopy(ref))


def native_bank(device="cpu"):
    """PrefixTuning with a bank of T tasks, given clearly non-trivial prefixes."""
    tuned = PrefixTuning(tiny_base().to(device), P, num_tasks=T)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.prefix_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tuned


PREFIX_IDX = torch.tensor([1, 2, 0])


def generate_kwargs(ids, mask, mode, prefix_idx=None, max_new_tokens=MAX_NEW, **extra):
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **MODES[mode], **extra)
    if prefix_idx is not None:
        kwargs["prefix_idx"] = prefix_idx.to(ids.device)
    return kwargs


def generate(model, ids, mask, mode, prefix_idx=None, max_new_tokens=MAX_NEW, **extra):
    """Seeded generate (the seed matters for sampling) through PEFT (prefix_idx None) or PrefixTuning."""
    torch.manual_seed(123)
    return model.generate(**generate_kwargs(ids, mask, mode, prefix_idx, max_new_tokens, **extra))


def truth(model, ids, mask, mode, prefix_idx=None, max_new_tokens=MAX_NEW):
    """The ground truth of generate(): no cache, a full recompute over the concatenation every step."""
    return no_cache_generate(model, **generate_kwargs(ids, mask, mode, prefix_idx, max_new_tokens))


def assert_close(got, ref, tol=2e-5, what="logits"):
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# ---- static caches, torch backend ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("projection", [False, True])
def test_static_cache_peft_route_equals_dynamic_and_peft(projection, mode):
    ref, ours = peft_pair(projection)
    ids, mask = make_batch("left")
    want = truth(ref, ids, mask, mode)
    assert torch.equal(generate(ours, ids, mask, mode), want)
    assert torch.equal(generate(ours, ids, mask, mode, cache_implementation="static"), want)
    if mode == "greedy":  # the prefix matters: without it the model says something else
        with ours.disable_adapter():
            assert not torch.equal(generate(ours, ids, mask, mode, cache_implementation="static"), want)


@pytest.mark.parametrize("mode", list(MODES))
def test_static_cache_native_mixed_tasks_equals_dynamic(mode):
    tuned = native_bank()
    ids, mask = make_batch("left")
    dynamic = generate(tuned, ids, mask, mode, PREFIX_IDX)
    assert torch.equal(dynamic, truth(tuned, ids, mask, mode, PREFIX_IDX))
    assert torch.equal(generate(tuned, ids, mask, mode, PREFIX_IDX, cache_implementation="static"), dynamic)
    # each task's prefix matters
    other = generate(tuned, ids, mask, mode, (PREFIX_IDX + 1) % T, cache_implementation="static")
    assert not torch.equal(other, dynamic)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_static_cache_native_one_task_equals_peft(mode):
    from tests.test_prefix_tuning import peft_twin  # PrefixTuning holding the numbers of a PEFT model

    ref, tuned = peft_twin(projection=True)
    ids, mask = make_batch("left")
    assert torch.equal(generate(tuned, ids, mask, mode, cache_implementation="static"), truth(ref, ids, mask, mode))


def test_static_cache_hands_the_op_the_buffer_with_a_constant_shape_mask(monkeypatch):
    """Prefill: the filled slots (a view of the buffer); decode steps: the whole buffer, a (B, max_cache_len)
    mask = padding AND slot <= the step's position, the same shapes at every step."""
    spy = OpSpy(monkeypatch)
    _, ours = peft_pair()
    ids, mask = make_batch("left")
    B, L = ids.shape
    out = generate(ours, ids, mask, "greedy", cache_implementation="static", return_dict_in_generate=True)
    cache = out.past_key_values
    max_cache_len = cache.layers[0].keys.shape[2]
    assert isinstance(cache, StaticCache) and max_cache_len == L + MAX_NEW - 1
    prefill, steps = spy.calls[:N_LAYER], spy.calls[N_LAYER:]
    assert len(steps) == N_LAYER * (MAX_NEW - 1)
    for layer, call in enumerate(prefill):
        assert call["q"] == call["k"] == (B, L, HEADS, HEAD_DIM) and call["prefix_k"] == (P, HEADS, HEAD_DIM)
        assert call["k_ptr"] == cache.layers[layer].keys.data_ptr()  # a view of the buffer, not a copy
        assert torch.equal(call["mask"], mask.bool())
    for i, call in enumerate(steps):
        step = i // N_LAYER
        assert call["q"] == (B, 1, HEADS, HEAD_DIM) and call["k"] == (B, max_cache_len, HEADS, HEAD_DIM)
        assert call["prefix_k"] == (P, HEADS, HEAD_DIM)
        want = torch.zeros(B, max_cache_len, dtype=torch.bool)
        want[:, :L] = mask.bool()
        want[:, L:L + step + 1] = True  # the generated tokens so far and this step's own slot
        assert torch.equal(call["mask"], want), f"step {step}"


def _step(model, ids, mask, cache, prefix_idx):
    """One forward through a route's own forward (not generate), with the 2-D mask generate would pass."""
    kwargs = dict(attention_mask=mask, past_key_values=cache, use_cache=True)
    if prefix_idx is not None:
        kwargs["prefix_idx"] = prefix_idx
    return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("masks", ["per_step", "whole_cache", "none"])
@pytest.mark.parametrize("route", ["peft", "native"])
def test_static_cache_multi_token_steps_equal_dynamic(route, masks):
    """Prefill, a 3-token (speculative-like) step and 1-token steps through a StaticCache give the logits of a
    DynamicCache: several queries attend over the filled slots with per-query causality, one query over the
    buffer with its unfilled slots masked. Masks: (B, past + L) per step as generate passes them; one
    (B, max_cache_len) mask for every step, 1 on the slots still to be filled (column j = slot j: the unfilled
    slots must be masked by the integration itself); or none (no padding)."""
    model = peft_pair()[1] if route == "peft" else native_bank()
    prefix_idx = PREFIX_IDX if route == "native" else None
    base = model.get_base_model() if route == "peft" else model.model
    ids, mask = make_batch("left", length=12)
    if masks == "none":
        mask = torch.ones_like(mask)
    max_cache_len = 16
    whole = torch.cat([mask, torch.ones_like(mask[:, :max_cache_len - mask.shape[1]])], 1)
    static, dynamic = StaticCache(config=base.config, max_cache_len=max_cache_len), DynamicCache()
    for start, end in [(0, 6), (6, 9), (9, 10), (10, 11)]:
        step_ids, step_mask = ids[:, start:end], mask[:, :end]
        static_mask = {"per_step": step_mask, "whole_cache": whole, "none": None}[masks]
        with torch.no_grad():
            got = _step(model, step_ids, static_mask, static, prefix_idx)
            want = _step(model, step_ids, None if masks == "none" else step_mask, dynamic, prefix_idx)
        valid = mask[:, start:end].bool()
        assert_close(got[valid], want[valid], what=f"logits of tokens {start}..{end - 1}")


def test_static_cache_mask_function_contract():
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    fn = gpt2_integration.prefix_attn_mask
    # decode step over a StaticCache (fill level a 0-d tensor): (B, max_cache_len), padding AND slot <= 4
    got = fn(2, 1, 8, q_offset=torch.tensor(4), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=bool)], 1))
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[:, :4], want[:, 4] = mask, True
    assert torch.equal(got, want)
    assert torch.equal(fn(2, 1, 8, q_offset=torch.tensor(4), attention_mask=got), want)  # idempotent
    assert torch.equal(fn(2, 1, 8, q_offset=torch.tensor(4), attention_mask=None), (torch.arange(8) <= 4).expand(2, 8))
    # several queries: the filled slots only, (B, past + Lq)
    assert torch.equal(fn(2, 2, 8, q_offset=torch.tensor(2), attention_mask=mask), mask)
    assert torch.equal(fn(2, 2, 8, q_offset=torch.tensor(2), attention_mask=want), mask)
    assert torch.equal(fn(2, 3, 8, q_offset=0, attention_mask=None), torch.ones(2, 3, dtype=torch.bool))
    # a fresh StaticCache (fill level still the int 0): a mask over the tokens, or over the whole cache
    assert torch.equal(fn(2, 3, 8, q_offset=0, attention_mask=mask[:, :3]), mask[:, :3])
    assert torch.equal(fn(2, 3, 8, q_offset=0, attention_mask=want), mask[:, :3])
    with pytest.raises(ValueError, match="max_cache_len=8"):
        fn(2, 1, 8, q_offset=torch.tensor(4), attention_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions filled so far"):  # ends between the tokens and the cache's end
        fn(2, 3, 8, q_offset=0, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    # without a static cache: the padding mask as given, None when there is none or a CPU mask pads nothing
    assert torch.equal(fn(2, 1, 4, q_offset=3, attention_mask=mask), mask)
    assert fn(2, 1, 4, q_offset=3, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    ones_on_device = torch.ones(2, 4, dtype=torch.bool, device="meta")  # handed over unread: no host sync
    assert fn(2, 1, 4, q_offset=3, attention_mask=ones_on_device).shape == (2, 4)
    assert fn(2, 4, 4, q_offset=0, attention_mask=None) is None


def test_static_cache_positions_must_fit_the_position_table():
    """P + max_cache_len may exceed n_positions as long as the sequence itself fits (the fill level is then read
    from the device); a sequence that outgrows the table raises as with a dynamic cache."""
    _, ours = peft_pair()
    ids, mask = make_batch("left")
    config = ours.get_base_model().config
    big = StaticCache(config=config, max_cache_len=config.n_positions)  # P + 64 > 64 positions
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, past_key_values=big, do_sample=False)
    assert torch.equal(out, ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
    with pytest.raises(ValueError, match="n_positions=64"):
        # the last forward feeds token L + new - 2 at position P + L + new - 2 = 64: one past the table
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64 - P - ids.shape[1] + 2, do_sample=False,
                      cache_implementation="static")


class _DeviceOnly(torch.Tensor):
    """A fill level that fails when read on the host (a synchronisation on a GPU)."""

    def _read(self, *args):
        raise AssertionError("the fill level was read on the host")

    __int__ = __index__ = __bool__ = item = tolist = _read


def test_static_cache_positions_stay_on_the_device():
    """The routes' positions and length check do not read a StaticCache's fill level on the host (one
    synchronisation per decode step), unless max_cache_len could outgrow the position table."""
    from prefix_attn.integrations._routing import shifted_position_ids

    base = tiny_base()
    cache = StaticCache(config=base.config, max_cache_len=16)
    base(input_ids=torch.ones(2, 9, dtype=torch.long), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.cumulative_length = layer.cumulative_length.as_subclass(_DeviceOnly)
    positions = shifted_position_ids(P, 64, 1, cache, None, torch.device("cpu"))
    assert torch.equal(positions.as_subclass(torch.Tensor), torch.tensor([[P + 9]]))
    given = torch.tensor([[7], [8]])
    assert torch.equal(shifted_position_ids(P, 64, 1, cache, given, torch.device("cpu")), given + P)
    with pytest.raises(AssertionError, match="read on the host"):  # P + 16 > 20: only then is it read
        shifted_position_ids(P, 20, 1, cache, given, torch.device("cpu"))


# ---- torch.compile of a static-cache decode step (CPU, torch backend) ---------------------------------


class GraphRecorder:
    """A torch.compile backend: aot_eager, recording each graph it is given and how often graphs run."""

    def __init__(self):
        self.graphs, self.runs = [], 0
        self._aot_eager = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        compiled = self._aot_eager(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run

    def __deepcopy__(self, memo):
        return self  # CompileConfig.to_dict() deep-copies its backend: keep recording into this one

    def op_calls(self):
        return [str(node.target) for gm in self.graphs for node in gm.graph.nodes
                if node.op == "call_function" and "prefix_attn" in str(node.target)]


def _prefilled(route, device="cpu"):
    """(base GPT-2, greedy next token, mask, StaticCache after an eager prefill, prefix kwargs for the base model)."""
    model = peft_pair(device=device)[1] if route == "peft" else native_bank(device)
    base = model.get_base_model() if route == "peft" else model.model
    ids, mask = make_batch("left", device=device)
    cache = StaticCache(config=base.config, max_cache_len=16)
    prefix_idx = PREFIX_IDX.to(device) if route == "native" else None
    with torch.no_grad():
        logits = _step(model, ids, mask, cache, prefix_idx)
        prefix_kv = model.prefix_kv() if route == "native" else peft_prefix_kv(model)
    kwargs = {"prefix_kv": prefix_kv}
    if prefix_idx is not None:
        kwargs["prefix_idx"] = prefix_idx
    return base, logits[:, -1:].argmax(-1), mask, cache, kwargs


def _decode_inputs(token, mask, past, max_cache_len, kwargs):
    """The inputs generate() gives the compiled forward for one decode step: the new token, the
    (B, max_cache_len) mask, positions shifted by P."""
    B = token.shape[0]
    full = torch.zeros(B, max_cache_len, dtype=torch.bool)
    full[:, :past + 1] = torch.cat([mask.bool(), torch.ones(B, past + 1 - mask.shape[1], dtype=torch.bool)], 1)
    position_ids = full.long().cumsum(-1)[:, past:past + 1] - 1 + P
    return dict(input_ids=token, attention_mask=full, position_ids=position_ids, use_cache=True, **kwargs)


@pytest.mark.parametrize("route", ["peft", "native"])
def test_static_cache_decode_step_compiles_fullgraph(route):
    """Two decode steps of the base GPT-2 (what generate compiles) under torch.compile(fullgraph=True,
    backend=aot_eager): one graph holding the fused op once per layer, reused by the second step (static
    shapes), and the logits and cache contents of eager execution."""
    torch._dynamo.reset()
    base, token, mask, cache, kwargs = _prefilled(route)
    eager_cache = copy.deepcopy(cache)
    recorder = GraphRecorder()
    compiled = torch.compile(base, fullgraph=True, backend=recorder)
    past = mask.shape[1]
    for step in range(2):
        inputs = _decode_inputs(token, mask, past + step, 16, kwargs)
        with torch.no_grad():
            got = compiled(past_key_values=cache, **inputs).logits
            want = base(past_key_values=eager_cache, **inputs).logits
        assert_close(got, want, tol=1e-6, what=f"step {step} logits")
        for layer, eager_layer in zip(cache.layers, eager_cache.layers):
            assert_close(layer.keys, eager_layer.keys, tol=1e-6, what="cached keys")
        token = want[:, -1:].argmax(-1)
    assert len(recorder.graphs) == 1 and recorder.runs == 2
    assert recorder.op_calls() == ["prefix_attn.attention.default"] * N_LAYER


@pytest.mark.parametrize("route", ["peft", "native"])
def test_generate_compiles_the_decode_steps_fullgraph(route):
    """generate(cache_implementation="static") with transformers' auto-compile (forced on CPU) and fullgraph=True
    compiles every decode step into one graph and gives the tokens of the uncompiled dynamic-cache run."""
    torch._dynamo.reset()
    model = peft_pair()[1] if route == "peft" else native_bank()
    prefix_idx = PREFIX_IDX if route == "native" else None
    ids, mask = make_batch("left")
    want = generate(model, ids, mask, "greedy", prefix_idx)
    recorder = GraphRecorder()
    compile_config = CompileConfig(fullgraph=True, backend=recorder, mode=None)
    compile_config._compile_all_devices = True  # transformers' switch to auto-compile on CPU
    got = generate(model, ids, mask, "greedy", prefix_idx, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(got, want)
    assert len(recorder.graphs) == 1 and recorder.runs == MAX_NEW - 1  # the prefill runs eagerly
    assert recorder.op_calls() == ["prefix_attn.attention.default"] * N_LAYER


def _multi_token_step(device="cpu"):
    """(base GPT-2, inputs of a 2-token step over a StaticCache after an eager prefill, native route)."""
    base, token, mask, cache, kwargs = _prefilled("native", device)
    past = mask.shape[1]
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :2])], 1)
    inputs = dict(input_ids=torch.cat([token, token], 1), attention_mask=step_mask, past_key_values=cache,
                  use_cache=True, position_ids=torch.arange(past, past + 2, device=device)[None] + P, **kwargs)
    return base, inputs


def test_multi_token_static_step_is_refused_under_fullgraph_compile():
    """Several queries over a StaticCache need the fill level on the host: fullgraph compilation fails, naming
    the integration's ValueError (dynamo wraps it in its own exception, whose class varies by release)."""
    torch._dynamo.reset()
    base, inputs = _multi_token_step()
    with pytest.raises(Exception) as info:  # noqa: PT011
        torch.compile(base, fullgraph=True, backend="aot_eager")(**inputs)
    text = f"{info.value} {info.value.__cause__!r}"
    assert "ValueError" in text and "cannot be compiled" in text, text


def _compiled_multi_token_step_equals_eager(device="cpu"):
    torch._dynamo.reset()
    base, inputs = _multi_token_step(device)
    eager_inputs = {**inputs, "past_key_values": copy.deepcopy(inputs["past_key_values"])}
    with torch.no_grad():
        got = torch.compile(base, backend="aot_eager")(**inputs).logits
        want = base(**eager_inputs).logits
    assert_close(got, want, tol=1e-6)


def test_multi_token_static_step_without_fullgraph_runs_the_mask_eagerly(monkeypatch):
    """Without fullgraph dynamo breaks the graph at the mask function and runs it eagerly: same logits as eager
    (Triton kernels: the interpreter on CPU, CUDA when there is a GPU; for the torch backend see the next test)."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    _compiled_multi_token_step_equals_eager(DEVICE)


def test_multi_token_static_step_without_fullgraph_torch_backend(monkeypatch):
    """Regression: the torch backend returned out as a transposed view while the custom op's fake promised a
    contiguous tensor, so GPT2Attention's reshape compiled to a view that failed at run time."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")
    _compiled_multi_token_step_equals_eager()


# ---- the Triton decode kernels through generate (the interpreter on CPU) ------------------------------


class DecodeSpy:
    """Records each call of triton_launch.decode_forward (the decode path of the op)."""

    def __init__(self, monkeypatch):
        self.calls = []
        self._real = triton_launch.decode_forward
        monkeypatch.setattr(triton_launch, "decode_forward", self)

    def __call__(self, q, k, v, prefix_k, prefix_v, prefix_idx, *args, **kwargs):
        self.calls.append({"q": tuple(q.shape), "k": tuple(k.shape),
                           "prefix_k": None if prefix_k is None else tuple(prefix_k.shape),
                           "prefix_v": None if prefix_v is None else tuple(prefix_v.shape),
                           "prefix_idx": None if prefix_idx is None else prefix_idx.tolist()})
        return self._real(q, k, v, prefix_k, prefix_v, prefix_idx, *args, **kwargs)


TRITON_CASES = [
    ("peft", "greedy", {}), ("peft", "beam", {}), ("peft", "sample", {}),
    ("native", "greedy", {}), ("native", "beam", {}), ("native", "sample", {}),
    ("peft", "greedy", {"cache_implementation": "static"}), ("native", "beam", {"cache_implementation": "static"}),
]


@pytest.mark.parametrize("route,mode,extra", TRITON_CASES,
                         ids=[f"{r}-{m}{'-static' if e else ''}" for r, m, e in TRITON_CASES])
def test_triton_decode_kernels_through_generate(monkeypatch, route, mode, extra):
    """Left-padded batch: the tokens of the torch backend and (PEFT route) of PEFT's own path; every decode
    step of every layer runs triton_launch.decode_forward with the prefix unexpanded: (P, H, D) or the
    (T, P, H, D) bank with prefix_idx repeated by generate per beam, never the prefix itself."""
    if route == "peft":
        ref, model = peft_pair(device=DEVICE)
        prefix_idx = None
    else:
        model, ref, prefix_idx = native_bank(DEVICE), None, PREFIX_IDX
    ids, mask = make_batch("left", device=DEVICE)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")
    with_torch = generate(model, ids, mask, mode, prefix_idx, **extra)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    spy = DecodeSpy(monkeypatch)
    with_triton = generate(model, ids, mask, mode, prefix_idx, **extra)
    assert torch.equal(with_triton, with_torch)
    assert torch.equal(with_triton, truth(ref if ref is not None else model, ids, mask, mode, prefix_idx))
    rows = ids.shape[0] * (3 if mode == "beam" else 1)
    steps = [call for call in spy.calls if call["q"][1] == 1]
    assert len(steps) == N_LAYER * (MAX_NEW - 1)  # every decode step of every layer took the decode path
    shape = (P, HEADS, HEAD_DIM) if route == "peft" else (T, P, HEADS, HEAD_DIM)
    want_idx = None if prefix_idx is None else PREFIX_IDX.repeat_interleave(rows // ids.shape[0]).tolist()
    for call in spy.calls:
        assert call["q"][0] == rows
        assert call["prefix_k"] == call["prefix_v"] == shape  # never expanded over sequences or beams
        assert call["prefix_idx"] == want_idx
    if extra:
        assert {call["k"][1] for call in steps} == {ids.shape[1] + MAX_NEW - 1}  # the whole static buffer


class PlanSpy:
    """Records (queries per sequence, prefix splits, key splits) of every decode call and counts the
    decode kernel's launches."""

    def __init__(self, monkeypatch):
        self.splits, self.launches = [], 0
        real_plan, real_launcher = triton_launch._decode_plan, triton_launch.launcher

        def plan(*args):
            found = real_plan(*args)
            self.splits.append((args[1], found.n_psplits, found.n_ssplits))  # args[1]: queries per sequence
            return found

        def launcher(kernel):
            self.launches += kernel is triton_launch.decode_kernel
            return real_launcher(kernel)

        monkeypatch.setattr(triton_launch, "_decode_plan", plan)
        monkeypatch.setattr(triton_launch, "launcher", launcher)


@pytest.mark.parametrize("prompt_length,several", [(9, False), (40, True)], ids=["one-split", "several-splits"])
def test_triton_decode_splits_through_generate(monkeypatch, prompt_length, several):
    """generate() over a bank with each decode step in one launch: with a 9-token prompt every part
    (prefix, cache) is one split, so the launch merges two parts; with a 40-token prompt each cache
    is cut into several key splits (the interpreter's 16-key splits) merged by the last arrival.
    Tokens equal the no-cache recompute over the concatenation, and the torch backend's."""
    model = native_bank(DEVICE)
    ids, mask = make_batch("left", length=prompt_length, device=DEVICE)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")
    with_torch = generate(model, ids, mask, "greedy", PREFIX_IDX)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    spy = PlanSpy(monkeypatch)
    with_triton = generate(model, ids, mask, "greedy", PREFIX_IDX)
    assert torch.equal(with_triton, with_torch)
    assert torch.equal(with_triton, truth(model, ids, mask, "greedy", PREFIX_IDX))
    assert len(spy.splits) == spy.launches  # one launch per call (a 9-token prefill takes the decode path too)
    steps = [(prefix, keys) for queries, prefix, keys in spy.splits if queries == 1]
    assert len(steps) == N_LAYER * (MAX_NEW - 1)
    if several:
        assert all(prefix == 1 and keys >= 2 for prefix, keys in steps), steps
    else:
        assert set(steps) == {(1, 1)}, steps
