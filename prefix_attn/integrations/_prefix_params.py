"""The trainable parameters of PrefixTuning: the prefix itself, or the paper's reparameterisation.

Both modules return the whole prefix as one tensor kv of shape (T, n_layer, 2, P, Hkv, D): kv[t, l, 0]
are task t's keys at layer l, kv[t, l, 1] its values (Hkv: the model's key/value heads). Per-layer
(P, Hkv, D) or (T, P, Hkv, D) slices of it go to the fused op as strided views; autograd accumulates
their gradients into the parameters.
"""
import math

import torch
from torch import nn


class PrefixKV(nn.Module):
    """The prefix as a parameter: ``kv`` (T, n_layer, 2, P, Hkv, D), float32.

    Initialised N(0, init_std): keys near zero give the prefix slots near-uniform attention and
    values near zero, so training starts close to the frozen model.
    """

    def __init__(self, num_tasks: int, n_layer: int, num_virtual_tokens: int, heads: int, head_dim: int,
                 init_std: float = 0.02, device=None):
        super().__init__()
        shape = (num_tasks, n_layer, 2, num_virtual_tokens, heads, head_dim)
        self.kv = nn.Parameter(torch.randn(shape, device=device) * init_std)

    @classmethod
    def from_tensor(cls, kv: torch.Tensor) -> "PrefixKV":
        """A PrefixKV holding a copy of ``kv`` (T, n_layer, 2, P, Hkv, D) as float32."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.kv = nn.Parameter(kv.detach().to(torch.float32).contiguous().clone())
        return module

    def forward(self) -> torch.Tensor:
        return self.kv


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterisation, one independent network per task.

    Per task t: a smaller matrix ``embedding[t]`` (P, E) → Linear(E, E) → tanh → Linear(E, 2 * n_layer *
    d_kv), d_kv = Hkv * D (GPT-2's d_model), E = projection_dim (the hidden width equals
    projection_dim). Tasks share nothing, so a
    mixed batch trains each task as if alone. The flattened output of one virtual token is laid out
    (n_layer, 2, Hkv, D), PEFT's layout (its entry 2l holds layer l's keys, 2l + 1 its values).
    Parameters: embedding (T, P, E), w1 (T, E, E), b1 (T, 1, E), w2 (T, E, 2 * n_layer * d_kv),
    b2 (T, 1, 2 * n_layer * d_kv), float32; initialised as nn.Embedding (N(0, 1)) and nn.Linear
    (U(-1/sqrt(E), 1/sqrt(E))) are.
    """

    def __init__(self, num_tasks: int, n_layer: int, num_virtual_tokens: int, heads: int, head_dim: int,
                 projection_dim: int, device=None):
        super().__init__()
        self.shape = (n_layer, 2, heads, head_dim)
        out = 2 * n_layer * heads * head_dim
        bound = 1.0 / math.sqrt(projection_dim)

        def uniform(*shape):
            return nn.Parameter(torch.empty(shape, device=device).uniform_(-bound, bound))

        self.embedding = nn.Parameter(torch.randn(num_tasks, num_virtual_tokens, projection_dim, device=device))
        self.w1, self.b1 = uniform(num_tasks, projection_dim, projection_dim), uniform(num_tasks, 1, projection_dim)
        self.w2, self.b2 = uniform(num_tasks, projection_dim, out), uniform(num_tasks, 1, out)

    def forward(self) -> torch.Tensor:
        hidden = torch.tanh(torch.baddbmm(self.b1, self.embedding, self.w1))  # (T, P, E)
        flat = torch.baddbmm(self.b2, hidden, self.w2)  # (T, P, 2 * n_layer * d_kv)
        num_tasks, n_prefix = flat.shape[:2]
        # (T, P, n_layer, 2, Hkv, D) -> (T, n_layer, 2, P, Hkv, D): a view, no copy.
        return flat.view(num_tasks, n_prefix, *self.shape).permute(0, 2, 3, 1, 4, 5)
