"""Llama-family decoders (rotary positions, grouped KV heads) through the integrations.

Tiny random models on the CPU: Llama with 4 query heads over 2 KV heads, Qwen2 with multi-query
attention (1 KV head), Mistral without sliding window (with one it is refused). head_dim 16 (the
op's minimum). Oracles: PEFT over eager attention for training loss, logits and prompt-encoder
gradients (float64 through the reference op, where routing must agree to rounding; float32 through
the fused op); the no-cache recompute through the concatenation reference for generation; eager
attention without a prefix for the plain patch.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import prefix_attn  # noqa: E402
import prefix_attn.integrations.hf_attention as hf_attention  # noqa: E402
from prefix_attn import (PrefixTuning, apply_prefix_attn, apply_prefix_attn_to_peft, revert_prefix_attn,  # noqa: E402
                         revert_prefix_attn_to_peft)
from tests.helpers import VOCAB, OpSpy, heads_first_entry, make_batch, no_cache_generate  # noqa: E402
from tests.peft_checks import reference_op, assert_close, assert_runs_equal, run  # noqa: E402

ATTN = hf_attention.ATTN_IMPLEMENTATION
P = 4
# model kind -> (model class, config class, KV heads); 4 query heads of head_dim 16 everywhere.
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, 2),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, 1),
    "mistral": (MistralForCausalLM, MistralConfig, 2),
}


def tiny_model(kind, seed=0, attn="eager", **overrides):
    cls, config_cls, kv_heads = MODELS[kind]
    kwargs = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=None, pad_token_id=0, attention_dropout=0.0)
    if kind == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = cls(config_cls(**kwargs, attn_implementation=attn)).eval()
    assert model.config._attn_implementation == attn
    return model


def peft_pair(kind, projection=False, dtype=torch.float32, seed=0, attn="eager"):
    """(PEFT over ``attn`` attention, the same model patched), equal weights."""
    base = tiny_model(kind, seed, attn=attn)
    torch.manual_seed(seed + 1)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                encoder_hidden_size=24)
    ref = get_peft_model(base, config).to(dtype)
    # PEFT sizes the prefix by the KV heads: the op takes it as (P, Hkv, D) per layer.
    assert ref.active_peft_config.num_attention_heads == MODELS[kind][2]
    ours = apply_prefix_attn_to_peft(copy.deepcopy(ref))
    assert ours.get_base_model().config._attn_implementation == ATTN
    assert ref.get_base_model().config._attn_implementation == attn
    return ref, ours




# ---- PEFT route --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, projection, padding", [("llama", False, "left"), ("llama", True, "right"),
                                                       ("qwen2", False, "left"), ("mistral", True, None)])
def test_peft_routing_equals_peft_exactly_in_float64(monkeypatch, kind, projection, padding):
    """Positions P + i for the new tokens, unrotated prefix keys, grouped heads: to rounding. PEFT runs
    over sdpa here: Llama's eager attention takes its softmax in float32 even for float64 inputs."""
    monkeypatch.setattr(hf_attention, "causal_attention_heads_first", heads_first_entry(reference_op))
    ref, ours = peft_pair(kind, projection, dtype=torch.float64, attn="sdpa")
    ids, mask = make_batch(padding, batch=3, length=7)
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=1e-10)


@pytest.mark.parametrize("kind", list(MODELS))
def test_peft_route_through_the_op_equals_peft(monkeypatch, kind):
    ref, ours = peft_pair(kind, projection=kind == "llama")
    spy = OpSpy(monkeypatch)
    ids, mask = make_batch("left", batch=3, length=7)
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=2e-5)
    heads, kv_heads = 4, MODELS[kind][2]
    for call in spy.calls:  # grouped heads reach the op as they are: no repeat_kv, no prefix expansion
        assert call["q"] == (3, 7, heads, 16) and call["k"] == (3, 7, kv_heads, 16)
        assert call["prefix_k"] == call["prefix_v"] == (P, kv_heads, 16)


