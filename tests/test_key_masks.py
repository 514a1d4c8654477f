"""The torch backend's masks derived from a CPU attention_mask are computed once per mask (prefix_attn.key_masks),
not in every layer call: a mask whose values change (an in-place write, a refilled inference-mode buffer), a new
mask each get masks of their own; masks derived under inference mode serve later training calls. Oracle: the float64 reference."""
import pytest
import torch

from prefix_attn import key_masks, prefix_attn_func
from prefix_attn.api import causal_attention_heads_first
from prefix_attn.reference import prefix_attn_ref
from tests.helpers import ATOL

B, H, D, P = 3, 2, 16, 5


def _inputs(seqlen_q, seqlen_k, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for n in (seqlen_q, seqlen_k, seqlen_k))
    prefix_k, prefix_v = (torch.randn(P, H, D, generator=g) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v, prefix_k, prefix_v)]


def _entry(q, k, v, prefix_k, prefix_v, mask, dropout_p=0.0):
    """The integrations' layer call (heads-first tensors, the torch backend's CPU paths)."""
    return causal_attention_heads_first(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prefix_k, prefix_v,
                                        None, mask, None, dropout_p)


def _reference(q, k, v, prefix_k, prefix_v, mask):
    return prefix_attn_ref(*(x.detach().double() for x in (q, k, v, prefix_k, prefix_v)), attention_mask=mask).float()


def _assert_matches_reference(out, tensors, mask):
    torch.testing.assert_close(out, _reference(*tensors, mask), atol=ATOL[torch.float32], rtol=1e-5)


def _left_padded(seqlen_k):
    mask = torch.ones(B, seqlen_k, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return mask


class _Derivations:
    """Counts the derivations of a path's mask: the fused path's own-key mask (key_masks._own_key_mask), or the
    visible keys (read by key_masks.lets_every_key_through), which a small decoding call, run in C, reads."""

    def __init__(self, monkeypatch, derivation="_own_key_mask"):
        self.count = 0
        real = getattr(key_masks, derivation)

        def counted(*args):
            self.count += 1
            return real(*args)

        monkeypatch.setattr(key_masks, derivation, counted)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 11), (4, 11), (9, 9)])  # decoding, bottom-right causal, prefill
def test_layer_calls_with_one_mask_derive_it_once(monkeypatch, seqlen_q, seqlen_k):
    """Layer calls with the same mask tensor (one forward of a model) derive its masks once, with results equal to
    the reference in every call; an in-place write to the mask and a new mask tensor each derive them again."""
    derivations = _Derivations(monkeypatch, "lets_every_key_through" if seqlen_q == 1 else "_own_key_mask")
    mask = _left_padded(seqlen_k)
    for layer in range(3):
        tensors = _inputs(seqlen_q, seqlen_k, seed=layer)
        with torch.no_grad():
            _assert_matches_reference(_entry(*tensors, mask), tensors, mask)
    assert derivations.count == 1

    mask[1, : seqlen_k - 1] = 0  # in place: row 1 now sees only its last key (and the prefix)
    tensors = _inputs(seqlen_q, seqlen_k, seed=7)
    with torch.no_grad():
        _assert_matches_reference(_entry(*tensors, mask), tensors, mask)
    assert derivations.count == 2

    other = _left_padded(seqlen_k).flip(1)  # a new tensor: right padding
    with torch.no_grad():
        _assert_matches_reference(_entry(*tensors, other), tensors, other)
    assert derivations.count == 3


def test_an_inference_mode_mask_buffer_refilled_in_place():
    """Inference tensors have no version counter: a mask buffer refilled in place under inference mode (a serving
    loop's) is compared by its values, and each fill gets its own masks."""
    tensors = _inputs(1, 9)
    with torch.inference_mode():
        mask = torch.ones(B, 9, dtype=torch.long)
        for row in range(B):
            mask.fill_(1)
            mask[row, :4] = 0
            _assert_matches_reference(_entry(*tensors, mask), tensors, mask)


def test_a_row_that_sees_only_the_prefix_after_an_in_place_write():
    """The rows that see no own key are found once per mask: after an in-place write makes one, its lse is -inf
    on the own keys' part (the output is the prefix slots' alone), as the reference gives."""
    tensors = _inputs(2, 8)
    mask = torch.ones(B, 8, dtype=torch.long)
    _assert_matches_reference(prefix_attn_func(*tensors, attention_mask=mask, backend="torch"), tensors, mask)
    mask[1] = 0
    _assert_matches_reference(prefix_attn_func(*tensors, attention_mask=mask, backend="torch"), tensors, mask)


def test_masks_derived_in_inference_mode_serve_a_later_training_call():
    """Masks derived inside inference mode are inference tensors; a training call with the same mask outside it
    reads them and saves none for its backward (which would raise), and its gradients are the reference's,
    double backward (the explicit path) included."""
    mask = _left_padded(6)
    with torch.inference_mode():
        _entry(*_inputs(6, 6), mask)
    tensors = _inputs(6, 6, requires_grad=True)
    out = _entry(*tensors, mask)
    grads = torch.autograd.grad(out.square().sum(), tensors, create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in grads), tensors[0])  # second order: no inference tensor saved
    ref_tensors = [x.detach().double().requires_grad_(True) for x in tensors]
    ref = prefix_attn_ref(*ref_tensors, attention_mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_tensors)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_training_layer_calls_with_one_mask_derive_it_once(monkeypatch, dropout_p):
    """Forward and backward of training layer calls with one padded mask: the fused path derives the own-key mask
    once for all of them (the backward finds it too), the dropout path its bias row once; the outputs and
    gradients equal the public function's on the same inputs with a fresh copy of the mask."""
    derivations = _Derivations(monkeypatch)
    mask = _left_padded(7)
    results = []
    for layer in range(3):
        tensors = _inputs(7, 7, requires_grad=True, seed=layer)
        torch.manual_seed(layer)
        out = _entry(*tensors, mask, dropout_p)
        results.append((tensors, out, torch.autograd.grad(out.square().sum(), tensors)))
    assert derivations.count == (0 if dropout_p else 1)
    assert key_masks._latest[0] is mask
    assert list(key_masks._latest[2]) == [("visible",), ("dropout", P) if dropout_p else ("own", True, 7, 7, torch.float32)]
    for layer, (tensors, out, grads) in enumerate(results):
        copies = [x.detach().clone().requires_grad_(True) for x in tensors]
        torch.manual_seed(layer)
        expected = prefix_attn_func(*copies, attention_mask=mask.clone(), dropout_p=dropout_p, backend="torch")
        assert torch.equal(out, expected)
        for g, e in zip(grads, torch.autograd.grad(expected.square().sum(), copies)):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
