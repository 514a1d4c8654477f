"""apply_prefix_attn_to_peft: equal to PEFT's own prefix tuning, without expanding the prefix.

Two kinds of parity:
- routing, exact: the op swapped for the float64 reference (prefix_attn.reference), both paths in
  float64: loss, logits and every prompt-encoder gradient agree to 1e-10 (observed ~1e-15). This
  checks positions, the prefix layout, masks and the dtype cast independently of kernel rounding.
- the real op (float32; the op has no float64): agreement to 2e-5 relative to the largest value.
  float32 rounding of a 2-layer model over P + L <= 14 keys gives ~5e-7; any routing error moves
  results by 1e-2 or more.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM  # noqa: E402

import prefix_attn.integrations.hf_attention as hf_attention  # noqa: E402
from prefix_attn import apply_prefix_attn_to_peft  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import VOCAB, OpSpy, heads_first_entry, make_batch, no_cache_generate  # noqa: E402
from tests.peft_checks import reference_op, assert_close, assert_runs_equal, run  # noqa: E402

P = 5


def tiny_base(seed=0, **overrides):
    kwargs = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0, resid_pdrop=0.0,
                  embd_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**kwargs, attn_implementation="eager")).eval()
    assert model.config._attn_implementation == "eager"
    return model


def peft_pair(projection, seed=0, dtype=torch.float32, device="cpu", **overrides):
    """(PEFT alone over eager attention, the same model patched), equal weights."""
    base = tiny_base(seed, **overrides)
    torch.manual_seed(seed + 1)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                encoder_hidden_size=24)
    ref = get_peft_model(base, config).to(device, dtype)
    ours = apply_prefix_attn_to_peft(copy.deepcopy(ref))
    assert ref.get_base_model().config._attn_implementation == "eager"
    assert ours.get_base_model().config._attn_implementation == hf_attention.ATTN_IMPLEMENTATION
    return ref, ours




@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("projection", [False, True])
def test_routing_equals_peft_exactly_in_float64(monkeypatch, projection, padding):
    monkeypatch.setattr(hf_attention, "causal_attention_heads_first", heads_first_entry(reference_op))
    ref, ours = peft_pair(projection, dtype=torch.float64)
    ids, mask = make_batch(padding)
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=1e-10)


@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("projection", [False, True])
def test_equals_peft_float32(projection, padding):
    ref, ours = peft_pair(projection)
    ids, mask = make_batch(padding)
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=2e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_equals_peft_with_triton_kernels(monkeypatch, projection):
    """The real Triton kernels (the CPU interpreter without CUDA), forced through the environment."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    ref, ours = peft_pair(projection, device=DEVICE)
    ids, mask = make_batch("left", batch=2, length=7, device=DEVICE)
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=2e-5)


def test_explicit_position_ids_are_shifted_like_peft():
    ref, ours = peft_pair(False)
    ids, mask = make_batch()
    position_ids = torch.arange(9).flip(0)[None].expand(3, -1) + 3  # unusual on purpose
    assert_runs_equal(run(ours, ids, mask, position_ids=position_ids),
                      run(ref, ids, mask, position_ids=position_ids), tol=2e-5)


GENERATE = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
}