@pytest.mark.parametrize("kind, mode", [("llama", "greedy"), ("qwen2", "beam"), ("mistral", "sample")])
def test_peft_generate_equals_the_no_cache_recompute(kind, mode):
    _, ours = peft_pair(kind, projection=True)
    ids, mask = make_batch("left", batch=2, length=6)
    kwargs = {"greedy": dict(do_sample=False), "beam": dict(num_beams=2, num_return_sequences=2, do_sample=False),
              "sample": dict(do_sample=True, top_k=0)}[mode]
    want = no_cache_generate(ours, input_ids=ids, attention_mask=mask, max_new_tokens=5, **kwargs)
    torch.manual_seed(123)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **kwargs)
    assert torch.equal(got, want)


def test_revert_prefix_attn_to_peft_gives_peft_back():
    ref, ours = peft_pair("llama")
    ids, mask = make_batch("right", batch=2, length=6)
    assert revert_prefix_attn_to_peft(ours) is ours
    assert "forward" not in ours.__dict__ and "generate" not in ours.__dict__
    assert ours.get_base_model().config._attn_implementation == "eager"
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=1e-6)
    revert_prefix_attn_to_peft(ours)  # repeatable
    apply_prefix_attn_to_peft(ours)  # and re-appliable
    assert ours.get_base_model().config._attn_implementation == ATTN
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=2e-5)


# ---- native PrefixTuning -----------------------------------------------------------------------------

def test_prefix_tuning_one_task_equals_peft():
    ref, _ = peft_pair("llama")
    tuned = PrefixTuning(tiny_model("llama"), P)
    encoder = ref.prompt_encoder["default"]
    # PEFT's embedding row is one virtual token laid out (n_layer, 2, Hkv, D).
    with torch.no_grad():
        tuned.prefix_encoder.kv.copy_(encoder.embedding.weight.view(P, 2, 2, 2, 16).permute(1, 2, 0, 3, 4)[None])
    k0, v0 = tuned.prefix_kv()[0]
    assert k0.shape == v0.shape == (P, 2, 16)
    ids, mask = make_batch("left", batch=3, length=7)
    labels = ids.masked_fill(mask == 0, -100)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = tuned(ids, attention_mask=mask, labels=labels)
    out_ref.loss.backward()
    out.loss.backward()
    assert_close(out.loss, out_ref.loss, 2e-5, "loss")
    assert_close(out.logits[mask.bool()], out_ref.logits[mask.bool()], 2e-5, "logits")
    want = encoder.embedding.weight.grad.view(P, 2, 2, 2, 16).permute(1, 2, 0, 3, 4)
    assert_close(tuned.prefix_encoder.kv.grad[0], want, 2e-5, "prefix gradient")


def test_prefix_tuning_bank_generate_merge_save_load(tmp_path):
    from safetensors import safe_open

    tuned = PrefixTuning(tiny_model("qwen2"), P, num_tasks=2, projection_dim=8)
    assert [tuple(t.shape) for t in tuned.prefix_kv()[1]] == [(2, P, 1, 16)] * 2
    ids, mask = make_batch("left", batch=3, length=6)
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = tuned(ids, attention_mask=mask, prefix_idx=tasks).logits
        for row, task in enumerate(tasks.tolist()):
            alone = tuned(ids[row:row + 1], attention_mask=mask[row:row + 1], prefix_idx=task).logits
            assert_close(mixed[row][mask[row].bool()], alone[0][mask[row].bool()], 2e-5, f"row {row}")
    got = tuned.generate(ids, attention_mask=mask, prefix_idx=tasks, max_new_tokens=4, do_sample=False)
    want = no_cache_generate(tuned, input_ids=ids, attention_mask=mask, prefix_idx=tasks, max_new_tokens=4,
                             do_sample=False)
    assert torch.equal(got, want)
    tuned.merge()
    path = tmp_path / "prefix.safetensors"
    tuned.save_prefix(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["model_type"], metadata["n_head"], metadata["n_kv_head"], metadata["head_dim"]) == (
        "qwen2", "4", "1", "16")
    loaded = PrefixTuning.load_prefix(tiny_model("qwen2"), path)
    with torch.no_grad():
        assert_close(loaded(ids, attention_mask=mask, prefix_idx=tasks).logits, mixed, 1e-5, "reloaded logits")
    with pytest.raises(ValueError, match="n_kv_head=1, but this model has n_kv_head=2"):
        PrefixTuning.load_prefix(tiny_model("qwen2", num_key_value_heads=2), path)


