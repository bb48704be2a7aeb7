"""Command lines generated from an `Args` dataclass: one flag per field, its docstring as help.

    @dataclass
    class Args:
        lr: float = 3e-4
        \"\"\"Peak learning rate.\"\"\"

    args = parse_args(Args)   # python train.py --lr 1e-3 ; --help lists every field
"""

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing


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
        return tp(text)

    parse.__name__ = tp.__name__  # argparse names the type in its error messages
    return parse


def build_parser(cls, description=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description or inspect.getdoc(cls),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) is tuple:  # tuple[float, ...]: one or more values after the flag
            item = typing.get_args(tp)[0]
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, nargs="+",
                                type=_parser_for(item, False), metavar=item.__name__.upper())
        else:
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, type=_parser_for(tp, optional),
                                metavar=tp.__name__.upper())
    return parser


def parse_args(cls, argv=None):
    """Parse the command line (or `argv`) into an instance of the dataclass `cls`."""
    namespace = build_parser(cls).parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items()}
    return cls(**values)
