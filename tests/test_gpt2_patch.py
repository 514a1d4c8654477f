"""The GPT-2 patch: registration, selection, parity with HF eager attention, masks, bad input.

Models are tiny random GPT-2s in float32 on the CPU (backend "auto" = the torch backend), except
where a test forces the Triton kernels (CPU interpreter without CUDA, real kernels with it).
Tolerances: float32 logits of a 2-layer model agree with eager to ~1e-7; 1e-5 leaves a wide margin
and still catches any masking or scaling error (those move logits by 1e-2 or more).
"""
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache, GPT2Config, GPT2DoubleHeadsModel, GPT2ForSequenceClassification,
                          GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM)
from transformers.masking_utils import AttentionMaskInterface

import prefix_attn
from prefix_attn import apply_prefix_attn_to_gpt2, revert_prefix_attn_to_gpt2
from prefix_attn.host_syncs import HostSyncCounter
from prefix_attn.integrations import gpt2 as gpt2_integration
from prefix_attn.integrations import _versions as versions
from prefix_attn.integrations._versions import check_transformers_version
from tests.conftest import DEVICE
from tests.helpers import VOCAB, make_batch, no_cache_generate

ATTN = gpt2_integration.ATTN_IMPLEMENTATION


def tiny_config(attn_implementation=None, **overrides):
    kwargs = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0, resid_pdrop=0.0,
                  embd_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    config = GPT2Config(**kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def eager_and_patched(cls, seed=0, **overrides):
    """(eager reference, patched copy) with equal weights, eval mode."""
    torch.manual_seed(seed)
    ref = cls(tiny_config("eager", **overrides)).eval()
    assert ref.config._attn_implementation == "eager"
    ours = cls(tiny_config("eager", **overrides)).eval()
    ours.load_state_dict(ref.state_dict())
    apply_prefix_attn_to_gpt2(ours)
    assert ours.config._attn_implementation == ATTN
    return ref, ours


def assert_close(got, ref, tol=1e-5, what=""):
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


VARIANTS = {
    "default": {},
    "inverse_layer_idx": {"scale_attn_by_inverse_layer_idx": True},
    "reorder_and_upcast": {"reorder_and_upcast_attn": True},
    "no_scale": {"scale_attn_weights": False},
}


def lm_labels(ids, mask):
    """Labels whose predicting position is a real token: without a prefix a left-padded row's pad
    positions see no key at all, which eager attention and the op define differently (garbage vs 0)."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


def _outputs(model, cls, ids, mask):
    """The outputs to compare, restricted to what padding leaves defined (non-padded positions)."""
    valid = mask.bool()
    if cls is GPT2LMHeadModel:
        labels = lm_labels(ids, mask)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        return {"logits": out.logits[valid], "loss": out.loss}
    if cls is GPT2DoubleHeadsModel:
        # (B, choices=2, L): two variants of each row; the mc head reads the last real token.
        ids2 = torch.stack([ids, ids.flip(0)], dim=1)
        mask2 = torch.stack([mask, mask.flip(0)], dim=1)
        last = mask2.shape[-1] - 1 - mask2.flip(-1).argmax(-1)
        out = model(input_ids=ids2, attention_mask=mask2, mc_token_ids=last)
        return {"logits": out.logits[mask2.bool()], "mc_logits": out.mc_logits}
    out = model(input_ids=ids, attention_mask=mask)
    return {"logits": out.logits}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification])
def test_matches_eager_without_prefix(cls, padding, variant):
    ref, ours = eager_and_patched(cls, **VARIANTS[variant])
    ids, mask = make_batch(padding=padding)
    with torch.no_grad():
        got, want = _outputs(ours, cls, ids, mask), _outputs(ref, cls, ids, mask)
    for name in want:
        assert_close(got[name], want[name], what=name)


@pytest.mark.parametrize("padding", [None, "left"])
def test_gradients_match_eager_without_prefix(padding):
    ref, ours = eager_and_patched(GPT2LMHeadModel, scale_attn_by_inverse_layer_idx=True)
    ids, mask = make_batch(padding=padding)
    labels = lm_labels(ids, mask)
    for model in (ref, ours):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        assert_close(p_ours.grad, p_ref.grad, what=f"grad {name}")


def test_triton_backend_matches_eager(monkeypatch):
    """The real kernels (interpreter on CPU) behind the patch, left padding, cached decoding included."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "triton")
    ref, ours = eager_and_patched(GPT2LMHeadModel)
    ref, ours = ref.to(DEVICE), ours.to(DEVICE)
    ids, mask = make_batch(batch=2, length=7, padding="left")
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with torch.no_grad():
        got, want = _outputs(ours, GPT2LMHeadModel, ids, mask), _outputs(ref, GPT2LMHeadModel, ids, mask)
        for name in want:
            assert_close(got[name], want[name], what=name)
        kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(ours.generate(ids, **kwargs), no_cache_generate(ref, input_ids=ids, **kwargs))


@pytest.mark.parametrize("padding", [None, "left"])
def test_cached_generation_matches_eager(padding):
    """Decoding steps run Lq = 1 against cached keys (bottom-right causal alignment); the truth is eager
    attention without a cache."""
    ref, ours = eager_and_patched(GPT2LMHeadModel)
    ids, mask = make_batch(padding=padding)
    for kwargs in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False)):
        want = no_cache_generate(ref, input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs), want)


