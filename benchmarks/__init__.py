"""The prefix-attn benchmark suite: ``python -m benchmarks [--quick] [--out DIR] [--only NAME]``."""
