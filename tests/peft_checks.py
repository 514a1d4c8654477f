"""PEFT as the oracle of a training step: one step's loss, logits and prompt-encoder gradients, and
their comparison (tests/test_peft_integration.py, tests/test_llama_family.py)."""
from prefix_attn.reference import prefix_attn_ref


def run(model, ids, mask, **kwargs):
    """loss, logits at real tokens, and the gradient of every prompt-encoder parameter."""
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.prompt_encoder.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return out.loss.detach(), out.logits.detach()[mask.bool()], grads


def assert_close(got, ref, tol, what):
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def assert_runs_equal(got, ref, tol):
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = got, ref
    assert_close(loss, ref_loss, tol, "loss")
    assert_close(logits, ref_logits, tol, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], tol, f"grad {name}")


def reference_op(*args, backend=None, **kwargs):
    """prefix_attn_func computed by the float64-capable reference (swapped in for the op by tests)."""
    return prefix_attn_ref(*args, **kwargs)
