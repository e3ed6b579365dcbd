"""The GPU suite's report prints each measured time beside the time model's prediction and their ratio, so the
first GPU run calibrates the model's efficiency classes (here with a made-up measurement: no GPU needed)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_bench  # noqa: E402


def test_report_prints_measured_beside_predicted_with_the_ratio(capsys):
    measured = {"section": "logprob", "workload": "W-logprob-H2048", "provider": "triton", "mode": "fwd+bwd",
                "ms": 231.0, "predicted_ms": 154.0, "measured_vs_predicted": 231.0 / 154.0, "ideal_ms": 88.4,
                "peak_MiB": 40.5}
    model = {"workload": "W-logprob-H2048", "op": "linear_logprobs fwd+bwd", "device": "H100", "predicted_ms": 126.5,
             "ideal_ms": 87.4, "predicted_time_ms": 154.34, "ideal_time_ms": 88.37}
    gpu_bench.print_table({"sections": {"logprob": {"rows": [measured]}, "model": {"rows": [model]}}})
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("section"))
    row = next(line for line in lines if line.startswith("logprob"))
    cells = row.split()
    names = header.split()
    assert float(cells[names.index("ms")]) == 231.0
    assert float(cells[names.index("predicted_ms")]) == 154.0
    assert float(cells[names.index("measured_vs_predicted")]) == 1.5  # 231 / 154, printed to 4 digits
    model_line = next(line for line in lines if line.startswith("[model]"))
    assert "predicted time 154.3 ms" in model_line and "ideal 88.37 ms" in model_line
