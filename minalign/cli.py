"""Command lines generated from an `Args` dataclass: one flag per field, its docstring as help.

    @dataclass
    class Args:
        lr: float = 3e-4
        \"\"\"Peak learning rate.\"\"\"

    args = parse_args(Args)   # python train.py --lr 1e-3 ; --help lists every field

An Args class checks its values in __post_init__ with `check_args`, so that a value
out of range stops the run before any work, with a message that names the flag; the
check runs for values set in code too.
"""

import argparse
import ast
import dataclasses
import inspect
import math
import os
import signal
import sys
import textwrap
import time
import types
import typing
from pathlib import Path

from minalign.data import DataError


def field_docs(cls) -> dict[str, str]:
    """Map each field of a dataclass (inherited ones too) to the string literal below it."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):  # base classes first; a subclass may redefine
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # defined where no source file exists (e.g. `python -c`)
            continue
        body = ast.parse(textwrap.dedent(source)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported argument type {tp}")
        return args[0], True
    return tp, False


def _parser_for(tp, optional):
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        if tp is str and not text.strip():  # no path, device or name is blank
            raise argparse.ArgumentTypeError("empty")
        return tp(text)

    parse.__name__ = tp.__name__  # argparse names the type in its error messages
    return parse


OTHER_RANKS_WAIT_S = 5.0
"""How long a process other than torchrun's local rank 0 waits before reporting a mistake."""


def wait_if_not_first_on_node() -> None:
    """Under torchrun every process of a node meets the same mistake (a bad flag, a bad
    file) at about the same time. Local rank 0 reports it at once; the others wait a
    moment first, and torchrun stops them as soon as rank 0 has exited, so the message
    appears once per node. A mistake only another process meets is still reported, after
    the wait. (torchrun polls its processes every 0.1 s; 5 s also covers older releases.)"""
    if _other_local_rank():
        time.sleep(OTHER_RANKS_WAIT_S)


