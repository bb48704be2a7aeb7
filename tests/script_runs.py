"""Running the top-level scripts (train_*.py, experiments/*.py) from the tests.

A run alone goes through the script's own entry point, cli.run(main, Args), in this
process: it reads the same arguments, prints the same lines and ends with the same
status as `python train_sft.py ...` would, on one thread as OMP_NUM_THREADS=1 gives a
process, and with torch's generator where a new process has it. What it saves is the
start of a new Python: importing torch, the first optimizer's import of its compiler
and building the built-in task take about 8 s on 2 cores, several times a tiny run's
own time. A run under torchrun (`nproc` above 1) starts its processes as a user's
would, and so does `own_process=True`, for what only a whole process shows.
"""

import contextlib
import importlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
# The seed of torch's CPU generator in a new process (c10's default_rng_seed_val): a run
# that draws before seeding draws here what it would draw there.
NEW_PROCESS_SEED = 67280421310721


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def output(self) -> str:
        """Both streams, for an assertion's message."""
        return self.stdout[-3000:] + self.stderr[-3000:]


def run_script(script: str, args, nproc: int = 1, env: dict | None = None, own_process: bool = False,
               timeout: int = 300) -> Finished:
    """Runs `script` (a path from the repository root) with `args`; `env` adds to the
    environment. Returns its status and what it printed."""
    args = [str(a) for a in args]
    if nproc == 1 and not own_process:
        return _in_this_process(script, args, env or {})
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    module = script.removesuffix(".py").replace("/", ".")
    target = ["-m", module] if "/" in script else [script]  # experiments/ is a package
    result = subprocess.run([sys.executable, *launch, *target, *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                            text=True, timeout=timeout)
    return Finished(result.returncode, result.stdout, result.stderr)


@contextlib.contextmanager
def as_in_a_new_process():
    """What a new process of run_script's would start from: one thread, torch's
    generator at its first seed, the repository root as the working folder. All three
    are as they were afterwards."""
    threads = torch.get_num_threads()
    with contextlib.chdir(ROOT), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(NEW_PROCESS_SEED)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _in_this_process(script: str, args: list[str], env: dict) -> Finished:
    from minalign.cli import run

    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with (as_in_a_new_process(), mock.patch.object(sys, "argv", [script, *args]), mock.patch.dict(os.environ, env),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            run(module.main, module.Args, args)
        except SystemExit as stop:  # as the interpreter ends on it
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if isinstance(stop.code, str):
                err.write(stop.code + "\n")
    return Finished(status, out.getvalue(), err.getvalue())
