"""benchmarks.readme_table: every table quotes one measurement per point (issue 11: the targets
table and the op table quoted two records of the same point, 249/187 against 250/185 TFLOP/s)."""
import json
import re

from benchmarks import readme_table


def _record(bench, provider, mode, tflops, kernel_ms, P):
    return dict(bench=bench, provider=provider, mode=mode, B=8, H=12, L=1024, P=P, D=64, kernel_ms=kernel_ms,
                kernel_tflops=tflops, tflops=tflops, ms_p50=kernel_ms, peak_mem_mb=10.0)


def _write_run(tmp_path, records):
    run = tmp_path / "results" / "NVIDIA_H100_80GB_HBM3" / "run"
    run.mkdir(parents=True)
    environment = dict(device="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6", commit="abc", interpreter=False)
    (run / "results.json").write_text(json.dumps(dict(environment=environment, records=records)))
    return tmp_path / "results"


def _figures(section):
    targets = {m: float(x) for m, x in re.findall(r"\| (fwd|bwd) >= \d+ TFLOP/s at L = 1024.*?\| (\d+) TFLOP/s \|",
                                                  section)}
    op = {m: float(x) for m, x in re.findall(r"\| 8, 12, 1024, 10 \| (fwd|bwd) \| [^|]+ \| (\d+) \|", section)}
    return targets, op


def test_a_point_measured_by_two_sweeps_is_quoted_once(tmp_path):
    records = []
    for bench, fwd, bwd in (("attn_vs_P", 249.0, 187.0), ("attn_vs_L", 250.0, 185.0)):
        for P in (0, 10):
            records += [_record(bench, "prefix_attn", "fwd", fwd, 0.05, P),
                        _record(bench, "prefix_attn", "bwd", bwd, 0.18, P),
                        _record(bench, "concat_sdpa", "fwd", 100.0, 0.19, P),
                        _record(bench, "concat_sdpa", "bwd", 90.0, 0.28, P)]
    section = readme_table.render(str(_write_run(tmp_path, records)))
    targets, op = _figures(section)
    assert targets == op == {"fwd": 249.0, "bwd": 187.0}, section


def test_committed_readme_quotes_one_figure_per_point():
    with open(readme_table.os.path.join(readme_table.ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index(readme_table.BEGIN):text.index(readme_table.END)]
    targets, op = _figures(section)
    assert set(targets) == {"fwd", "bwd"} and targets == op, (targets, op)
    assert readme_table.main(["--check"]) == 0
