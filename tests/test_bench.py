"""The benchmarks run (tiny sizes, CPU): a figure in the README comes from a script that works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "bench_logprobs.py": (["--N", "64", "--V", "1000", "--reps", "1"], "| F.cross_entropy(reduction='none') |"),
    "bench_gae.py": (["--B", "4", "--T", "16", "--reps", "1"], "| Python loop over T |"),
    "bench_dpo_step.py": (["--pairs", "1", "--prompt-len", "8", "--response-len", "8", "--reps", "1"],
                          "| plain PyTorch, reference forward each step |"),
    "bench_generate.py": (["--batch", "2", "--new-tokens", "4", "--reps", "1"], "speed-up from the cache"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_prints_its_table(script):
    args, expected = CASES[script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.startswith("machine: CPU ") and expected in result.stdout
    if script == "bench_dpo_step.py":  # the external TRL figure belongs to the default shape only
        assert "TRL" not in result.stdout


@pytest.mark.parametrize("script", ["bench_logprobs", "bench_gae", "bench_generate"])
def test_a_device_that_is_not_there_is_refused_naming_the_flag(script, capsys, monkeypatch):
    import importlib

    import torch

    from minalign.cli import parse_args

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, says in (("cuda:x", "--device 'cuda:x': must be auto, cpu, cuda or cuda:N"),
                         ("cuda", "--device cuda: no CUDA device is available")):
        with pytest.raises(SystemExit) as stop:
            parse_args(bench.Args, ["--device", device])
        assert stop.value.code == 2 and says in capsys.readouterr().err
    assert parse_args(bench.Args, []).device == "cpu"
