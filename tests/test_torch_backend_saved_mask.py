"""The torch backend's dropout keep-mask: drawn once per call on CPU, kept bit-packed for the backward
(prefix_attn.torch_backend._SAVED_KEEP), and the backward's gradients are those of a mask drawn again."""
import gc

import pytest
import torch

from prefix_attn import prefix_attn_func, torch_backend
from tests.helpers import Case, PathSpy, make_inputs

CASES = [Case(P=10, B=2, Lq=13, Lk=13), Case(P=9, T=3, B=4, Lq=7, Lk=11, prefix_lens=True, mask="left"),
         Case(P=0, B=1, Lq=5, Lk=9, mask="holes"), Case(P=6, B=2, Lq=9, Lk=9, strided=True)]


def _grads(case, forget_saved_masks: bool):
    tensors, kwargs = make_inputs(case, torch.float32)
    torch.manual_seed(7)
    out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.3, backend="torch")
    if forget_saved_masks:
        torch_backend._SAVED_KEEP.clear()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    names = [n for n, t in tensors.items() if t.requires_grad]
    grads = torch.autograd.grad(out, [tensors[n] for n in names], grad)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("chunk_elements", [None, 64], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_from_the_saved_mask_equals_a_redrawn_mask(monkeypatch, case, chunk_elements):
    if chunk_elements is not None:  # several query chunks, each saving its own mask
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk_elements)
    spy = PathSpy(monkeypatch, ("keep_mask_grid",))
    out_saved, saved = _grads(case, forget_saved_masks=False)
    draws_saved = len(spy.ran)
    spy.ran.clear()
    out_drawn, drawn = _grads(case, forget_saved_masks=True)
    rows_per_chunk = max(1, min(case.Lq, torch_backend.CHUNK_ELEMENTS // (case.B * case.H * (case.P + case.Lk))))
    chunks = -(-case.Lq // rows_per_chunk)
    assert (chunks > 1) == (chunk_elements is not None)
    assert draws_saved == chunks  # forward only: the backward read the saved masks
    assert len(spy.ran) == 2 * chunks  # forward, then backward again after the saved masks were dropped
    assert torch.equal(out_saved, out_drawn)
    for name in saved:
        assert torch.equal(saved[name], drawn[name]), name


def test_saved_masks_go_with_the_graph():
    tensors, kwargs = make_inputs(Case(P=4, B=2, Lq=6, Lk=6), torch.float32)
    gc.collect()
    before = len(torch_backend._SAVED_KEEP)
    out = prefix_attn_func(**tensors, **kwargs, dropout_p=0.5, backend="torch")
    assert len(torch_backend._SAVED_KEEP) == before + 1
    out.sum().backward()  # the graph and its rng_state are freed with it
    assert len(torch_backend._SAVED_KEEP) == before
    with torch.no_grad():  # a forward without a graph keeps nothing once its outputs are gone
        prefix_attn_func(**tensors, **kwargs, dropout_p=0.5, backend="torch")
    gc.collect()
    assert len(torch_backend._SAVED_KEEP) == before