def _causality_and_padding_hold(model):
    ids, mask = make_batch(padding="left")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        future = ids.clone()
        future[:, -1] = (future[:, -1] + 1) % VOCAB  # change the last token: earlier logits must not move
        moved_future = model(input_ids=future, attention_mask=mask).logits
        padded = ids.masked_fill(mask == 0, 7)  # change padded tokens: real positions must not move
        moved_pad = model(input_ids=padded, attention_mask=mask).logits
    valid = mask.bool()
    causal_ok = torch.allclose(moved_future[:, :-1], base[:, :-1], atol=1e-6)
    padding_ok = torch.allclose(moved_pad[valid], base[valid], atol=1e-6)
    return causal_ok, padding_ok


def test_causality_and_padding_are_honoured():
    _, ours = eager_and_patched(GPT2LMHeadModel)
    assert _causality_and_padding_hold(ours) == (True, True)


def test_mask_function_registration_is_what_keeps_causality(monkeypatch):
    """Without the mask function transformers builds no mask for a custom name: the check above fails."""
    _, ours = eager_and_patched(GPT2LMHeadModel)
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, ATTN)
    # Without a mask the kernel still applies causality, but padding is lost.
    assert _causality_and_padding_hold(ours) == (True, False)


def test_mask_function_contract():
    mask = torch.ones(2, 5, dtype=torch.bool)
    with HostSyncCounter() as syncs:
        # A CPU mask that pads nothing is read on the host (no sync) and dropped, once per forward.
        assert gpt2_integration.prefix_attn_mask(2, 5, 5, attention_mask=mask) is None
        # A mask on a device is handed over unread (reading it would be a host sync); meta stands in for CUDA.
        on_device = torch.ones(2, 5, dtype=torch.bool, device="meta")
        handed_over = gpt2_integration.prefix_attn_mask(2, 5, 5, attention_mask=on_device)
        assert handed_over is not None and handed_over.shape == (2, 5) and handed_over.device == on_device.device
    assert syncs.count == 0
    mask[0, 0] = False
    assert torch.equal(gpt2_integration.prefix_attn_mask(2, 1, 5, attention_mask=mask), mask)
    assert gpt2_integration.prefix_attn_mask(2, 5, 5, attention_mask=None) is None
    with pytest.raises(ValueError, match="static caches"):
        gpt2_integration.prefix_attn_mask(2, 1, 8, attention_mask=mask)
    with pytest.raises(ValueError, match="packed sequences"):
        gpt2_integration.prefix_attn_mask(2, 5, 5, mask_function=lambda b, h, q, k: True, attention_mask=mask)


def test_packed_position_ids_are_refused():
    _, ours = eager_and_patched(GPT2LMHeadModel)
    ids, _ = make_batch(batch=1, length=6)
    with pytest.raises(ValueError, match="packed sequences"):
        ours(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)


def test_4d_masks_are_refused():
    _, ours = eager_and_patched(GPT2LMHeadModel)
    ids, _ = make_batch(batch=1, length=4)
    with pytest.raises(ValueError, match="2-D"):
        ours(input_ids=ids, attention_mask=torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("bank", [False, True])
def test_prefix_kv_kwarg_equals_prefix_in_an_eager_cache(bank):
    """The low-level handoff: prefix_kv / prefix_idx given to the model's forward equal PEFT's mechanism
    (the prefix prefilled into an eager model's cache, the mask extended, positions from P)."""
    ref, ours = eager_and_patched(GPT2LMHeadModel)
    P, H, D, T = 4, 2, 16, 3
    ids, mask = make_batch(padding="left")
    B, L = ids.shape
    g = torch.Generator().manual_seed(1)
    shape = (T, P, H, D) if bank else (P, H, D)
    prefix_kv = tuple((torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2))
    prefix_idx = torch.tensor([2, 0, 2]) if bank else None
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, position_ids=torch.arange(L)[None] + P,
                   prefix_kv=prefix_kv, prefix_idx=prefix_idx).logits
        cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix_kv):
            k = k[prefix_idx] if bank else k.expand(B, -1, -1, -1)
            v = v[prefix_idx] if bank else v.expand(B, -1, -1, -1)
            cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
        want = ref(input_ids=ids, attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1),
                   past_key_values=cache).logits
    valid = mask.bool()
    assert_close(got[valid], want[valid], what="logits")