def test_prefix_from_text_equals_the_text_placed_before_the_sequence():
    """The prefix keys are used as given and the sequence sits at P + i: a prefix initialised from a
    text's cached (rotated) keys gives exactly the model's output for text + sequence."""
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    text = torch.randint(1, VOCAB, (1, P), generator=torch.Generator().manual_seed(5))
    tuned = PrefixTuning(model, P, init_text_ids=text)
    ids, _ = make_batch(None, batch=2, length=6)
    with torch.no_grad():
        got = tuned(ids).logits
        want = plain(input_ids=torch.cat([text.expand(2, -1), ids], dim=1)).logits[:, P:]
    assert_close(got, want, 2e-5, "logits")


# ---- the generic patch -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plain_patch_matches_eager_and_is_selectable_by_name(kind, tmp_path):
    ref = tiny_model(kind)
    ref.save_pretrained(tmp_path)
    apply_prefix_attn()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN).eval()
    # from_config writes the implementation into the config it is given: hand it a copy.
    built = AutoModelForCausalLM.from_config(copy.deepcopy(ref.config), attn_implementation=ATTN).eval()
    assert ref.config._attn_implementation == "eager"
    assert loaded.config._attn_implementation == built.config._attn_implementation == ATTN
    ids, mask = make_batch("right", batch=3, length=7)
    with torch.no_grad():
        want, got = ref(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits
    assert_close(got[mask.bool()], want[mask.bool()], 1e-5, "logits")
    ours = apply_prefix_attn(copy.deepcopy(ref))
    assert ours.config._attn_implementation == ATTN
    torch.manual_seed(0)
    got = ours.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False))
    static = ours.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, got)
    assert revert_prefix_attn(ours) is ours and ours.config._attn_implementation == "eager"


def test_exports():
    assert prefix_attn.apply_prefix_attn is apply_prefix_attn
    assert prefix_attn.revert_prefix_attn_to_peft is revert_prefix_attn_to_peft


# ---- what is refused ---------------------------------------------------------------------------------

def test_sliding_window_models_are_refused_and_left_unchanged():
    mistral = tiny_model("mistral", sliding_window=8)
    qwen2 = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    for model in (mistral, qwen2):
        with pytest.raises(ValueError, match="sliding-window"):
            apply_prefix_attn(model)
        with pytest.raises(ValueError, match="sliding-window"):
            PrefixTuning(model, P)
        assert model.config._attn_implementation == "eager" and all(p.requires_grad for p in model.parameters())
    # A model switched by name bypasses apply_prefix_attn's check: its mask and attention functions refuse.
    apply_prefix_attn()
    mistral.set_attn_implementation(ATTN)
    with pytest.raises(ValueError, match="sliding-window"):
        mistral(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="sliding-window"):
        hf_attention.prefix_attn_forward(mistral.model.layers[0].self_attn, *[torch.zeros(1, 4, 2, 16)] * 3, None,
                                         sliding_window=8)


def test_unsupported_models_and_caches_are_refused():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_prefix_attn(torch.nn.Linear(2, 2))
    from transformers import EncoderDecoderCache, DynamicCache

    tuned = PrefixTuning(tiny_model("llama"), P)
    ids, _ = make_batch(None, batch=1, length=3)
    with pytest.raises(ValueError, match="EncoderDecoderCache"):
        tuned(ids, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))


def test_grouped_heads_on_triton_equal_peft(monkeypatch):
    """The PEFT route over a grouped-heads Llama on the Triton kernels (interpreter) gives PEFT's results."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    ref, ours = peft_pair("llama")
    ids, mask = make_batch("left", batch=2, length=5)
    assert_runs_equal(run(ours, ids, mask), run(ref, ids, mask), tol=2e-5)

