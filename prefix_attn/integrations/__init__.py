"""Integrations of the fused op with Hugging Face transformers and PEFT (GPT-2, Llama, Mistral, Qwen2, ...).

- ``hf_attention``: the attention and mask functions registered with transformers, and
  ``apply_prefix_attn`` / ``revert_prefix_attn`` for any decoder whose attention goes through
  transformers' AttentionInterface.
- ``gpt2``: ``apply_prefix_attn_to_gpt2`` / ``revert_prefix_attn_to_gpt2``, the same restricted to GPT-2.
- ``peft``: ``apply_prefix_attn_to_peft`` / ``revert_prefix_attn_to_peft`` for a PEFT prefix-tuning model (needs
  ``pip install prefix-attn[peft]``; peft is imported only there).
- ``prefix_tuning``: ``PrefixTuning``, prefix tuning without PEFT (several tasks in one batch).

Nothing is imported here, so that importing one route never imports another's dependencies.
"""
