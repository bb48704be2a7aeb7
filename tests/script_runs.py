"""Running the top-level scripts (train_*.py, experiments/*.py) from the tests.

A run alone goes through the script's own entry point, cli.run(main, Args), in this
process: it reads the same arguments, prints the same lines and ends with the same
status as `python train_sft.py ...` would, on one thread as OMP_NUM_THREADS=1 gives a
process. What it saves is the start of a new Python: importing torch, the first
optimizer's import of its compiler and building the built-in task take about 8 s on
2 cores, several times a tiny run's own time. A run under torchrun (`nproc` above 1)
starts its processes as a user's would, and so does `own_process=True`, for what only
a whole process shows (its exit status, all it writes to its stderr, torch.compile's
workers). test_plumbing checks each script's `__main__` in a process of its own.
"""

import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from minalign import resume

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def output(self) -> str:
        """Both streams, for an assertion's message."""
        return self.stdout[-3000:] + self.stderr[-3000:]


class RunTimedOut(Exception):
    pass


def run_script(script: str, args, nproc: int = 1, own_process: bool = False, timeout: int = 300) -> Finished:
    """Runs `script` (a path from the repository root) with `args`, for at most
    `timeout` seconds. Returns its status and what it printed."""
    args = [str(a) for a in args]
    if nproc == 1 and not own_process:
        return _in_this_process(script, args, timeout)
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = ["-m", script.removesuffix(".py").replace("/", ".")] if "/" in script else [script]  # a package's
    result = subprocess.run([sys.executable, *launch, *target, *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=timeout)
    return Finished(result.returncode, result.stdout, result.stderr)


@contextlib.contextmanager
def as_in_a_new_process(timeout: int = 300):
    """What a new process of run_script's would start from: one thread, torch's
    generator freshly seeded (at random, as a new process's is), no record of a
    checkpoint saved (resume's, for the Ctrl-C hint), the repository root as the
    working folder; RunTimedOut after `timeout` seconds. All as they were afterwards."""
    threads = torch.get_num_threads()

    def time_out(signum, frame):
        raise RunTimedOut(f"still running after {timeout} s")

    on_alarm = signal.signal(signal.SIGALRM, time_out)
    signal.alarm(timeout)
    with (contextlib.chdir(ROOT), torch.random.fork_rng(devices=[]),
          mock.patch.dict(resume._resumable, clear=True)):
        torch.default_generator.seed()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, on_alarm)
            torch.set_num_threads(threads)


def _in_this_process(script: str, args: list[str], timeout: int) -> Finished:
    from minalign.cli import run

    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with (as_in_a_new_process(timeout), mock.patch.object(sys, "argv", [script, *args]),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            run(module.main, module.Args, args)
        except SystemExit as stop:  # as the interpreter ends on it
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if isinstance(stop.code, str):
                err.write(stop.code + "\n")
    if status == 130:  # cli.run's Ctrl-C: stop the tests too
        raise KeyboardInterrupt
    return Finished(status, out.getvalue(), err.getvalue())
