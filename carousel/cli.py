"""The `carousel` console script.

Each subcommand lives in the part it belongs to and exposes `add_arguments(parser)` and
`run(args) -> int`. Only the chosen subcommand's module is imported, so `carousel serve`
never imports torch (serving does not need it installed). `chat` lives in the separate
client distribution (`carousel_client`, installed from ./client), so the server package
does not depend on it: without it, `carousel chat` says how to install it."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("carousel.model.train", "train a recurrent byte-level language model"),
    "export": ("carousel.export.cli", "export a checkpoint to ONNX in the model repository"),
    "import": ("carousel.export.import_cli",
               "import a stateful ONNX graph (LSTM, GRU, ...) into the model repository"),
    "serve": ("carousel.service.cli", "serve the model repository over HTTP and WebSocket"),
    "bench": ("carousel.bench.cli", "run the benchmark suite (writes JSON, markdown, PNG)"),
    "chat": ("carousel_client.chat", "chat with a served model in the terminal"),
}
CLIENT_MISSING = ("carousel chat needs the client package: pip install ./client "
                  "(make serve and make test install it)")


def load(command: str):
    module = COMMANDS[command][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if command == "chat" and e.name == "carousel_client":
            sys.exit(f"carousel: {CLIENT_MISSING}")
        raise


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carousel",
        description="Serve stateful recurrent (LSTM/GRU) language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # import only what runs
            load(name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return load(args.command).run(args)


if __name__ == "__main__":
    sys.exit(main())
