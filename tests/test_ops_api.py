"""minalign.ops as a whole: under torch.compile, and without the extension."""

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minalign import ops, reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS), reason="no CUDA device or no CUDA kernels"))])
def test_torch_compile_fullgraph(device):
    def step(logits, labels, mask, rewards, values):
        out = ops.sequence_logprobs(logits, labels, mask, return_entropy=True)
        advantages, returns = ops.gae(rewards, values, mask)
        pg = ops.ppo_policy_loss(out.token_logps, out.token_logps.detach() - 0.1, advantages, mask)
        return pg.loss + 0.01 * out.entropy.sum(), returns

    B, T, V = 2, 6, 50
    logits = torch.randn(B, T, V).to(device)
    labels = torch.randint(0, V, (B, T)).to(device)
    mask = torch.ones(B, T, device=device)
    mask[1, 4:] = 0
    rewards, values = torch.randn(B, T).to(device), torch.randn(B, T).to(device)
    x_eager, x_compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, returns = step(x_eager, labels, mask, rewards, values)
    loss.backward()
    compiled = torch.compile(step, fullgraph=True)
    loss_c, returns_c = compiled(x_compiled, labels, mask, rewards, values)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(returns_c, returns)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


FALLBACK = """
import sys, warnings
sys.modules["minalign._C"] = None  # makes `from minalign import _C` fail as if it were not built
import torch
from minalign import ops, reference
assert not ops.HAS_EXTENSION
logits, labels = torch.randn(4, 9), torch.randint(0, 9, (4,))
mask = torch.ones(2, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = ops.token_logprobs(logits, labels)
    b = ops.token_logprobs(logits, labels)
    adv, ret = ops.gae(torch.ones(2, 3), torch.zeros(2, 3), mask)
assert [str(w.message) for w in caught if "minalign" in str(w.message)].__len__() == 1, caught
assert torch.equal(a, reference.token_logprobs(logits, labels)) and torch.equal(a, b)
assert torch.equal(adv, reference.gae(torch.ones(2, 3), torch.zeros(2, 3), mask).advantages)
# the same contract as the kernels': float32 out, the same refusals
x = torch.randn(3, dtype=torch.float64)
assert ops.dpo_loss(x, x - 1, x, x).losses.dtype == torch.float32
assert ops.ppo_value_loss(mask.double(), mask.double(), mask.double(), mask).loss.dtype == torch.float32
leaf = logits.clone().requires_grad_()
try:
    ops.weighted_logprob_sum(leaf, labels, torch.ones(4))
    raise AssertionError("a leaf was accepted")
except ValueError as error:
    assert "leaf" in str(error)
print("fallback ok")
"""


def test_fallback_to_reference_when_not_built():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", FALLBACK], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_reference_sequence_logprobs_is_consistent():
    # the spec itself: the sequence sum is the sum of the token log-probs under the mask
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    out = reference.sequence_logprobs(logits, labels, mask)
    full = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(out.sum_logps, (full * mask).sum(-1))
    torch.testing.assert_close(out.mean_logps, (full * mask).sum(-1) / mask.sum(-1))


def test_a_built_extension_imports():
    """A build that is there but fails to import (an ABI mismatch, a missing symbol) is an
    error, not a reason to skip every kernel test; no build at all is the reference's case."""
    built = [path for suffix in importlib.machinery.EXTENSION_SUFFIXES  # this Python's builds, not another's
             for path in sorted(Path(ops.__file__).parent.glob(f"_C{suffix}"))]
    if not built:
        pytest.skip("minalign._C is not built: the ops run the PyTorch reference")
    assert ops.HAS_EXTENSION, f"{built[0]} is there but did not import: {ops._IMPORT_ERROR}"


