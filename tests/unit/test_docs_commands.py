"""Every command the README and the guide (docs/guide/*.md) show still parses.

Each fenced `bash` block is split into commands (backslash continuations joined, comments dropped). A command that
runs the trainer or one of its tools (`python -m train`, `torchrun ... -m train`, `launch/torchrun.sh`,
`launch/slurm.sbatch`, `python -m train.plan|summary|pretokenize`) has its Hydra overrides composed against the real
config tree (a renamed key or config fails here); the tools' own flags are checked against their parsers where
they have one. `python scripts/X.py` and `python -m MODULE` must name a script or module that exists.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from train.config import compose

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs" / "guide").glob("*.md"))]
# Flags of the tools that take a value (so the value is not mistaken for an override).
VALUE_FLAGS = {"--out", "--workers", "--shard-tokens", "--device-memory", "--headroom", "--nproc_per_node",
               "--nproc-per-node", "--nnodes", "--nodes", "--noise", "--seed", "--max-shard-size", "--gb"}
# Overrides that are not config keys: the planner's world size, generate's own arguments.
TOOL_KEYS = {"parallel.world_size"}


def bash_commands(text: str) -> list[str]:
    """The commands of every ```bash block of a markdown text."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def all_commands() -> list[tuple[str, str]]:
    return [(page.relative_to(REPO).as_posix(), cmd) for page in PAGES for cmd in bash_commands(page.read_text())]


def split_command(cmd: str) -> tuple[str, list[str]]:
    """(what runs: 'train', 'train.plan', 'script:PATH', 'module:NAME', 'other', args)."""
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # NAME=value environment prefixes
        words.pop(0)
    if not words:
        return "other", []
    head = words[0]
    if head in ("launch/torchrun.sh",):
        return "train", words[1:]
    if head == "sbatch":
        rest = [w for w in words[1:] if not w.startswith("--")]
        return ("train", rest[1:]) if rest and rest[0] == "launch/slurm.sbatch" else ("other", [])
    if head == "torchrun":
        if "-m" in words:
            i = words.index("-m")
            return words[i + 1], words[i + 2:]
        scripts = [w for w in words[1:] if w.endswith(".py")]
        return ("script:" + scripts[0], []) if scripts else ("other", [])
    if head == "python":
        if words[1] == "-m":
            return words[2], words[3:]
        return "script:" + words[1], words[2:]
    return "other", []


def overrides_of(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in VALUE_FLAGS
            continue
        if "=" in a and a.split("=", 1)[0].lstrip("+") not in TOOL_KEYS:
            out.append(a)
    return out


def first_sweep_value(override: str) -> str:
    """`key=a,b,c` (a multirun sweep) -> `key=a`; a list value `[a,b]` is kept whole."""
    key, _, value = override.partition("=")
    if "," in value and not value.startswith("["):
        value = value.split(",")[0]
    return f"{key}={value}"


COMMANDS = all_commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 30, COMMANDS
    assert {"README.md", "docs/guide/data.md"} <= {page for page, _ in COMMANDS}


@pytest.mark.parametrize("page,cmd", COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_command_parses(page, cmd):
    what, args = split_command(cmd)
    if what == "other":
        return
    if what.startswith("script:"):
        assert (REPO / what[len("script:"):]).is_file(), f"{page}: {cmd!r} names a script that does not exist"
        return
    if what in ("train", "train.plan", "train.summary", "train.pretokenize"):
        multirun = what == "train" and "-m" in args
        overrides = [first_sweep_value(o) if multirun else o for o in overrides_of(args)]
        compose(overrides)  # raises on an unknown key, a missing config or a bad value
        return
    assert importlib.util.find_spec(what) is not None, f"{page}: {cmd!r} names a module that does not exist"
