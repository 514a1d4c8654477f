"""A small forward + backward of every kernel, for compute-sanitizer (memcheck) on a GPU."""
import torch

from prefix_attn import prefix_attn_func
from prefix_attn.triton_launch import dropout_keep_mask_triton


def main():
    torch.manual_seed(0)
    dev = "cuda"
    B, L, H, D, T, P = 3, 77, 2, 40, 3, 19
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        pk, pv = (torch.randn(T, P, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        idx = torch.tensor([2, 0, 2], device=dev)
        lens = torch.tensor([19, 5, 11], device=dev)
        mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        mask[1, :9] = False
        out, lse = prefix_attn_func(q, k, v, pk, pv, prefix_idx=idx, prefix_lens=lens, attention_mask=mask,
                                    dropout_p=0.1, return_lse=True)
        (out.float().sum() + lse.sum()).backward()
        out = prefix_attn_func(q[:, -1:], k, v, pk[0], pv[0], causal=True)  # decode path
        out.float().sum().backward()
        with torch.no_grad():  # decode path with a bank, prefix_lens and padding
            prefix_attn_func(q[:, -2:], k, v, pk, pv, prefix_idx=idx, prefix_lens=lens, attention_mask=mask)
        # Grouped heads (6 query heads over the 2 KV heads): the backward's separate dK/dV and dQ
        # programs, and the decode kernel's stacked heads.
        qg = torch.randn(B, L, 3 * H, D, device=dev, dtype=dtype, requires_grad=True)
        out = prefix_attn_func(qg, k, v, pk, pv, prefix_idx=idx, prefix_lens=lens, attention_mask=mask, dropout_p=0.1)
        out.float().sum().backward()
        with torch.no_grad():
            prefix_attn_func(qg[:, -1:], k, v, pk[0], pv[0])
    dropout_keep_mask_triton(torch.tensor([1, 2], device=dev), B, H, L, P, L, 0.2)
    torch.cuda.synchronize()
    print("sanitize_small: done")


if __name__ == "__main__":
    main()
