"""The host path: the sync counter, the host benchmark (fake Triton driver) and the launch counts."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefix_attn.host_syncs import HostSyncCounter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sync_counter_counts_value_reads():
    x = torch.arange(6)
    with HostSyncCounter() as syncs:
        y = (x * 2).sum()  # no read
    assert syncs.count == 0
    with HostSyncCounter() as syncs:
        int(y)
        bool(x.any())
        y.item()
        float(x.float().mean())
    assert syncs.count == 4
    assert all("test_host_path.py" in s for s in syncs.sources), syncs.sources


def test_sync_counter_ignores_host_to_host_copies():
    with HostSyncCounter() as syncs:
        torch.ones(3).to(torch.float64).cpu().clone()
    assert syncs.count == 0


@pytest.fixture(scope="module")
def host_records(tmp_path_factory):
    """One quick host-benchmark run in its own process: without TRITON_INTERPRET, with the fake
    driver (it compiles the kernels for sm_90, a minute the first time on a 2-core CPU)."""
    out = tmp_path_factory.mktemp("host")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from benchmarks import bench_host; "
            "recs = list(bench_host.run(True, 'cpu', calls=3, repeats=2, points=bench_host.shapes(False))); "
            f"json.dump(recs, open({str(out / 'r.json')!r}, 'w'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(out / "r.json"))


def test_host_benchmark_records(host_records):
    got = {(r["provider"], r["mode"], r["tasks"]) for r in host_records}
    for tasks in (1, 4):
        for provider in ("prefix_attn", "sdpa"):
            for mode in ("fwd", "bwd", "decode"):
                assert (provider, mode, tasks) in got
    for r in host_records:
        assert r["bench"] == "host" and r["host_us"] > 0 and "fake driver" in r["label"]
        assert r["host_us_p20"] <= r["host_us_p80"]


def test_host_benchmark_launch_and_sync_counts(host_records):
    ours = {(r["mode"], r["tasks"]): r for r in host_records if r["provider"] == "prefix_attn"}
    assert ours[("fwd", 1)]["launches"] == 1
    assert ours[("fwd", 4)]["launches"] == 1
    for tasks in (1, 4):
        assert ours[("bwd", tasks)]["launches"] == 2  # preprocess, then sequence and prefix-gradient programs
        assert ours[("decode", tasks)]["launches"] == 1  # prefix, key splits and their merge: one kernel
    for mode in ("fwd", "bwd", "decode"):
        assert ours[(mode, 1)]["syncs"] == 0, mode
        assert ours[(mode, 4)]["syncs"] <= 1, mode  # a bank: prefix_idx is read once, on its first call


def test_direct_launches_match_triton_dispatch():
    """Under the fake driver (real Triton launch path, C launch recorded): the second call of each
    mode, launched directly from the kept compiled kernels, hands the C launcher the same grids and
    arguments as the first call, which went through kernel[grid](...)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.host_launch_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("device_handles") == {"0": [1], "1": [2]}  # each device its own loaded kernel
    assert results.pop("switch_off") == {"same": True, "cached": 0}  # PREFIX_ATTN_DIRECT_LAUNCH=0
    assert set(results) == {"fwd-1", "bwd-1", "decode-1", "fwd-4", "bwd-4", "decode-4"}
    for name, r in results.items():
        assert r["launches"] >= 1 and r["same"], (name, r)
        assert r["cached"] >= r["launches"], (name, r)


# ---- host syncs per step (counted on CPU: every value read a CUDA run would wait for) ----------------

def _tiny_gpt2(n_layer, vocab=100):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab, attn_pdrop=0.1,
                        resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config)


def _padded_batch(batch=4, length=8, vocab=100):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_op_with_a_bank_syncs_at_most_once(backend):
    from prefix_attn import prefix_attn_func

    B, L, H, D, T, P = 3, 20, 2, 16, 3, 5
    q, k, v = (torch.randn(B, L, H, D, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(T, P, H, D, requires_grad=True) for _ in range(2))
    idx = torch.tensor([2, 0, 2])
    with HostSyncCounter() as syncs:
        out = prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, dropout_p=0.1, backend=backend)
        out.sum().backward()
    assert syncs.count <= 1, syncs.sources
    with HostSyncCounter() as syncs:  # the same (unmodified) prefix_idx again: already checked
        prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, backend=backend).sum().backward()
    assert syncs.count == 0, syncs.sources