@pytest.mark.parametrize("mode", list(GENERATE))
@pytest.mark.parametrize("projection", [False, True])
def test_generate_equals_the_no_cache_recompute(projection, mode):
    """Cached generate() through the patch gives the tokens of PEFT without a cache (a full recompute over
    the concatenation every step). Not PEFT's own cached generate: on transformers 5.24 that drifts from
    its no-cache output for left-padded rows (see the README)."""
    ref, ours = peft_pair(projection)
    ids, mask = make_batch("left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GENERATE[mode])
    want = no_cache_generate(ref, **kwargs)
    torch.manual_seed(123)
    assert torch.equal(ours.generate(**kwargs), want)
    assert torch.equal(no_cache_generate(ours, **kwargs), want)  # the route's own recompute agrees
    if mode == "greedy":  # the prefix matters: without it the model says something else
        with ours.disable_adapter():
            plain = ours.generate(**kwargs)
        assert not torch.equal(plain, want)


def test_forward_hands_the_prefix_over_unexpanded(monkeypatch):
    spy = OpSpy(monkeypatch)
    _, ours = peft_pair(True)
    ids, mask = make_batch("left")
    out = ours(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values.get_seq_length() == 9  # the cache holds L positions, not P + L
    assert len(spy.calls) == 2
    for call in spy.calls:
        assert call["prefix_k"] == (P, 2, 16)  # (P, H, D): never expanded over the batch
        assert call["q"] == call["k"] == (3, 9, 2, 16)  # keys: the sequence's own, no prefix concatenated
        assert tuple(call["mask"].shape) == (3, 9)  # the mask is not extended by P
        assert call["q_is_view"]  # q is GPT-2's transposed view, not a copy


def test_beam_search_never_copies_the_prefix(monkeypatch):
    spy = OpSpy(monkeypatch)
    _, ours = peft_pair(False)
    ids, mask = make_batch("left")
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert out.shape == (6, 13)
    assert {call["prefix_k"] for call in spy.calls} == {(P, 2, 16)}
    assert {call["q"][0] for call in spy.calls} == {9}  # batch 3 x 3 beams
    # prefill sees the 9 prompt keys, each decoding step one more: the prefix is not in the cache
    assert [call["k"][1] for call in spy.calls[::2]] == [9, 10, 11, 12]
    assert [call["q"][1] for call in spy.calls[::2]] == [9, 1, 1, 1]


@pytest.mark.parametrize("projection", [False, True])
def test_saved_adapters_load_and_run_unchanged(tmp_path, projection):
    trained, _ = peft_pair(projection)
    trained.save_pretrained(tmp_path)
    ref = PeftModel.from_pretrained(tiny_base(), tmp_path).eval()
    ours = apply_prefix_attn_to_peft(PeftModel.from_pretrained(tiny_base(), tmp_path).eval())
    assert ours.active_peft_config.inference_mode  # the saved adapter holds the projected prefix
    ids, mask = make_batch("left")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = ours(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        trained_logits = trained(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert_close(got, want, 2e-5, "logits")
    assert_close(got, trained_logits, 2e-5, "logits vs the model that saved it")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(ours.generate(**kwargs), no_cache_generate(ref, **kwargs))


def test_disable_adapter_falls_back_to_the_plain_model():
    ref, ours = peft_pair(False)
    plain = tiny_base()  # same seed: the base weights
    ids, mask = make_batch("right")
    prompt, prompt_mask = make_batch("left")
    valid = mask.bool()
    with torch.no_grad():
        with ours.disable_adapter():
            got = ours(input_ids=ids, attention_mask=mask).logits[valid]
            generated = ours.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=5)
        assert_close(got, plain(input_ids=ids, attention_mask=mask).logits[valid], 1e-5, "disabled logits")
    assert torch.equal(generated, no_cache_generate(plain, input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=5))
    with torch.no_grad():
        # and the adapter is back afterwards
        assert_close(ours(input_ids=ids, attention_mask=mask).logits[valid],
                     ref(input_ids=ids, attention_mask=mask).logits[valid], 2e-5, "logits after")


@pytest.mark.parametrize("attn_pdrop", [0.0, 0.3])
def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, attn_pdrop):
    """PEFT refuses gradient checkpointing with prefix tuning; the patch supports use_reentrant=False.
    With attention dropout the checkpoint's recomputation replays the same dropout mask. The op runs
    twice per layer under checkpointing: the recomputation did happen."""
    spy = OpSpy(monkeypatch)
    _, ours = peft_pair(True, attn_pdrop=attn_pdrop)
    checkpointed = copy.deepcopy(ours)
    checkpointed.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = make_batch("left")
    results, calls = [], []
    for model in (ours, checkpointed):
        model.train()
        torch.manual_seed(7)
        spy.calls.clear()
        results.append(run(model, ids, mask))
        calls.append(len(spy.calls))
    assert calls == [2, 4]
    assert_runs_equal(results[1], results[0], tol=1e-6)


def test_repeated_apply_keeps_results():
    ref, ours = peft_pair(True)
    apply_prefix_attn_to_peft(ours)
    ids, mask = make_batch("left")
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=2e-5)


def test_a_reverted_base_model_is_refused_not_silently_wrong():
    from prefix_attn import revert_prefix_attn_to_gpt2

    _, ours = peft_pair(False)
    revert_prefix_attn_to_gpt2(ours.get_base_model())
    ids, mask = make_batch()
    with pytest.raises(RuntimeError, match="would ignore the prefix"):
        ours(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="would ignore the prefix"):
        ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    apply_prefix_attn_to_peft(ours)
    ours(input_ids=ids, attention_mask=mask)


def test_too_long_inputs_raise():
    _, ours = peft_pair(False)
    ids = torch.randint(1, VOCAB, (1, 64 - P + 1))
    with pytest.raises(ValueError, match="n_positions=64"):
        ours(input_ids=ids)
    ours(input_ids=ids[:, 1:])  # P + L = 64 fits
    with pytest.raises(ValueError, match="n_positions=64"):
        ours.generate(input_ids=ids[:, 10:], max_new_tokens=20)


def test_bad_models_are_refused_and_left_unchanged():
    with pytest.raises(TypeError, match="PeftModelForCausalLM"):
        apply_prefix_attn_to_peft(tiny_base())
    lora = get_peft_model(tiny_base(), LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="prefix tuning"):
        apply_prefix_attn_to_peft(lora)
    assert "forward" not in lora.__dict__
    assert lora.get_base_model().config._attn_implementation == "eager"
    mistral = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                               sliding_window=16))
    mistral_prefix = get_peft_model(mistral, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    before = mistral.config._attn_implementation
    with pytest.raises(ValueError, match="sliding-window"):
        apply_prefix_attn_to_peft(mistral_prefix)
    assert "forward" not in mistral_prefix.__dict__ and mistral.config._attn_implementation == before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_peft_on_cuda(dtype):
    """GPT-2-small-like head sizes on the real kernels; bf16 against PEFT's own bf16 error."""
    kwargs = dict(n_embd=256, n_head=4, n_layer=2, n_positions=512)
    ref, ours = peft_pair(True, device="cuda", dtype=dtype, **kwargs)
    ref32, _ = peft_pair(True, device="cuda", dtype=torch.float32, **kwargs)
    ids, mask = make_batch("left", batch=4, length=300, device="cuda")
    got, want, exact = run(ours, ids, mask), run(ref, ids, mask), run(ref32, ids, mask)
    if dtype == torch.float32:
        assert_runs_equal(got, want, tol=1e-4)
        return
    for g, w, e, name in zip(got[:2], want[:2], exact[:2], ["loss", "logits"]):
        ref_err = (w.double() - e.double()).abs().max().item()
        assert (g.double() - e.double()).abs().max().item() <= 2 * ref_err + 1e-2, name
