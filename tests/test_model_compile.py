"""Whole-model compilation of a patched GPT-2 (the other way users remove host cost): torch.compile
(default and fullgraph=True) and torch.export give the logits of eager execution. CPU, torch backend,
aot_eager: what is checked is tracing through the integration, not generated code."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prefix_attn import apply_prefix_attn_to_gpt2
from tests.helpers import VOCAB, make_batch


def patched_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return apply_prefix_attn_to_gpt2(GPT2LMHeadModel(config).eval())


def assert_compiled_equals_eager(model, fullgraph, ids, **kwargs):
    """torch.compile(model) (aot_eager) gives eager's logits on ids, with use_cache=False."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, use_cache=False, **kwargs).logits
        want = model(ids, use_cache=False, **kwargs).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_model_with_a_padding_mask_equals_eager(fullgraph):
    """Regression: bool(attention_mask.all()) in the mask function stopped fullgraph compilation."""
    ids, mask = make_batch("left")
    assert_compiled_equals_eager(patched_gpt2(), fullgraph, ids, attention_mask=mask)


def test_exported_model_equals_eager():
    model = patched_gpt2()
    ids, mask = make_batch("left")
    program = torch.export.export(model, (ids,), {"attention_mask": mask, "use_cache": False})
    with torch.no_grad():
        got = program.module()(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_model_without_a_mask_equals_eager(fullgraph):
    """Regression: without an attention_mask, transformers cannot rule out packed sequences while
    tracing and hands over its packed-sequence mask function; that was refused (ValueError). It is
    now checked on the device, and a batch that is not packed runs compiled."""
    ids, _ = make_batch()
    assert_compiled_equals_eager(patched_gpt2(), fullgraph, ids)


def test_exported_model_without_a_mask_equals_eager_and_refuses_packed_rows():
    model = patched_gpt2()
    ids, _ = make_batch()
    program = torch.export.export(model, (ids,), {"use_cache": False})
    with torch.no_grad():
        got = program.module()(ids, use_cache=False).logits
        want = model(ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    positions[0, 4:] -= 4  # row 0 packs two sequences: the kernel cannot express that
    exported = torch.export.export(model, (ids,), {"position_ids": positions, "use_cache": False})
    with torch.no_grad(), pytest.raises(RuntimeError, match="packed sequences"):
        exported.module()(ids, position_ids=positions, use_cache=False)


def test_compiled_packed_rows_are_refused_at_run_time():
    """A packed batch traced without a mask: the device-side check fails the call (never silent)."""
    torch._dynamo.reset()
    model = patched_gpt2()
    ids, _ = make_batch()
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(ids, position_ids=positions, use_cache=False)
        positions[1, 3:] -= 3
        with pytest.raises(RuntimeError, match="packed sequences"):
            compiled(ids, position_ids=positions, use_cache=False)
        with pytest.raises(ValueError, match="packed sequences"):  # eagerly, transformers finds the packing
            model(ids, position_ids=positions, use_cache=False)


def test_compiled_llama_without_a_mask_equals_eager():
    """The generic patch on a grouped-heads Llama: fullgraph compile without a mask (the traced
    packed-sequence check) gives eager's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefix_attn import apply_prefix_attn

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    ids, _ = make_batch()
    assert_compiled_equals_eager(apply_prefix_attn(LlamaForCausalLM(config).eval()), True, ids)
