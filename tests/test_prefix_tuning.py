"""PrefixTuning: prefix tuning without PEFT, several tasks in one batch.

Oracles: PEFT's own prefix tuning with the same numbers (one task, with and without the MLP
reparameterisation), each row of a mixed-task batch run alone, and the frozen model itself for a
prefix initialised from real text. Float32 tolerances as in test_peft_integration.py.
"""
import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import (GPT2Config, GPT2DoubleHeadsModel, GPT2ForSequenceClassification, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM)

import prefix_attn.integrations.gpt2 as gpt2_integration
from prefix_attn import PrefixTuning
from prefix_attn.integrations._prefix_params import PrefixKV, PrefixMLP
from tests.helpers import VOCAB, OpSpy, make_batch, no_cache_generate

P = 4
ATTN = gpt2_integration.ATTN_IMPLEMENTATION


def tiny_model(cls=GPT2LMHeadModel, seed=0, attn="eager", **overrides):
    kwargs = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0, resid_pdrop=0.0,
                  embd_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return cls(GPT2Config(**kwargs, attn_implementation=attn)).eval()


def assert_close(got, ref, tol=2e-5, what=""):
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def randomise(tuned, seed=3, scale=1.0):
    """Give the prefix parameters clearly non-trivial values (the default init is near zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.prefix_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return tuned


@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_only_the_prefix_trains(num_tasks, projection_dim):
    model = tiny_model()
    tuned = PrefixTuning(model, P, num_tasks=num_tasks, projection_dim=projection_dim)
    assert model.config._attn_implementation == ATTN
    assert not any(p.requires_grad for p in model.parameters())
    trainable = {name: tuple(p.shape) for name, p in tuned.named_parameters() if p.requires_grad}
    if projection_dim is None:
        assert trainable == {"prefix_encoder.kv": (num_tasks, 2, 2, P, 2, 16)}
    else:
        E, out = projection_dim, 2 * 2 * 32
        assert trainable == {"prefix_encoder.embedding": (num_tasks, P, E), "prefix_encoder.w1": (num_tasks, E, E),
                             "prefix_encoder.b1": (num_tasks, 1, E), "prefix_encoder.w2": (num_tasks, E, out),
                             "prefix_encoder.b2": (num_tasks, 1, out)}
    kv = tuned.prefix_kv()
    assert len(kv) == 2
    expected = (P, 2, 16) if num_tasks == 1 else (num_tasks, P, 2, 16)
    assert all(k.shape == v.shape == expected for k, v in kv)


def peft_twin(projection):
    """A PEFT prefix-tuning model and a PrefixTuning holding the same numbers (encoder hidden = token dim)."""
    peft = pytest.importorskip("peft")
    base = tiny_model()
    torch.manual_seed(1)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=32)
    ref = peft.get_peft_model(base, config)
    tuned = PrefixTuning(tiny_model(), P, projection_dim=32 if projection else None)
    encoder = ref.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            first, last = encoder.transform[0], encoder.transform[2]
            tuned.prefix_encoder.embedding.copy_(encoder.embedding.weight[None])
            tuned.prefix_encoder.w1.copy_(first.weight.T[None])
            tuned.prefix_encoder.b1.copy_(first.bias[None, None])
            tuned.prefix_encoder.w2.copy_(last.weight.T[None])
            tuned.prefix_encoder.b2.copy_(last.bias[None, None])
        else:  # PEFT's (P, 2 * n_layer * d) rows are laid out (n_layer, 2, H, D)
            tuned.prefix_encoder.kv.copy_(encoder.embedding.weight.view(P, 2, 2, 2, 16).permute(1, 2, 0, 3, 4)[None])
    return ref, tuned


@pytest.mark.parametrize("projection", [False, True])
def test_one_task_equals_peft(projection):
    ref, tuned = peft_twin(projection)
    ids, mask = make_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = tuned(ids, attention_mask=mask, labels=labels)
    out_ref.loss.backward()
    out.loss.backward()
    assert_close(out.loss, out_ref.loss, what="loss")
    assert_close(out.logits[mask.bool()], out_ref.logits[mask.bool()], what="logits")
    encoder = ref.prompt_encoder["default"]
    if projection:
        pairs = [(tuned.prefix_encoder.embedding.grad[0], encoder.embedding.weight.grad),
                 (tuned.prefix_encoder.w1.grad[0], encoder.transform[0].weight.grad.T),
                 (tuned.prefix_encoder.w2.grad[0], encoder.transform[2].weight.grad.T),
                 (tuned.prefix_encoder.b2.grad[0, 0], encoder.transform[2].bias.grad)]
    else:
        pairs = [(tuned.prefix_encoder.kv.grad[0],
                  encoder.embedding.weight.grad.view(P, 2, 2, 2, 16).permute(1, 2, 0, 3, 4))]
    for got, want in pairs:
        assert want.abs().sum() > 0
        assert_close(got, want, what="prefix gradient")
    for kwargs in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False)):
        # The ground truth is PEFT without a cache (its cached generate drifts on transformers 5.24).
        want = no_cache_generate(ref, input_ids=ids, attention_mask=mask, max_new_tokens=6, **kwargs)
        assert torch.equal(tuned.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs), want)


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_mixed_tasks_in_one_batch_equal_each_row_alone(projection_dim):
    tuned = randomise(PrefixTuning(tiny_model(), P, num_tasks=3, projection_dim=projection_dim), scale=0.5)
    ids, mask = make_batch("left", batch=4)
    labels = ids.masked_fill(mask == 0, -100)
    prefix_idx = torch.tensor([2, 0, 2, 0])  # task 1 unused
    out = tuned(ids, attention_mask=mask, labels=labels, prefix_idx=prefix_idx)
    # sum over rows of each row's own mean loss, so that gradients add up row by row
    per_row = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    loss = (per_row.sum(1) / (labels[:, 1:] != -100).sum(1)).sum()
    grads = torch.autograd.grad(loss, list(tuned.prefix_encoder.parameters()))
    alone_grads = [torch.zeros_like(g) for g in grads]
    for row in range(4):
        sl = slice(row, row + 1)
        alone = tuned(ids[sl], attention_mask=mask[sl], labels=labels[sl], prefix_idx=prefix_idx[sl])
        assert_close(alone.logits[mask[sl].bool()], out.logits[sl][mask[sl].bool()], what=f"row {row} logits")
        for acc, g in zip(alone_grads, torch.autograd.grad(alone.loss, list(tuned.prefix_encoder.parameters()))):
            acc += g
    for got, want in zip(grads, alone_grads):
        assert_close(got, want, what="prefix gradient")
        assert got[1].abs().max() == 0  # the unused task gets no gradient
        assert got[0].abs().max() > 0 and got[2].abs().max() > 0


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_mixed_tasks(monkeypatch, mode):
    tuned = randomise(PrefixTuning(tiny_model(), P, num_tasks=3), scale=1.0)
    ids, mask = make_batch("left")
    prefix_idx = torch.tensor([1, 2, 0])
    kwargs = dict(max_new_tokens=5, do_sample=False)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    spy = OpSpy(monkeypatch)
    together = tuned.generate(ids, attention_mask=mask, prefix_idx=prefix_idx, **kwargs)
    n_calls = len(spy.calls)
    assert torch.equal(together, no_cache_generate(tuned, input_ids=ids, attention_mask=mask, prefix_idx=prefix_idx,
                                                   **kwargs))
    del spy.calls[n_calls:]
    # The bank is never expanded; only prefix_idx is, by generate, for beams and return sequences.
    beams = 3 if mode == "beam" else 1
    assert {call["prefix_k"] for call in spy.calls} == {(3, P, 2, 16)}
    assert {tuple(call["prefix_idx"]) for call in spy.calls} == {tuple(prefix_idx.repeat_interleave(beams).tolist())}
    rows = [tuned.generate(ids[r:r + 1], attention_mask=mask[r:r + 1], prefix_idx=prefix_idx[r:r + 1], **kwargs)
            for r in range(3)]
    width = together.shape[1]
    rows = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0)) for r in rows])
    assert torch.equal(together, rows)
    # each task's prefix matters
    other = tuned.generate(ids, attention_mask=mask, prefix_idx=(prefix_idx + 1) % 3, **kwargs)
    assert not torch.equal(other, together)


def test_generate_sampling_is_seeded():
    tuned = randomise(PrefixTuning(tiny_model(), P, num_tasks=2))
    ids, mask = make_batch("left")
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(tuned.generate(ids, attention_mask=mask, prefix_idx=torch.tensor([0, 1, 1]), do_sample=True,
                                   top_k=0, max_new_tokens=6, num_return_sequences=2))
    assert runs[0].shape == (6, 15) and torch.equal(runs[0], runs[1])


def test_merge_keeps_outputs_and_drops_parameters():
    tuned = randomise(PrefixTuning(tiny_model(), P, num_tasks=2, projection_dim=16), scale=0.3)
    ids, mask = make_batch("left")
    prefix_idx = torch.tensor([1, 0, 1])
    with torch.no_grad():
        before = tuned(ids, attention_mask=mask, prefix_idx=prefix_idx).logits
    n_before = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert tuned.merge() is tuned
    assert isinstance(tuned.prefix_encoder, PrefixKV) and tuned.projection_dim is None
    n_after = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert n_after == 2 * 2 * 2 * P * 32 < n_before
    with torch.no_grad():
        after = tuned(ids, attention_mask=mask, prefix_idx=prefix_idx).logits
    assert_close(after, before, tol=1e-6, what="logits after merge")
    tuned.merge()  # no-op now
    assert isinstance(tuned.prefix_encoder, PrefixKV)


@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("num_tasks", [1, 2])
def test_save_and_load_prefix(tmp_path, num_tasks, projection_dim):
    from safetensors import safe_open

    tuned = randomise(PrefixTuning(tiny_model(), P, num_tasks=num_tasks, projection_dim=projection_dim), scale=0.5)
    path = tmp_path / "prefix.safetensors"
    tuned.save_prefix(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert list(handle.keys()) == ["prefix"]
    assert metadata == {"format": "prefix_attn.prefix", "format_version": "1", "model_type": "gpt2", "n_layer": "2",
                        "n_head": "2", "n_kv_head": "2", "head_dim": "16", "n_embd": "32",
                        "num_virtual_tokens": str(P), "num_tasks": str(num_tasks)}
    loaded = PrefixTuning.load_prefix(tiny_model(), path)
    assert loaded.num_tasks == num_tasks and loaded.num_virtual_tokens == P
    ids, mask = make_batch("left")
    prefix_idx = torch.tensor([0, num_tasks - 1, 0])
    with torch.no_grad():
        want = tuned(ids, attention_mask=mask, prefix_idx=prefix_idx).logits
        got = loaded(ids, attention_mask=mask, prefix_idx=prefix_idx).logits
    assert_close(got, want, tol=1e-6, what="logits after reload")


@pytest.mark.parametrize("other", [dict(n_layer=3), dict(n_embd=64, n_head=4), dict(n_embd=64)])
def test_load_prefix_refuses_files_for_other_models(tmp_path, other):
    path = tmp_path / "prefix.safetensors"
    PrefixTuning(tiny_model(), P).save_prefix(path)
    model = tiny_model(**other)
    with pytest.raises(ValueError, match="holds a prefix for a model with"):
        PrefixTuning.load_prefix(model, path)
    assert model.config._attn_implementation == "eager" and all(p.requires_grad for p in model.parameters())


def test_load_prefix_refuses_other_files_and_models(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    model = tiny_model()
    with pytest.raises(ValueError, match="not a prefix saved by"):
        PrefixTuning.load_prefix(model, path)
    good = tmp_path / "prefix.safetensors"
    PrefixTuning(tiny_model(), P).save_prefix(good)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="model type 'gpt2', not llama"):
        PrefixTuning.load_prefix(llama, good)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        PrefixTuning.load_prefix(torch.nn.Linear(2, 2), good)
    assert model.config._attn_implementation == "eager"


def test_load_prefix_reads_files_written_before_kv_heads_were_recorded(tmp_path):
    from safetensors import safe_open

    tuned = randomise(PrefixTuning(tiny_model(), P), scale=0.5)
    path, old = tmp_path / "prefix.safetensors", tmp_path / "old.safetensors"
    tuned.save_prefix(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata, kv = handle.metadata(), handle.get_tensor("prefix")
    del metadata["n_kv_head"]
    save_file({"prefix": kv}, str(old), metadata=metadata)
    loaded = PrefixTuning.load_prefix(tiny_model(), old)
    torch.testing.assert_close(loaded.prefix_encoder.kv, tuned.prefix_encoder.kv, rtol=0, atol=0)


def test_init_from_text_uses_the_models_own_keys_and_values():
    model = tiny_model()
    plain = copy.deepcopy(model)
    text = torch.randint(1, VOCAB, (1, P), generator=torch.Generator().manual_seed(5))
    tuned = PrefixTuning(model, P, num_tasks=2, init_text_ids=text)
    assert isinstance(tuned.prefix_encoder, PrefixKV) and tuned.prefix_encoder.kv.requires_grad
    cache = plain(input_ids=text, use_cache=True).past_key_values
    for layer, (k, v) in enumerate(tuned.prefix_kv()):
        assert_close(k[1], cache.layers[layer].keys[0].transpose(0, 1), tol=1e-6, what=f"layer {layer} keys")
        assert_close(v[0], cache.layers[layer].values[0].transpose(0, 1), tol=1e-6, what=f"layer {layer} values")
    # So the model behind this prefix continues the text: logits equal the plain model's on [text; ids].
    ids, _ = make_batch()
    with torch.no_grad():
        got = tuned(ids, prefix_idx=torch.tensor([0, 1, 1])).logits
        want = plain(input_ids=torch.cat([text.expand(3, -1), ids], 1)).logits[:, P:]
    assert_close(got, want, tol=1e-5, what="logits")


def test_positions_start_at_p_and_too_long_inputs_raise():
    tuned = PrefixTuning(tiny_model(), P)
    tuned(torch.randint(1, VOCAB, (1, 64 - P)))  # P + L = n_positions fits
    with pytest.raises(ValueError, match="n_positions=64"):
        tuned(torch.randint(1, VOCAB, (1, 64 - P + 1)))
    with pytest.raises(ValueError, match="n_positions=64"):
        tuned.generate(torch.randint(1, VOCAB, (1, 50)), max_new_tokens=20)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_too_long_generation_raises_for_every_cache(cache_implementation):
    """Regression (transformers 5.24 hands generate's cache over as cache=, not past_key_values=): the
    position check saw no cache and an IndexError from the position table came instead of this error."""
    tuned = PrefixTuning(tiny_model(), P, num_tasks=2)
    ids = torch.randint(1, VOCAB, (2, 50))
    kwargs = {} if cache_implementation is None else {"cache_implementation": cache_implementation}
    tuned.generate(ids, prefix_idx=1, max_new_tokens=64 - P - 50 + 1, do_sample=False, **kwargs)  # fits exactly
    with pytest.raises(ValueError, match="n_positions=64"):
        tuned.generate(ids, prefix_idx=1, max_new_tokens=20, do_sample=False, **kwargs)


def test_a_cached_forward_that_outgrows_the_positions_raises():
    tuned = PrefixTuning(tiny_model(), P)
    ids = torch.randint(1, VOCAB, (1, 64 - P - 2))
    with torch.no_grad():
        cache = tuned(ids, use_cache=True).past_key_values
        tuned(ids[:, :2], past_key_values=copy.deepcopy(cache))  # P + past + 2 = 64 fits
    with pytest.raises(ValueError, match=f"{ids.shape[1]} positions already cached"), torch.no_grad():
        tuned(ids[:, :3], past_key_values=cache)


def test_the_cache_is_read_under_either_keyword():
    from transformers import DynamicCache

    from prefix_attn.integrations._routing import cache_argument

    cache = DynamicCache()
    assert cache_argument({"cache": cache}) is cache
    assert cache_argument({"past_key_values": cache, "cache": None}) is cache
    assert cache_argument({}) is None
    with pytest.raises(ValueError, match="not both"):
        cache_argument({"cache": cache, "past_key_values": DynamicCache()})


def test_bad_prefix_idx_raises():
    tuned = PrefixTuning(tiny_model(), P, num_tasks=2)
    ids, _ = make_batch()
    for bad, match in [(torch.tensor([0, 2, 1]), r"in \[0, 2\)"), (torch.tensor([0, -1, 1]), r"in \[0, 2\)"),
                       (torch.tensor([0, 1]), r"shape \(batch,\)"), (torch.tensor([0.0, 1.0, 1.0]), "integer"),
                       ("0", "integer")]:
        with pytest.raises(ValueError, match=match):
            tuned(ids, prefix_idx=bad)
        with pytest.raises(ValueError, match=match):
            tuned.generate(ids, prefix_idx=bad, max_new_tokens=2)
    assert tuned(ids, prefix_idx=1).logits.shape == (*ids.shape, VOCAB)  # an int: every row's task
    one = PrefixTuning(tiny_model(), P)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        one(ids, prefix_idx=torch.tensor([0, 1, 0]))


def test_bad_construction_leaves_the_model_unchanged():
    model = tiny_model()
    ids = torch.zeros(1, P, dtype=torch.long)
    cases = [(dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive int"),
             (dict(num_virtual_tokens=64), "leaves no position"),
             (dict(num_virtual_tokens=P, num_tasks=0), "num_tasks must be a positive int"),
             (dict(num_virtual_tokens=P, projection_dim=0), "projection_dim must be a positive int"),
             (dict(num_virtual_tokens=P, init_text_ids=torch.zeros(1, P + 1, dtype=torch.long)), "of shape"),
             (dict(num_virtual_tokens=P, init_text_ids=ids.float()), "integer token ids"),
             (dict(num_virtual_tokens=P, init_text_ids=ids + VOCAB), "outside the vocabulary"),
             (dict(num_virtual_tokens=P, projection_dim=8, init_text_ids=ids), "projection_dim=None")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            PrefixTuning(model, **kwargs)
        assert model.config._attn_implementation == "eager" and all(p.requires_grad for p in model.parameters())
    mistral = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                               sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window"):
        PrefixTuning(mistral, P)
    assert all(p.requires_grad for p in mistral.parameters())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        PrefixTuning(torch.nn.Linear(2, 2), P)


def test_a_reverted_model_is_refused_not_silently_wrong():
    """Another attention function would ignore the prefix: forward and generate raise instead."""
    from prefix_attn import apply_prefix_attn_to_gpt2, revert_prefix_attn_to_gpt2

    tuned = PrefixTuning(tiny_model(), P)
    ids, _ = make_batch()
    revert_prefix_attn_to_gpt2(tuned.model)
    assert tuned.model.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="would ignore the prefix"):
        tuned(ids)
    with pytest.raises(RuntimeError, match="would ignore the prefix"):
        tuned.generate(ids, max_new_tokens=2)
    apply_prefix_attn_to_gpt2(tuned.model)
    assert tuned(ids).logits.shape == (*ids.shape, VOCAB)


def test_state_dict_holds_only_the_prefix():
    tuned = randomise(PrefixTuning(tiny_model(), P, num_tasks=2, projection_dim=8))
    state = tuned.state_dict()
    assert set(state) == {f"prefix_encoder.{n}" for n in ("embedding", "w1", "b1", "w2", "b2")}
    fresh = PrefixTuning(tiny_model(), P, num_tasks=2, projection_dim=8)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values()))
    with pytest.raises(RuntimeError, match="Unexpected"):
        fresh.load_state_dict({**state, "model.lm_head.weight": torch.zeros(1)})
    result = fresh.load_state_dict({**state, "model.lm_head.weight": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["model.lm_head.weight"] and result.missing_keys == []
    # wrapped (as DDP does) the keys gain the wrapper's prefix
    assert set(torch.nn.ModuleDict({"m": tuned}).state_dict()) == {f"m.{k}" for k in state}


@pytest.mark.parametrize("cls", [GPT2DoubleHeadsModel, GPT2ForSequenceClassification])
def test_other_gpt2_heads(cls):
    tuned = randomise(PrefixTuning(tiny_model(cls), P, num_tasks=2))
    ids, mask = make_batch("left")
    prefix_idx = torch.tensor([1, 0, 1])
    out = tuned(ids, attention_mask=mask, prefix_idx=prefix_idx)
    logits = out.mc_logits if cls is GPT2DoubleHeadsModel else out.logits
    logits.sum().backward()
    assert tuned.prefix_encoder.kv.grad.abs().sum() > 0
    alone = tuned(ids[2:], attention_mask=mask[2:], prefix_idx=prefix_idx[2:])
    alone_logits = alone.mc_logits if cls is GPT2DoubleHeadsModel else alone.logits
    assert_close(alone_logits, logits[2:].detach(), what="row alone")
    if cls is GPT2ForSequenceClassification:
        with pytest.raises(TypeError, match="cannot generate"):
            tuned.generate(ids)


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_gradient_checkpointing(monkeypatch, projection_dim):
    """Same gradients with checkpointing (use_reentrant=False), attention dropout included: the
    recomputation replays the same dropout mask. The op is called twice per layer: it did recompute."""
    spy = OpSpy(monkeypatch)
    tuned = randomise(PrefixTuning(tiny_model(attn_pdrop=0.2), P, num_tasks=2, projection_dim=projection_dim),
                      scale=0.5)
    checkpointed = copy.deepcopy(tuned)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.model.transformer.gradient_checkpointing
    ids, mask = make_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    grads, calls = [], []
    for model in (tuned, checkpointed):
        model.train()
        torch.manual_seed(3)
        spy.calls.clear()
        loss = model(ids, attention_mask=mask, labels=labels, prefix_idx=torch.tensor([1, 0, 1])).loss
        grads.append(torch.autograd.grad(loss, list(model.prefix_encoder.parameters())))
        calls.append(len(spy.calls))
    assert calls == [2, 4]
    for got, want in zip(*grads):
        assert_close(got, want, tol=1e-6, what="gradient under checkpointing")
    with pytest.raises(ValueError, match="use_reentrant=False"):
        tuned.gradient_checkpointing_enable({"use_reentrant": True})
    checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.model.transformer.gradient_checkpointing


def test_importing_the_native_route_does_not_import_peft():
    code = ("import sys, prefix_attn; prefix_attn.PrefixTuning; prefix_attn.apply_prefix_attn_to_gpt2; "
            "assert 'peft' not in sys.modules, 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefix_mlp_layout_matches_peft_encoder():
    """PrefixMLP's flattened output per token is PEFT's (n_layer, 2, H, D) layout, task by task."""
    mlp = PrefixMLP(2, 2, P, 2, 16, projection_dim=8)
    kv = mlp()
    assert kv.shape == (2, 2, 2, P, 2, 16)
    task = 1
    flat = torch.tanh(mlp.embedding[task] @ mlp.w1[task] + mlp.b1[task]) @ mlp.w2[task] + mlp.b2[task]
    as_peft = flat.view(P, 2 * 2, 2, 16)  # PEFT: entry 2l = layer l keys, 2l + 1 = its values
    for layer in range(2):
        assert_close(kv[task, layer, 0], as_peft[:, 2 * layer], tol=1e-6)
        assert_close(kv[task, layer, 1], as_peft[:, 2 * layer + 1], tol=1e-6)
