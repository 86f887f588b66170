"""benchmarks/throughput.py --quick: the plain loop and ZeRO 0 and 2 through the real trainer path, results
files with provenance. Timings on a shared CI machine are noise: only their presence and sign are checked."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_quick_throughput_benchmark(tmp_path):
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or str(ROOT / ".cache" / "torch_extensions")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": cache}
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [json_file] = tmp_path.glob("*-throughput-*.json")
    [md_file] = tmp_path.glob("*-throughput-*.md")
    assert md_file.stem == json_file.stem
    result = json.loads(json_file.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert sorted(rows) == ["plain", "zero0", "zero2"]
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["tokens_per_second"] > 0 and row["ratio_to_plain"] > 0, row
        assert row["peak_memory_gib"] > 0 and len(row["tokens_per_second_per_rank"]) == 1
    assert rows["plain"]["ratio_to_plain"] == 1.0
    assert rows["zero0"]["zero_stage"] == 0 and rows["zero2"]["zero_stage"] == 2
    assert rows["zero2"]["optimizer"].startswith("DeepSpeedZeroOptimizer")  # the engine really ran ZeRO-2
    assert rows["zero2"]["ds_estimate"]["device_gib"] > 0
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert result["git_revision"].startswith(revision)
    markdown = md_file.read_text()
    assert f"git revision: `{result['git_revision']}`" in markdown
    assert "benchmarks/throughput.py --quick" in markdown and result["versions"]["deepspeed"] in markdown
    for name in rows:
        assert f"| {name} | 1 |" in markdown
    assert "| plain |" in proc.stdout  # the table on stdout
