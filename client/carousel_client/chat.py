"""`carousel chat`: type text, watch the model continue it as it streams.

A terminal client on the blocking `Client` and nothing else. Each line you type is stepped
into the session exactly as typed, then the model's continuation streams after it; the
session keeps all of it, so the next line continues from there. Lines starting with `/` are
commands (`/help` lists them): sampling settings, `/fork` and `/back`, `/reset`, `/model`.
Ctrl-C during a generation stops that generation and keeps the session (the client reads
its position back); at the prompt it does nothing; Ctrl-D or `/quit` leaves, deleting the
sessions the chat created unless `--keep`.

Runs as `carousel chat` (the server package's console script loads this module) or as
`carousel-chat` when only the client is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from .client import DEFAULT_URL, Client, Session
from .errors import CarouselError, GenerationInterrupted

HELP = """commands:
  /temperature X   sampling temperature (0 is greedy)
  /top_k N         sample from the N likeliest bytes (0: all)
  /top_p X         sample from the smallest set with this probability mass
  /max_tokens N    bytes to generate after each line
  /seed N | none   fixed seed (same text, same continuation) or a random one each time
  /settings        show the settings and the session
  /fork            continue in a copy of this session (/back returns to the original)
  /back            drop the fork, return to the session it was forked from
  /reset           start over: a new, empty session on the same model
  /model NAME      start over on another model
  /help            this list
  /quit            leave (or Ctrl-D)
Ctrl-C stops a generation and keeps the session."""


@dataclass
class Sampling:
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int = 200
    seed: int | None = None

    def kwargs(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "seed": self.seed}

    def describe(self) -> str:
        shown = {k: ("server default" if v is None else v) for k, v in self.kwargs().items()}
        return ", ".join(f"{k} {v}" for k, v in shown.items())


# name -> (field, parse); parse raises ValueError for a bad value
SETTINGS = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "max_tokens": ("max_tokens", int),
    "seed": ("seed", lambda v: None if v.lower() == "none" else int(v)),
}


@dataclass
class Chat:
    client: Client
    model: str
    sampling: Sampling
    keep: bool = False
    out: object = field(default=sys.stdout)
    session: Session | None = None
    forked_from: list[Session] = field(default_factory=list)

    # --- output

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def status(self, text: str) -> None:
        self.say(f"[{text}]")

    def error(self, e: CarouselError) -> None:
        self.say(f"error {e.code}: {e.message}")

    # --- sessions

    def open(self, model: str) -> bool:
        """A new session on `model`; the current one is kept if that fails."""
        try:
            session = self.client.session(model, keep=self.keep)
        except CarouselError as e:
            self.error(e)
            return False
        self.drop_all()
        self.session, self.model = session, model
        self.status(f"session {session.id} on {model}")
        return True

    def drop(self, session: Session) -> None:
        if not session.keep:
            try:
                session.delete()
            except CarouselError as e:
                self.error(e)

    def drop_all(self) -> None:
        for s in [*self.forked_from, *([self.session] if self.session else [])]:
            self.drop(s)
        self.forked_from, self.session = [], None

    # --- one line

    def handle(self, line: str) -> bool:
        """One line typed; False to leave."""
        if line.startswith("/"):
            return self.command(line[1:].split())
        if line:
            self.continue_text(line)
        return True

    def continue_text(self, text: str) -> None:
        session = self.session
        try:
            session.step(text, top_k=0)
        except CarouselError as e:
            self.error(e)
            return
        except KeyboardInterrupt:
            self.say()
            self.status("interrupted")
            return
        stream = session.stream(**self.sampling.kwargs())
        try:
            with stream:
                for piece in stream:
                    self.say(piece, end="")
        except KeyboardInterrupt:
            self.say()
            self.status(f"stopped · position {self.position()}")
            return
        except GenerationInterrupted as e:
            self.say()
            self.error(e)
            return
        except CarouselError as e:
            self.error(e)
            return
        self.say()
        self.status(f"{stream.finish_reason} · position {stream.position}")

    def position(self) -> int | str:
        try:
            return self.session.sync_position()
        except CarouselError:
            return "unknown"

    # --- commands

    def command(self, words: list[str]) -> bool:
        if not words:
            self.say(HELP)
            return True
        name, args = words[0].lower(), words[1:]
        if name in ("quit", "exit", "q"):
            return False
        if name in SETTINGS:
            self.setting(name, args)
        elif name == "settings":
            self.status(f"{self.sampling.describe()} · session {self.session.id} on "
                        f"{self.model} at position {self.position()}")
        elif name == "fork":
            self.fork()
        elif name == "back":
            self.back()
        elif name == "reset":
            self.open(self.model)
        elif name == "model":
            if len(args) != 1:
                self.say("usage: /model NAME")
            else:
                self.open(args[0])
        elif name == "help":
            self.say(HELP)
        else:
            self.say(f"unknown command /{name}; /help lists them")
        return True

    def setting(self, name: str, args: list[str]) -> None:
        attr, parse = SETTINGS[name]
        if len(args) != 1:
            self.say(f"usage: /{name} VALUE (now {getattr(self.sampling, attr)})")
            return
        try:
            value = parse(args[0])
        except ValueError:
            self.say(f"/{name}: {args[0]!r} is not a valid value")
            return
        setattr(self.sampling, attr, value)  # the server checks the range at the next line
        self.status(f"{name} {value}")

    def fork(self) -> None:
        try:
            child = self.session.fork(keep=self.keep)
        except CarouselError as e:
            self.error(e)
            return
        self.forked_from.append(self.session)
        self.session = child
        self.status(f"forked: session {child.id} at position {child.position}")

    def back(self) -> None:
        if not self.forked_from:
            self.say("not in a fork")
            return
        self.drop(self.session)
        self.session = self.forked_from.pop()
        self.status(f"back to session {self.session.id} at position {self.position()}")


def read_lines(prompt: str):
    """Typed lines until Ctrl-D; Ctrl-C at the prompt only says how to leave."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n(/quit or Ctrl-D to leave)\n")


def pick_model(client: Client) -> str:
    names = [m.name for m in client.models() if m.latest]
    if not names:
        raise CarouselError("the server has no models", code="no_models")
    return "bytelm" if "bytelm" in names else names[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--model", help="model to chat with (default: bytelm, else the first)")
    parser.add_argument("--api-key", default=None,
                        help="sent as Authorization: Bearer (default: $CAROUSEL_API_KEY)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, help="sample from the k likeliest bytes (0: all)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass")
    parser.add_argument("--max-tokens", type=int, default=200,
                        help="bytes generated after each line (default 200)")
    parser.add_argument("--seed", type=int, help="fixed sampling seed")
    parser.add_argument("--timeout", type=float, default=30.0, help="request timeout (s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the sessions on the server when leaving")


def run(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    api_key = args.api_key if args.api_key is not None else os.environ.get("CAROUSEL_API_KEY")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_tokens, args.seed)
    with Client(args.url, api_key=api_key, timeout=args.timeout) as client:
        try:
            model = args.model or pick_model(client)
        except CarouselError as e:
            print(f"carousel chat: {e}", file=sys.stderr)
            return 1
        chat = Chat(client, model, sampling, keep=args.keep)
        if not chat.open(model):
            return 1
        chat.say("type text and the model continues it; /help for commands, Ctrl-D to leave")
        try:
            for line in read_lines("> "):
                if not chat.handle(line):
                    break
        finally:
            chat.drop_all()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carousel-chat", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