def _under_torchrun() -> bool:
    """Whether torchrun started this process."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def _other_local_rank() -> bool:
    """Whether this is a process torchrun started, other than its node's local rank 0."""
    return _under_torchrun() and os.environ.get("LOCAL_RANK", "0") not in ("", "0")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help states it itself; None shows as
    "none", the value that sets it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None:
            return text if "(default" in text else f"{text} (default: none)"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A malformed command line: the usage lines, then the message."""
        wait_if_not_first_on_node()
        super().error(message)

    def refuse(self, message):
        """A value the checks reject: the message alone, on one line."""
        wait_if_not_first_on_node()
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(cls, description=None, defaults=True) -> argparse.ArgumentParser:
    """The parser of `cls`'s flags; with defaults=False a flag left out is left out of
    the parsed namespace."""
    parser = _Parser(
        description=description or inspect.getdoc(cls),
        epilog="A flag whose default is none also takes the value none (a list flag: no values).",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # a prefix (--epoch for --epochs) is a typo to name, not a guess to act on
    )
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = default if defaults else argparse.SUPPRESS
        help_text = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag(f.name), dest=f.name, default=default, help=help_text, action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) is tuple:  # tuple[float, ...]: values after the flag (if optional, maybe none)
            item = typing.get_args(tp)[0]
            parser.add_argument(flag(f.name), dest=f.name, default=default, help=help_text, nargs="*" if optional else "+",
                                type=_parser_for(item, False), metavar=item.__name__.upper())
        else:
            parser.add_argument(flag(f.name), dest=f.name, default=default, help=help_text, type=_parser_for(tp, optional),
                                metavar=tp.__name__.upper())
    return parser


class ArgumentError(ValueError):
    """A value a flag does not accept; parse_args reports it as a usage error."""


class Diverged(Exception):
    """A loss or statistic came out NaN or infinite: the run stops rather than save such weights."""


def check_finite(step: int, counter: str = "step", **values: float) -> None:
    """Raise Diverged, naming the step (or update: `counter`) and the values, if any of
    them is NaN or infinite."""
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise Diverged(f"{counter} {step}: {', '.join(bad)}: training diverged; a lower --lr may help")


def check_args(args, positive=(), non_negative=(), fractions=(), choices=None) -> None:
    """Raise ArgumentError, naming the flag, for the first field out of its range:
    `positive` fields must be > 0, `non_negative` ones >= 0, `fractions` in [0, 1], and
    `choices` maps a field to the values it may take. An optional left at None passes;
    a tuple's values are checked one by one. A `seed` field, where there is one, must
    be in [0, 2^32), which every random generator takes."""
    rules = [(positive, lambda v: v > 0, "must be > 0"), (non_negative, lambda v: v >= 0, "must be >= 0"),
             (fractions, lambda v: 0 <= v <= 1, "must be between 0 and 1")]
    for names, ok, rule in rules:
        for name in names:
            value = getattr(args, name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ArgumentError(f"{flag(name)} {v}: must be finite")
                if v is not None and not ok(v):
                    raise ArgumentError(f"{flag(name)} {v}: {rule}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise ArgumentError(f"--seed {seed}: must be in [0, 2^32)")
    for name, allowed in (choices or {}).items():
        if getattr(args, name) not in allowed:
            raise ArgumentError(f"{flag(name)} {getattr(args, name)!r}: must be one of {', '.join(map(repr, allowed))}")


def parse_args(cls, argv=None):
    """Parse the command line (or `argv`) into an instance of the dataclass `cls`; a value
    its checks reject exits with one line that names the flag, as the scripts' later checks
    do (argparse's own errors, an unknown flag or a malformed number, come after its usage
    lines). Which flags the command line named is kept for `given`."""
    parser = build_parser(cls)
    namespace = parser.parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items()}
    try:
        args = cls(**values)
    except ArgumentError as error:
        parser.refuse(str(error))
    args._given = frozenset(vars(build_parser(cls, defaults=False).parse_args(argv)))
    return args


def given(args) -> frozenset[str]:
    """The fields whose flags were on the command line, even at their default value. For
    Args made in code (not by parse_args), the fields that differ from their defaults."""
    if hasattr(args, "_given"):
        return args._given
    return frozenset(f.name for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING
                     and getattr(args, f.name) != f.default)


def refuse_given(args, names, reason: str) -> None:
    """Raise ArgumentError if any of the fields `names` was given: a flag that does not
    apply to this run is refused rather than silently ignored."""
    named = [flag(name) for name in names if name in given(args)]
    if named:
        raise ArgumentError(f"{', '.join(named)}: {reason}")


def check_divisible(args, names, world_size: int) -> None:
    """Raise ArgumentError unless each of the fields `names` (a count of sequences over all
    processes) splits evenly across the `world_size` processes."""
    for name in names:
        if getattr(args, name) % world_size:
            raise ArgumentError(f"{flag(name)} {getattr(args, name)} must be divisible by the {world_size} processes")


class Terminated(BaseException):
    """SIGTERM (from `timeout`, a job scheduler, `docker stop`), raised where the run is so
    that it unwinds as from Ctrl-C: a checkpoint being written is removed, not left half-done."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run(main, cls, argv=None) -> None:
    """main(parse_args(cls, argv)), where a mistake in what the user gave (a value out of
    range, bad data, a missing or unreadable file, a run that diverged) ends the run with
    one line that names it and exit status 2, as a usage error does, instead of a
    traceback; Ctrl-C ends it with one line and status 130, SIGTERM with one line and
    status 143. Other errors are bugs and keep their traceback. Under torchrun the line
    comes once a node (wait_if_not_first_on_node; Ctrl-C and SIGTERM, which torchrun
    passes to every process: from local rank 0), and each process ends by _exit."""
    args = parse_args(cls, argv)
    script = Path(sys.argv[0]).name
    on_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(args)
    except (ArgumentError, DataError, Diverged, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError) as error:
        signal.signal(signal.SIGTERM, on_sigterm)  # torchrun's SIGTERM may end a waiting process quietly
        wait_if_not_first_on_node()
        sys.stderr.write(f"{script}: error: {error}\n")  # one write: torchrun's processes do not interleave it
        _exit(2)
    except (KeyboardInterrupt, Terminated) as stop:  # checkpoints are written atomically: the last one is whole
        ctrl_c = isinstance(stop, KeyboardInterrupt)
        if not _other_local_rank():  # under torchrun every process gets the signal: one says so
            from minalign.resume import resume_hint  # (which imports this module)

            sys.stderr.write(f"{script}: {'interrupted' if ctrl_c else 'terminated'}{resume_hint(args, script)}\n")
        _exit(130 if ctrl_c else 128 + signal.SIGTERM)
    except BrokenPipeError:  # the output went to a reader that stopped (`| head`): stop too, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting flushes into nothing
        sys.stderr.write(f"{script}: stopped: the program reading its output closed the pipe\n")
        _exit(1)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    if _under_torchrun():
        _exit(0)


def _exit(status: int) -> None:
    """End the process with `status`: by SystemExit, except under torchrun, where it ends
    at once, without the interpreter's teardown. There the gloo process group's threads
    live to the very end (a DistributedDataParallel model keeps the group even after
    destroy_process_group), and one still at work on the last collective while the
    interpreter shuts down can abort the process ("terminate called without an active
    exception", status -6) after the run has finished and saved everything: torchrun
    would report the run as failed."""
    if not _under_torchrun():
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