@pytest.mark.parametrize("n_layer", [2, 4])
def test_native_mixed_task_training_step_syncs_at_most_once(n_layer):
    from prefix_attn import PrefixTuning

    tuned = PrefixTuning(_tiny_gpt2(n_layer), num_virtual_tokens=4, num_tasks=2, projection_dim=16).train()
    ids, mask = _padded_batch()
    for _ in range(2):  # the second step is the steady state
        with HostSyncCounter() as syncs:
            loss = tuned(ids, attention_mask=mask, labels=ids, prefix_idx=torch.tensor([0, 1, 1, 0])).loss
            loss.backward()
        assert syncs.count <= 1, syncs.sources


def test_peft_route_training_step_does_not_sync():
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_attn import apply_prefix_attn_to_peft

    model = get_peft_model(_tiny_gpt2(2), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model = apply_prefix_attn_to_peft(model).train()
    ids, mask = _padded_batch()
    for _ in range(2):
        with HostSyncCounter() as syncs:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        assert syncs.count == 0, syncs.sources


@pytest.mark.parametrize("n_layer", [2, 4])
def test_native_decode_step_syncs_at_most_once(n_layer):
    from prefix_attn import PrefixTuning

    tuned = PrefixTuning(_tiny_gpt2(n_layer), num_virtual_tokens=4, num_tasks=2).eval()
    ids, mask = _padded_batch()
    idx = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out = tuned(ids, attention_mask=mask, prefix_idx=idx, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
        with HostSyncCounter() as syncs:
            tuned(ids[:, -1:], attention_mask=step_mask, prefix_idx=idx, past_key_values=out.past_key_values,
                  use_cache=True)
    assert syncs.count <= 1, syncs.sources


def test_bad_prefix_idx_still_raises_every_call():
    """The once-per-tensor check never lets a bad value through: new tensors and in-place changes
    are checked again."""
    from prefix_attn import prefix_attn_func

    q = k = v = torch.randn(2, 4, 2, 16)
    pk = pv = torch.randn(3, 2, 2, 16)
    idx = torch.tensor([0, 2])
    prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, backend="torch")
    idx[1] = 3  # in place: the version counter moves, the check runs again
    with pytest.raises(ValueError, match="prefix_idx"):
        prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, backend="torch")
    for _ in range(2):
        with pytest.raises(ValueError, match="prefix_idx"):
            prefix_attn_func(q, k, v, pk, pv, prefix_idx=torch.tensor([-1, 0]), backend="torch")


def test_training_forwards_build_no_cache():
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_attn import PrefixTuning, apply_prefix_attn_to_peft

    ids, mask = _padded_batch()
    tuned = PrefixTuning(_tiny_gpt2(2), num_virtual_tokens=4).train()
    peft_model = apply_prefix_attn_to_peft(
        get_peft_model(_tiny_gpt2(2), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))).train()
    for model in (tuned, peft_model):
        assert model(input_ids=ids, attention_mask=mask, labels=ids).past_key_values is None
        assert model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values is not None
        model.eval()
        assert model(input_ids=ids, attention_mask=mask).past_key_values is not None  # eval: as before