def test_the_extension_was_built_when_expected():
    """CI sets MINALIGN_EXPECT_EXTENSION (cpu or cuda) so that a broken build cannot pass
    as a run where every kernel test skipped."""
    expected = os.environ.get("MINALIGN_EXPECT_EXTENSION")
    if not expected:
        pytest.skip("MINALIGN_EXPECT_EXTENSION not set")
    assert ops.HAS_EXTENSION, "minalign._C did not import"
    if expected == "cuda":
        assert ops.HAS_CUDA_KERNELS, "minalign._C was built without its CUDA kernels"


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
def test_every_op_has_a_kernel_for_each_built_backend():
    # Each kernel file registers its own ops; a file left out of the build, or an op
    # left out of its TORCH_LIBRARY_IMPL, would otherwise show only on that device.
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("minalign::")]
    for op in ("token_logprobs", "token_logprobs_fused_", "dpo_loss", "ppo_policy_loss", "gae"):
        assert f"minalign::{op}" in names, names
    backends = ["CPU", "CUDA"] if ops.HAS_CUDA_KERNELS else ["CPU"]
    missing = [
        (name, key) for name in names for key in backends
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    ]
    assert not missing, missing


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects")
def test_extension_links_libstdcxx_dynamically():
    # A copy of libstdc++ linked into the extension (a compiler newer than the system's
    # does that) crashes at the first error message that formats a number; setup.py
    # links the shared library Python loads instead.
    from minalign import _C

    try:
        dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"readelf unavailable: {error}")
    assert any("NEEDED" in line and "libstdc++" in line for line in dynamic.splitlines()), dynamic
    # ... and a formatted number in an error message is fine
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 7 is out of range"):
        torch.ops.minalign.token_logprobs(torch.zeros(2, 5), torch.tensor([0, 7]), -100, False)


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
def test_cpu_kernels_run_on_torchs_intra_op_threads():
    # With torch's OpenMP backend (its Linux builds), at::parallel_for is a pragma in a
    # header: compiled without -fopenmp, every CPU kernel would run on one thread.
    from minalign import _C

    assert _C.INTRA_OP_PARALLEL == 1
    if sys.platform.startswith("linux"):  # ... on torch's OpenMP runtime, not a second one
        with open("/proc/self/maps") as f:
            runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
        assert len(runtimes) <= 1, runtimes


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
def test_the_cpu_kernels_say_which_build_runs_and_a_script_refuses_one_there_is_not(tmp_path):
    assert ops.cpu_kernels() in ("avx512", "avx2", "baseline")
    code = "from minalign import ops; print(ops.cpu_kernels())"
    env = {**os.environ, "MINALIGN_CPU_BLOCKS": "baseline"}
    chosen = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert chosen.returncode == 0 and chosen.stdout == "baseline\n", chosen.stdout + chosen.stderr
    script = [sys.executable, "train_sft.py", "--max-steps", "1", "--out-dir", str(tmp_path / "sft")]
    refused = subprocess.run(script, cwd=ROOT, env={**os.environ, "MINALIGN_CPU_BLOCKS": "sse"}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.endswith("train_sft.py: error: MINALIGN_CPU_BLOCKS=sse: must be avx512, avx2 or baseline\n")
    assert not (tmp_path / "sft").exists()  # before any work


def test_an_extension_built_from_older_sources_is_named_not_a_traceback(monkeypatch):
    import types

    from minalign import distributed
    from minalign.cli import ArgumentError

    monkeypatch.setattr(ops, "HAS_EXTENSION", True)
    monkeypatch.setattr(ops, "_C", types.SimpleNamespace(__file__="/site/minalign/_C.so", WITH_CUDA=0))
    with pytest.raises(ArgumentError, match=r"^/site/minalign/_C.so was built from older sources: rebuild it"):
        distributed.setup("cpu")


@pytest.mark.slow
@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
def test_the_baseline_cpu_kernels_pass_the_kernel_tests_too():
    # The CPU kernels' vector loops are built once per ISA (csrc/cpu_blocks.h) and the
    # widest build the CPU runs is used; here the baseline one (4 floats a vector, what
    # aarch64 and older x86-64 CPUs get) runs the CPU kernel tests, but those of the op
    # registration (opcheck, torch.compile), which no build changes.
    env = {**os.environ, "MINALIGN_CPU_BLOCKS": "baseline", "OMP_NUM_THREADS": "1"}
    tests = ["tests/test_ops_logprobs.py", "tests/test_ops_logprobs_fused.py", "tests/test_ops_logprobs_inplace.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                             "-k", "not opcheck and not torch_compile", *tests],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    code = "import torch; from minalign import ops; ops.token_logprobs(torch.zeros(1, 3), torch.tensor([0]))"
    refused = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "MINALIGN_CPU_BLOCKS": "sse"},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "MINALIGN_CPU_BLOCKS=sse: must be avx512, avx2 or baseline" in refused.stderr
