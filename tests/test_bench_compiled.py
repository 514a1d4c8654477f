"""benchmarks: the compiled end-to-end modes (``python -m benchmarks --only graphs``), wired up on CPU.

On a GPU they run torch.compile(mode="reduce-overhead") (CUDA graphs); here the same code runs with dynamo's
eager backend on a tiny GPT-2, so that what a GPU session would run is known to compile and time every route
(the figures themselves are not performance figures)."""
import pytest
import torch

from benchmarks.bench_e2e import E2EShape, compiled_point, run_compiled

pytest.importorskip("peft")

ROUTES = ("peft_sdpa", "peft+patch", "native")


def test_compiled_training_step_times_every_route():
    records = list(compiled_point("graphs_train", "e2e_train", E2EShape("tiny", 2, 16, 4), ROUTES, "cpu",
                                  torch.float32, {"backend": "eager"}))
    assert [r["provider"] for r in records] == list(ROUTES)
    for r in records:
        assert r.get("skipped") is None, r
        assert r["mode"] == "train_step_compiled" and r["tokens_per_s"] > 0 and r["ms_p50"] > 0, r


def test_compiled_static_cache_generate_times_the_patched_routes():
    """generate() with a static cache and transformers' compiled decoding step. PEFT's own prefix tuning runs with
    a static cache under transformers 5.17 / PEFT 0.21.0, not under 5.25 / 0.21.2 (KeyError 'cache_position');
    its record then names the error instead of stopping the sweep."""
    records = list(compiled_point("graphs_generate", "e2e_generate", E2EShape("tiny", 2, 8, 4, new_tokens=4), ROUTES,
                                  "cpu", torch.float32, {"backend": "eager"}))
    by_route = {r["provider"]: r for r in records}
    assert list(by_route) == list(ROUTES)
    for route in ("peft+patch", "native"):
        r = by_route[route]
        assert r.get("skipped") is None, r
        assert r["mode"] == "generate_static_compiled" and r["tokens_per_s"] > 0, r
    peft = by_route["peft_sdpa"]
    assert peft.get("skipped") is None or peft["skipped"].split(":")[0].isidentifier(), peft  # an error named


def test_without_a_gpu_the_compiled_modes_say_skipped():
    records = list(run_compiled(True, "cpu"))
    assert records and all(r["skipped"] == "CUDA graphs need a GPU" for r in records)
    assert {r["bench"] for r in records} == {"graphs_train", "graphs_generate"}