def test_per_layer_prefix_is_one_autograd_node():
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_attn import PrefixTuning
    from prefix_attn.integrations.peft import peft_prefix_kv

    for num_tasks in (1, 3):
        prefix = PrefixTuning(_tiny_gpt2(3), num_virtual_tokens=4, num_tasks=num_tasks, projection_dim=8).prefix_kv()
        assert len(prefix) == 3
        assert len({id(t.grad_fn) for kv in prefix for t in kv}) == 1
    peft_model = get_peft_model(_tiny_gpt2(3), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prefix = peft_prefix_kv(peft_model)
    assert len(prefix) == 3 and len({id(t.grad_fn) for kv in prefix for t in kv}) == 1


def test_peft_generate_finds_what_each_step_adds_once_per_call(monkeypatch):
    """The PEFT route's generate() computes the prefix, checks the base model's attention and reads its position
    limit once per call, as the native route does, not in every step (they cost about as much as the step's
    attention calls on the tiny models); prepare_inputs_for_generation outside generate() still finds them per
    call. The tokens are those of a full no-cache recompute."""
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_attn import apply_prefix_attn_to_peft
    from prefix_attn.integrations import peft as peft_route
    from tests.helpers import no_cache_generate

    calls = []
    for name in ("peft_prefix_kv", "check_prefix_attn_selected", "absolute_position_limit"):
        real = getattr(peft_route, name)
        monkeypatch.setattr(peft_route, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    model = apply_prefix_attn_to_peft(
        get_peft_model(_tiny_gpt2(2), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))).eval()
    ids, mask = _padded_batch(batch=3, length=6)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    tokens = model.generate(**kwargs)
    assert sorted(calls) == ["absolute_position_limit", "check_prefix_attn_selected", "peft_prefix_kv"]
    assert torch.equal(tokens, no_cache_generate(model, **kwargs))
    calls.clear()
    model.prepare_inputs_for_generation(ids, attention_mask=mask)
    assert sorted(calls) == ["absolute_position_limit", "check_prefix_attn_selected", "peft_prefix_kv"]


def test_int32_span_check_fast_path_keeps_the_check():
    from prefix_attn.checks import check_row_offsets_fit_int32

    small = torch.empty(2, 8, 2, 16)
    check_row_offsets_fit_int32(q=small, k=small.transpose(1, 2))
    wide = torch.empty_strided((1, 2, 2, 16), (0, 2**31, 16, 1), device="meta")  # no memory behind it
    with pytest.raises(ValueError, match="k spans"):
        check_row_offsets_fit_int32(q=small, k=wide)


def test_calls_are_validated_once_per_signature(monkeypatch):
    """The metadata checks run once per call signature (a model's layers repeat it), and any change
    of shape, stride, dtype, device or scalar option is checked again: the cache never lets a bad
    call through."""
    from prefix_attn import api, prefix_attn_func

    calls = []
    check = api.check_attention_inputs
    monkeypatch.setattr(api, "check_attention_inputs", lambda *a, **kw: calls.append(1) or check(*a, **kw))
    api._VALIDATED.clear()
    q, k, v = (torch.randn(2, 5, 2, 16) for _ in range(3))
    pk, pv = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    for _ in range(3):
        prefix_attn_func(q, k, v, pk, pv, backend="torch")
    assert len(calls) == 1
    prefix_attn_func(q, k, v, pk, pv, backend="torch", dropout_p=0.1)
    prefix_attn_func(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, pk, pv, backend="torch")  # strides
    assert len(calls) == 3
    with pytest.raises(TypeError, match="k has dtype"):
        prefix_attn_func(q, k.double(), v, pk, pv, backend="torch")
    with pytest.raises(ValueError, match="prefix_k has 1 heads"):
        prefix_attn_func(q, k, v, pk[:, :1], pv[:, :1], backend="torch")
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        prefix_attn_func(q, k, v, pk, pv, backend="torch", dropout_p="0.1")
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        prefix_attn_func(q, k.tolist(), v, pk, pv, backend="torch")


def test_an_eager_call_binds_no_signature(monkeypatch):
    """An autograd.Function with a setup_context has its arguments bound through inspect.signature on
    every apply (torch 2.15's C apply does it too: the op's host time per forward doubled, 28 -> 56 us in
    the host benchmark). The eager node fills its context in the forward: no binding, forward or
    backward. (torch.func transforms still take the setup_context node, which they need.)"""
    import inspect

    from prefix_attn import prefix_attn_func

    bound = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **kw: bound.append(a) or signature(*a, **kw))
    q, k, v = (torch.randn(2, 5, 2, 16, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(3, 2, 16, requires_grad=True) for _ in range(2))
    for dropout_p in (0.0, 0.1):
        out = prefix_attn_func(q, k, v, pk, pv, dropout_p=dropout_p, backend="torch")
        out.sum().backward()
    assert bound == []
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, pk, pv))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _layer_calls(monkeypatch) -> list:
    """(attention_mask, names of the dispatched ops) of each call of the integrations' attention entry, as the
    attention function makes them; the list is filled as the model runs."""
    import prefix_attn.integrations.hf_attention as hf_attention

    calls = []
    entry = hf_attention.causal_attention_heads_first

    def counted(q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p):
        with _OpNames() as ops:
            out = entry(q, k, v, prefix_k, prefix_v, prefix_idx, attention_mask, softmax_scale, dropout_p)
        calls.append((attention_mask, ops.names))
        return out

    monkeypatch.setattr(hf_attention, "causal_attention_heads_first", counted)
    return calls


@pytest.mark.parametrize("route", ["c", "fused"])
def test_cpu_decode_layer_call_is_one_c_call_or_two_fused_kernel_calls_and_a_merge(monkeypatch, route):
    """A decode step of the native GPT-2 on CPU with nothing padded: the mask function drops the mask of ones
    once per forward, and each layer call dispatches one op, its output's allocation, around the C decoding step
    (prefix_attn/decode_cpu.c); above its size (forced here), PyTorch's fused CPU kernel twice (own keys, prefix
    slots) and the merge, with views around them: no masking, no dtype conversion, no copy. At these sizes a
    call's host cost is its count of dispatched ops."""
    from prefix_attn import PrefixTuning, decode_cpu, torch_backend

    if route == "fused":
        monkeypatch.setattr(torch_backend, "DECODE_C_MAX_MACS", -1)
    elif decode_cpu.DECODE.get() is None:
        pytest.skip(f"the C decoding step could not be built here: {decode_cpu.DECODE.unavailable}")
    calls = _layer_calls(monkeypatch)
    tuned = PrefixTuning(_tiny_gpt2(2), num_virtual_tokens=4).eval()
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        past = tuned(ids, attention_mask=torch.ones(3, 6, dtype=torch.long), use_cache=True).past_key_values
        for step in range(2):  # the first step's first layer call runs the checks of its new signature
            calls.clear()
            tuned(ids[:, -1:], attention_mask=torch.ones(3, 7 + step, dtype=torch.long), past_key_values=past,
                  use_cache=True)
    assert len(calls) == 2
    merge = {"sub", "sigmoid_", "unsqueeze_", "lerp_", "logaddexp"}
    for mask, names in calls:
        assert mask is None
        if route == "c":
            assert names == ["empty"], names
            continue
        assert names.count("_scaled_dot_product_flash_attention_for_cpu") == 2, names
        assert set(names) <= merge | {"_scaled_dot_product_flash_attention_for_cpu", "transpose", "as_strided"}, names
        # HF's heads-first tensors go to the kernels as they are: one transpose, of the output (13 ops before).
        assert names.count("transpose") == 1 and len(names) <= 9, names


