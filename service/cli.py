"""`carousel serve`: every setting is a flag (help from the setting's description); a flag
given overrides the CAROUSEL_* environment, which overrides the defaults.

Before anything binds, the keys are checked (auth.py): unusable keys, or a non-loopback
address with no keys and no explicit opt-out, end the command with status 2 and a message
that says what to set. Error messages never quote a setting's value (it may be a key)."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from .settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Each flag can also be set as CAROUSEL_<NAME> in the environment."
    for name, field in Settings.model_fields.items():
        kind = field.annotation
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (default: {default}; env CAROUSEL_{name.upper()})"
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text,
                                action=argparse.BooleanOptionalAction)
            continue
        if typing.get_origin(kind) is typing.Literal:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text,
                                choices=typing.get_args(kind))
            continue
        convert = {int: int, float: float, Path: Path}.get(kind, str)
        parser.add_argument(_flag(name), dest=name, default=None, type=convert, help=help_text,
                            metavar=name.upper())


def settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValidationError as e:
        problems = "\n".join(f"  {'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors(include_input=False, include_url=False))
        print(f"carousel serve: invalid settings:\n{problems}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace"
                        else "DEBUG", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(settings.model_repository).is_dir():
        print(f"carousel serve: model repository {settings.model_repository} does not exist "
              "(set --model-repository or CAROUSEL_MODEL_REPOSITORY)", file=sys.stderr)
        return 2
    from .auth import AuthConfigError, refusal
    from .origins import is_loopback

    if (reason := refusal(settings)) is not None:
        print(f"carousel serve: {reason}", file=sys.stderr)
        return 2
    from .manifest import ManifestError
    from .registry import read_repository

    try:
        read_repository(settings.model_repository)  # every manifest, before anything binds
    except ManifestError as e:
        print(f"carousel serve: {e}", file=sys.stderr)
        return 2
    from .app import create_app  # the heavy imports only once the flags are good
    from .server import run_server

    try:
        app = create_app(settings)
    except AuthConfigError as e:
        print(f"carousel serve: {e}", file=sys.stderr)
        return 2
    if not app.state.service.auth.enabled and not is_loopback(settings.host):
        logging.getLogger("carousel.service").warning(
            "serving on %s WITHOUT authentication (CAROUSEL_ALLOW_UNAUTHENTICATED): anyone "
            "who reaches the port can use every session", settings.host)
    return run_server(app, settings)
