"""Mask functions that transformers cannot resolve while torch.compile / torch.export trace.

Without an attention_mask and without a cache (a training forward), transformers looks for packed
sequences (position_ids that restart within a row). Eagerly it reads position_ids on the host and
hands over plain causal_mask_function when nothing is packed. While tracing it cannot read them
(export and fullgraph forbid it), so it always hands over causal AND a packed-sequence mask
function over a device tensor: the pattern is decided by data only at run time.

The kernel expresses causal attention with a key mask; it cannot separate packed sequences. Rather
than ignore the handed-over function (a silent wrong result when the batch is packed), the traced
graph evaluates it on the device, over (batch, q, kv) as SDPA's mask would be built, and asserts
with ``torch._assert_async`` that it equals plain causal attention: nothing is read on the host, so
fullgraph compilation and export keep working, and a packed batch fails at run time (RuntimeError on
CPU; a device-side assertion on CUDA) instead of giving wrong logits.
"""
import torch

PACKED_SEQUENCES_ERROR = (
    "attn_implementation='prefix_attn' supports causal attention with a padding mask only; this batch's "
    "position_ids restart within a row (packed sequences) or an added mask function masks more than causal "
    "attention")


def assert_plain_causal_on_device(mask_function, batch_size: int, q_length: int, kv_length: int, q_offset,
                                  kv_offset: int, device) -> None:
    """Add to the traced graph a device-side check that ``mask_function`` (transformers' signature
    (batch_idx, head_idx, q_idx, kv_idx) -> bool, vectorised by broadcasting) equals causal
    attention (kv_idx <= q_idx) over the whole (batch, q, kv) grid. Costs batch * q * kv booleans
    once per forward (not per layer), as SDPA's own mask for this case."""
    batch_idx = torch.arange(batch_size, device=device).view(-1, 1, 1)
    head_idx = torch.zeros((), dtype=torch.long, device=device)
    q_idx = (torch.arange(q_length, device=device) + q_offset).view(1, -1, 1)
    kv_idx = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, -1)
    given = mask_function(batch_idx, head_idx, q_idx, kv_idx)
    torch._assert_async(torch.all(given == (kv_idx <= q_idx)), PACKED_SEQUENCES_ERROR)