@pytest.mark.parametrize("route", ["c", "fused"])
def test_cpu_padded_decode_layer_calls_derive_the_mask_once_per_forward(monkeypatch, route):
    """A decode step of the native GPT-2 on CPU over a left-padded batch (what batched generate() runs): the first
    layer call of the forward derives the masks from the padding mask; every later one dispatches what a call
    without padding does (the C step's output allocation; forced onto the fused kernel: the two fused-kernel
    calls, the merge, views), no masking op (at 2ed0f77 each layer call derived them again: 13 more ops, 24 in
    all)."""
    from prefix_attn import PrefixTuning, decode_cpu, torch_backend

    if route == "fused":
        monkeypatch.setattr(torch_backend, "DECODE_C_MAX_MACS", -1)
    elif decode_cpu.DECODE.get() is None:
        pytest.skip(f"the C decoding step could not be built here: {decode_cpu.DECODE.unavailable}")
    calls = _layer_calls(monkeypatch)
    tuned = PrefixTuning(_tiny_gpt2(3), num_virtual_tokens=4).eval()
    ids, mask = _padded_batch(batch=3, length=6)
    with torch.no_grad():
        past = tuned(ids, attention_mask=mask, use_cache=True).past_key_values
        for step in range(2):  # the first step's first layer call runs the checks of its new signature
            calls.clear()
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            tuned(ids[:, -1:], attention_mask=mask, past_key_values=past, use_cache=True)
    assert len(calls) == 3 and all(m is calls[0][0] and m is not None for m, _ in calls)
    merge = {"sub", "sigmoid_", "unsqueeze_", "lerp_"}
    for _, names in calls[1:]:
        if route == "c":
            assert names == ["empty"], names
            continue
        assert names.count("_scaled_dot_product_flash_attention_for_cpu") == 2, names
        assert set(names) <= merge | {"_scaled_dot_product_flash_attention_for_cpu", "transpose", "as_strided"}, names
        assert len(names) <= 9, names


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cpu_training_layer_call_reads_the_heads_first_tensors_as_they_are(dropout_p):
    """A training layer call on CPU (GPT-2's fused-projection views, with and without attention dropout): the
    autograd node takes the heads-first q, k, v as they are and gives its gradients in that layout, so neither
    direction transposes them into the op's (B, L, H, D) layout and back, and no autograd node does either
    (at 94da1af: 26 and 34 transposes here, without and with dropout, 61 and 117 ops in all)."""
    from prefix_attn.api import causal_attention_heads_first

    B, L, H, D, P = 2, 8, 2, 16, 4
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, L, 3 * H * D, generator=g, requires_grad=True)
    prefix_k, prefix_v = (torch.randn(P, H, D, generator=g, requires_grad=True) for _ in range(2))

    def layer_call():  # as GPT2Attention splits, views and transposes its projection
        q, k, v = (x.view(B, L, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2))
        return causal_attention_heads_first(q, k, v, prefix_k, prefix_v, None, None, None, dropout_p)

    dout = torch.ones(B, L, H, D)
    layer_call().backward(dout)  # the first call of a signature runs its checks
    with _OpNames() as ops:
        layer_call().backward(dout)
    # The layer's own: 3 transposes and their 3 autograd nodes. The op's: the output's (B, H, Lq, D) -> (B, Lq, H, D)
    # and dout's way back; the fused path's flash backward takes (B, H, L, D) views of out and dout (+2); the
    # dropout path transposes [prefix; keys] for its GEMMs, the prefix blocks and gradients (+12).
    assert ops.names.count("transpose") <= (19 if dropout_p else 11), ops.names
    assert len(ops.names) <= (96 if dropout_p else 46), ops.names