def test_bad_prefix_kwargs_raise():
    _, ours = eager_and_patched(GPT2LMHeadModel)
    ids, _ = make_batch(batch=2, length=5)
    shared = tuple((torch.randn(3, 2, 16), torch.randn(3, 2, 16)) for _ in range(2))
    with pytest.raises(ValueError, match="each of the model's 2 layers"):
        ours(input_ids=ids, prefix_kv=shared[:1])
    with pytest.raises(ValueError, match="prefix_idx was given without prefix_kv"):
        ours(input_ids=ids, prefix_idx=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prefix_idx needs a prefix bank"):
        ours(input_ids=ids, prefix_kv=shared, prefix_idx=torch.tensor([0, 0]))


def test_apply_to_a_model_is_repeatable_and_reverts():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("eager"))
    assert apply_prefix_attn_to_gpt2(model) is model
    apply_prefix_attn_to_gpt2(model)
    assert model.config._attn_implementation == ATTN
    revert_prefix_attn_to_gpt2(model)
    assert model.config._attn_implementation == "eager"
    revert_prefix_attn_to_gpt2(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("cls, auto", [(GPT2LMHeadModel, AutoModelForCausalLM),
                                       (GPT2ForSequenceClassification, AutoModelForSequenceClassification)])
def test_registration_makes_the_name_selectable_without_touching_model_classes(cls, auto, tmp_path):
    classes = (cls, *cls.__mro__)
    before = {klass: dict(vars(klass)) for klass in classes if klass.__module__.startswith("transformers")}
    try:
        apply_prefix_attn_to_gpt2()
        apply_prefix_attn_to_gpt2()  # repeatable
        assert {klass: dict(vars(klass)) for klass in before} == before  # no class attribute replaced
        assert auto.from_config(tiny_config(), attn_implementation=ATTN).config._attn_implementation == ATTN
        cls(tiny_config()).save_pretrained(tmp_path)
        loaded = cls.from_pretrained(tmp_path, attn_implementation=ATTN)
        assert loaded.config._attn_implementation == ATTN
        assert cls(tiny_config()).config._attn_implementation != ATTN  # nothing requested: transformers' default
    finally:
        revert_prefix_attn_to_gpt2()
    with pytest.raises(ValueError, match=ATTN):  # unregistered: transformers refuses the name again
        auto.from_config(tiny_config(), attn_implementation=ATTN)
    with pytest.raises(KeyError, match=ATTN):  # a model still set to it fails loudly, never silently
        loaded(input_ids=torch.tensor([[1, 2]]))
    revert_prefix_attn_to_gpt2()  # repeatable


def test_refuses_other_models_and_leaves_them_unchanged():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    before = llama.config._attn_implementation
    with pytest.raises(TypeError, match="GPT-2"):
        apply_prefix_attn_to_gpt2(llama)
    assert llama.config._attn_implementation == before
    with pytest.raises(TypeError, match="GPT-2"):
        apply_prefix_attn_to_gpt2(torch.nn.Linear(2, 2))
    cross = GPT2LMHeadModel(tiny_config("eager", add_cross_attention=True))
    with pytest.raises(ValueError, match="cross-attention"):
        apply_prefix_attn_to_gpt2(cross)
    assert cross.config._attn_implementation == "eager"


def test_refuses_unsupported_transformers(monkeypatch):
    check_transformers_version("5.17.0")
    check_transformers_version("5.23.0")
    check_transformers_version("5.24.0.dev0")
    for version in ("4.57.1", "5.16.0", "6.0.0"):
        with pytest.raises(RuntimeError, match="supports transformers"):
            check_transformers_version(version)
    model = GPT2LMHeadModel(tiny_config("eager"))
    monkeypatch.setattr(versions, "installed_transformers_version", lambda: "4.57.1")
    with pytest.raises(RuntimeError, match="4.57.1 is installed"):
        apply_prefix_attn_to_gpt2(model)
    assert model.config._attn_implementation == "eager"


def test_lazy_exports():
    assert prefix_attn.apply_prefix_attn_to_gpt2 is apply_prefix_attn_to_gpt2
    with pytest.raises(AttributeError):
        prefix_attn.not_a_name  # noqa: B018


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_matches_eager(dtype):
    ref, ours = eager_and_patched(GPT2LMHeadModel, n_embd=128, n_head=4, n_positions=256)
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    ref32 = GPT2LMHeadModel(tiny_config("eager", n_embd=128, n_head=4, n_positions=256)).to("cuda").eval()
    ref32.load_state_dict(ref.state_dict())
    ids, mask = make_batch(batch=4, length=200, padding="left")
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        want = ref32(input_ids=ids, attention_mask=mask).logits.float()
        low = ref(input_ids=ids, attention_mask=mask).logits.float()
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    # FlashAttention-style oracle: no worse than twice eager's own error in the same dtype.
    ref_err = (low[valid] - want[valid]).abs().max().item()
    assert (got[valid] - want[valid]).abs().max().item() <= 2 * ref_err + 1e-3
