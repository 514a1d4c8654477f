"""prefix-attn: fused attention over a shared prefix-tuning prefix and each sequence's own keys.

Public API: ``prefix_attn_func``, ``merge_attn_states``, the reference ``prefix_attn.reference.
prefix_attn_ref``; the transformers / PEFT integration (``apply_prefix_attn``,
``revert_prefix_attn``, the GPT-2 names ``apply_prefix_attn_to_gpt2`` / ``revert_prefix_attn_to_gpt2``,
``apply_prefix_attn_to_peft`` / ``revert_prefix_attn_to_peft``, ``PrefixTuning``) is imported on first
use, so that the op itself does not import transformers.
"""
from prefix_attn.api import prefix_attn_func
from prefix_attn.merge import merge_attn_states

__version__ = "0.1.0"

_INTEGRATION = {
    "apply_prefix_attn": "prefix_attn.integrations.hf_attention",
    "revert_prefix_attn": "prefix_attn.integrations.hf_attention",
    "apply_prefix_attn_to_gpt2": "prefix_attn.integrations.gpt2",
    "revert_prefix_attn_to_gpt2": "prefix_attn.integrations.gpt2",
    "apply_prefix_attn_to_peft": "prefix_attn.integrations.peft",
    "revert_prefix_attn_to_peft": "prefix_attn.integrations.peft",
    "PrefixTuning": "prefix_attn.integrations.prefix_tuning",
}


def __getattr__(name):
    if name in _INTEGRATION:
        import importlib

        return getattr(importlib.import_module(_INTEGRATION[name]), name)
    raise AttributeError(f"module 'prefix_attn' has no attribute {name!r}")


__all__ = ["prefix_attn_func", "merge_attn_states", *_INTEGRATION]
