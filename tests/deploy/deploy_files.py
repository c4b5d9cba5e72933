"""Readers for the deployment files, written small and from their documented rules.

There is no Docker engine or compose binary where the tests run, so the tests read the
files the way those tools do: the Dockerfile's instructions and stages, `.dockerignore`'s
patterns (last match wins, a pattern on a folder covers what is inside), and compose's
variable interpolation (`${VAR}`, `${VAR:-default}`, `${VAR:?message}`, `$$`).
"""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The ENV every official python image sets before our own (docker's default PATH included).
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}

# A stand-in for an environment without torch and onnx: a finder at the front of
# sys.meta_path that refuses them, as the runtime image (which has neither) would.
BLOCKER = textwrap.dedent(
    """
    import sys

    class _NotInstalled:
        blocked = ("torch", "onnx")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ENV, ...
    args: str
    line: int  # 1-based line where the instruction starts


@dataclass
class Stage:
    name: str | None
    base: str  # an image reference or an earlier stage's name
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (and directives) dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(pending)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's substitution of $VAR and ${VAR} (the forms this Dockerfile uses)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m[1] or m[2], ""), value)


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """`ENV k=v k2="v 2"` (and the legacy `ENV k v`), values expanded against env."""
    words = shlex.split(args)
    if "=" not in words[0]:
        return {words[0]: expand(args.partition(" ")[2].strip(), env)}
    new: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        new[key] = expand(value, {**env, **new})
    return new


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def lineage(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, oldest first."""
        chain = [self.stage(name)]
        names = {s.name for s in self.stages}
        while chain[0].base in names:
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def env(self, name: str) -> dict[str, str]:
        """The environment a container of this stage starts with."""
        env = dict(BASE_IMAGE_ENV)
        for stage in self.lineage(name):
            for ins in stage.all("ENV"):
                env.update(parse_env(ins.args, env))
        return env

    def inherited_last(self, name: str, keyword: str) -> Instruction | None:
        """The instruction in force for a stage (USER, ENTRYPOINT, CMD, HEALTHCHECK...)."""
        for stage in reversed(self.lineage(name)):
            if (found := stage.last(keyword)) is not None:
                return found
        return None


def parse_dockerfile(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in dockerfile_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = expand(words[0], args)
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(name, base))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may precede FROM (line {ins.line})"
            key, _, default = ins.args.partition("=")
            args[key] = default.strip('"')
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(args, stages)


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD/HEALTHCHECK CMD in exec (JSON array) form; shell form is refused."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK [--option=value ...] CMD [...] -> (options, command)."""
    options: dict[str, str] = {}
    rest = ins.args
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD", ins.args
    return options, exec_form(command)


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY [--from=x ...] SRC... DEST -> (flags, sources, destination)."""
    words = ins.args.split()
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


# -------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line, patterns cleaned as docker cleans them."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((exception, _pattern_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether a context-relative path stays out of the build context: the last rule that
    matches the path, or one of the folders above it, decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not exception
    return ignored


# ---------------------------------------------------------------------- compose variables

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>\w+))"
)


class MissingVariable(ValueError):
    """A `${VAR:?message}` / `${VAR?message}` whose variable is missing."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """One string, substituted as the Compose specification describes."""

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["plain"]
        op, arg = m["op"], m["arg"] or ""
        present = name in env
        usable = present and (env[name] != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return env[name] if usable else arg
        if op in (":?", "?"):
            if not usable:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if usable else ""
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def interpolate_tree(node: object, env: dict[str, str]) -> object:
    """Every string value in a parsed compose file (keys are left as they are)."""
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: `!reset` (drop what the files below set) and `!override`
    (replace it rather than merge) tag a value; the value is kept as it is written, which is
    what the Compose schema checks. Compose itself applies them (`docker compose config`)."""


def _tagged(loader: ComposeLoader, node: yaml.Node):
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)


def load_compose(text: str) -> dict:
    return yaml.load(text, Loader=ComposeLoader)  # noqa: S506 (a SafeLoader, two tags more)


# --------------------------------------------------------------------------- HAProxy config


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """`section name` -> its directives, each split into words as HAProxy splits them
    (quotes group words; `#` outside quotes starts a comment). A section starts at the
    first column; its directives are indented."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for raw in text.splitlines():
        lexer = shlex.shlex(raw, posix=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
        if not words:
            continue
        if not raw[0].isspace():
            current = " ".join(words)
            sections[current] = []
        else:
            assert current is not None, f"a directive outside any section: {raw!r}"
            sections[current].append(words)
    return sections


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")
