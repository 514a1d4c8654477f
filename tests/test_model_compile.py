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


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_model_with_a_padding_mask_equals_eager(fullgraph):
    """Regression: bool(attention_mask.all()) in the mask function stopped fullgraph compilation."""
    torch._dynamo.reset()
    model = patched_gpt2()
    ids, mask = make_batch("left")
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_exported_model_equals_eager():
    model = patched_gpt2()
    ids, mask = make_batch("left")
    program = torch.export.export(model, (ids,), {"attention_mask": mask, "use_cache": False})
    with torch.no_grad():
        got = program.module()(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_compiling_without_a_mask_is_refused_clearly():
    """Known limit: without an attention_mask, transformers cannot rule out packed sequences while
    tracing and hands over its packed-sequence mask function, which the kernel cannot express; the
    integration refuses it rather than ignore it. Passing the (all-ones) mask avoids it."""
    torch._dynamo.reset()
    model = patched_gpt2()
    ids, _ = make_batch()
    with pytest.raises(Exception) as info:  # noqa: PT011 (dynamo may wrap the ValueError)
        torch.compile(model, backend="aot_eager")(ids, use_cache=False)
    text = f"{info.value} {info.value.__cause__!r}"
    assert "packed sequences" in text, text
