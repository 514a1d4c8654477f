"""Log-sum-exp merge of partial attentions over disjoint key sets."""
import torch


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                      lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over key set A and over key set B into attention over A and B.

    Args:
        out_a, out_b: (batch, seqlen, heads, head_dim), each normalised over its own keys.
        lse_a, lse_b: (batch, heads, seqlen), natural-log sum of exp of each part's scores;
            -inf marks an empty part (its out is ignored).
    Returns:
        (out (batch, seqlen, heads, head_dim) in out_a's dtype, lse (batch, heads, seqlen) fp32, or
        fp64 for fp64 inputs). Both parts empty gives zeros and -inf. Differentiable; computed in
        fp32 at least.
    """
    for name, x in (("out_a", out_a), ("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if out_a.dim() != 4 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must be equal (batch, seqlen, heads, head_dim), got "
                         f"{tuple(out_a.shape)} and {tuple(out_b.shape)}")
    B, L, H, _ = out_a.shape
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if x.shape != (B, H, L):
            raise ValueError(f"{name} must be (batch, heads, seqlen) = ({B}, {H}, {L}), got {tuple(x.shape)}")
    acc = torch.promote_types(torch.promote_types(out_a.dtype, lse_a.dtype), torch.float32)  # fp32 at least
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    # Written out rather than logaddexp so that empty parts (-inf) give finite gradients too.
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e_a, e_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = e_a + e_b
    nonempty = total > 0
    total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, m + torch.log(total), torch.full_like(m, float("-inf")))
    w_a = (e_a / total).transpose(1, 2)[..., None]
    w_b = (e_b / total).transpose(1, 2)[..., None]
    out = w_a * out_a.to(acc) + w_b * out_b.to(acc)
    return out.to(out_a.dtype), lse
