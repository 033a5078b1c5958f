"""The flows' command lines share one shape: parse the options, validate them before any flow
run is created (a mistake is printed and the process exits with status 2, as argparse does for
its own errors), then run the flow and return its exit status."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel

from tasks.core.errors import ConfigurationError

# Exit status for a usage error: argparse's own.
USAGE_ERROR = 2


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    validate: Callable[[Mapping[str, Any]], object],
    run: Callable[[dict[str, Any]], int],
) -> int:
    """Parse ``argv`` with ``parser``, keep the options given (None means "the default"),
    check them with ``validate`` (which raises ConfigurationError naming each bad one), then
    return ``run(options)``."""
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        validate(args)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return run(args)


def parser_from_model(
    prog: str, description: str | None, model: type[BaseModel]
) -> argparse.ArgumentParser:
    """Options generated from a parameter model, so the command line and the flow's form in
    the UI accept the same parameters with the same descriptions: a flag per boolean that
    defaults to False, a list per tuple, a string for the rest (the model parses it, with
    the same messages as in the UI)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.get_default()
        kinds = {info.annotation, *get_args(info.annotation)} - {type(None)}
        if default is False:
            parser.add_argument(flag, dest=name, action="store_true", help=info.description)
        elif any(get_origin(k) is tuple or k is tuple for k in kinds):
            parser.add_argument(
                flag, dest=name, nargs="+", metavar=name.upper().rstrip("S"), help=info.description
            )
        else:
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(flag, dest=name, help=f"{info.description}{shown}")
    return parser


F = TypeVar("F", bound=Callable[..., Any])


def documented(model: type[BaseModel]) -> Callable[[F], F]:
    """Give a flow function a Google-style "Args:" section made of ``model``'s field
    descriptions, so the Prefect UI's run form describes every parameter the way --help
    does. Apply it under ``@flow`` (Prefect reads the docstring when the flow is built)."""

    def decorate(fn: F) -> F:
        names = inspect.signature(fn).parameters
        lines = [(fn.__doc__ or "").rstrip(), "", "Args:"]
        for name in names:
            info = model.model_fields.get(name)
            if info is not None and info.description:
                lines.append(f"    {name}: {' '.join(info.description.split())}")
        fn.__doc__ = "\n".join(lines).lstrip("\n")
        return fn

    return decorate
