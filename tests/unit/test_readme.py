"""The README cannot rot: each of its commands is executed by a test, and what it names exists.

Conventions (CONTRIBUTING.md, "The README's commands are tested"): every fenced ``sh`` block
carries how it is executed — ``appliance`` (run for real by the appliance test), ``guest`` (run
in the guest by the end-to-end test) or ``mirror`` (provisioning commands, run one to one by the
test or CI step this module checks). Here, cheaply: the marks, the mirrors, every ``pvctl`` /
``pvhost`` subcommand and option against ``--help``, every repository path and relative link,
the ``toml`` examples against pvhost's configuration model, and the architecture SVG against
its Graphviz source.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvhost import cli as pvhost_cli
from pvhost import ctl as pvctl_cli
from pvhost.config import Config

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MODES = ("appliance", "guest", "mirror")

__all__ = ["Block", "commands", "readme_blocks"]


@dataclass(frozen=True)
class Block:
    lang: str
    mode: str
    text: str
    line: int


def readme_blocks(path: Path = README) -> list[Block]:
    """The fenced code blocks of ``path``, with their language and mode (the info string)."""
    blocks, current, body = [], None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if current is None:
            match = re.fullmatch(r"```(\S*)\s*(.*)", line)
            if match:
                current, body = (match.group(1), match.group(2).strip(), number), []
        elif line == "```":
            blocks.append(Block(current[0], current[1], "\n".join(body), current[2]))
            current = None
        else:
            body.append(line)
    assert current is None, f"{path.name}:{current[2]}: a code block is never closed"
    return blocks


def commands(block: Block) -> list[str]:
    """The block's command lines, trailing ``# comments`` removed."""
    out = []
    for raw in block.text.splitlines():
        line = re.sub(r"\s+#\s.*$", "", raw).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _sh_blocks(mode: str) -> list[str]:
    return [c for b in readme_blocks() if b.lang == "sh" and b.mode == mode for c in commands(b)]


def test_every_shell_block_says_how_a_test_executes_it() -> None:
    blocks = [b for b in readme_blocks() if b.lang in ("sh", "bash", "shell", "console", "")]
    assert blocks, "the README has no shell block"
    for block in blocks:
        assert block.lang == "sh" and block.mode in MODES, (
            f"README.md:{block.line}: ```{block.lang} {block.mode}: a command block must be "
            f"```sh with one of {MODES} (see CONTRIBUTING.md)"
        )
        assert commands(block), f"README.md:{block.line}: an empty command block"
        for command in commands(block):
            # Root-only Debian machines have no sudo: the README's commands run as root.
            assert not command.startswith("sudo "), f"README.md:{block.line}: {command}"


def test_the_appliance_and_guest_blocks_are_there_to_be_run() -> None:
    # The appliance test runs these for real; an empty list would make it pass vacuously.
    assert any("pvctl status" in c for c in _sh_blocks("appliance"))
    assert "cat /run/pvagent/placement.json" in _sh_blocks("guest")


def _source(path: str) -> str:
    return (REPO / path).read_text()


def _code_lines(text: str) -> list[str]:
    """Lines that are not shell comments."""
    return [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]


def _mirror(command: str) -> None:
    """Assert the test or CI step that runs ``command`` one to one runs it."""
    argv = shlex.split(command)
    appliance_test = _source("tests/integration/test_appliance_playbook.py")
    if argv == ["./dev", "test"]:
        # .ci/run is CI: it runs the README's test command verbatim (with the strict env).
        assert "EXTPV_REQUIRE_CAPABILITIES=1 ./dev test" in _code_lines(_source(".ci/run"))
    elif argv == ["./dev", "demo"]:
        # ./dev demo = ./dev setup (which ./dev test, and so CI, runs first) + the playbook;
        # the appliance test runs that playbook on the CI machine, in its two halves.
        dev = _source("dev")
        assert 'demo) setup; demo "$@" ;;' in dev and 'test) setup; run_tests "$@" ;;' in dev
        assert re.search(r'exec "\$VENV/bin/ansible-playbook" site\.yml "\$@"', dev)
        assert 'argv = [str(BIN / "ansible-playbook"), "site.yml", *args]' in appliance_test
        assert 'playbook("--skip-tags", "demo")' in appliance_test
        assert 'playbook("--tags", "demo")' in appliance_test
    elif argv[:2] == [".venv/bin/ansible-playbook", "site.yml"]:
        # The test runs the venv's ansible-playbook (BIN: its interpreter's bin/) from REPO.
        call = "playbook(" + ", ".join(json.dumps(a) for a in argv[2:]) + ")"
        assert call in appliance_test, f"{command!r}: no {call} in test_appliance_playbook.py"
    else:
        pytest.fail(f"README command {command!r} is marked mirror, but no test mirrors it")


def test_every_mirrored_command_is_run_one_to_one_by_a_test() -> None:
    mirrored = _sh_blocks("mirror")
    assert mirrored[:2] == ["./dev demo", "./dev test"], "the quick start's two commands first"
    for command in mirrored:
        _mirror(command)


def test_every_guest_command_is_run_in_the_guest_by_the_end_to_end_test() -> None:
    e2e = _source("tests/vm/test_3_e2e_affinity.py")
    for command in _sh_blocks("guest"):
        argv = "[" + ", ".join(json.dumps(a) for a in shlex.split(command)) + "]"
        assert f"guest({argv})" in e2e, f"{command!r}: test_3_e2e_affinity runs no {argv}"


# -- names: CLI subcommands and options, paths, links ------------------------------------------
def _help(main: Callable[[list[str]], int], path: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main([*path, "--help"])
    return out.getvalue()


def _choices(help_text: str) -> set[str]:
    """The positional choices in the usage line (subcommands, ``{on,off}``), not an option's."""
    words = help_text.split("\n\n", 1)[0].split()
    found: set[str] = set()
    for i, word in enumerate(words):
        match = re.fullmatch(r"[\[(]?\{([\w,-]+)\}[\])]?", word)
        after_option = i and re.fullmatch(r"[\[(]?-[\w-]+", words[i - 1])  # `[--accel {…}]`
        if match and not after_option:
            found.update(match.group(1).split(","))
    return found


def _placeholder(token: str) -> bool:
    return token.isupper() or token in ("...", "…") or not re.fullmatch(r"[a-z][\w|-]*", token)


def check_cli(prog: str, words: list[str]) -> None:
    """Every subcommand and option of ``prog WORDS`` exists, per ``--help``."""
    main = {"pvctl": pvctl_cli.main, "pvhost": pvhost_cli.main}[prog]
    path: list[str] = []
    for raw in words:
        token = raw.strip("[]")
        text = _help(main, path)
        if token.startswith("-"):
            option = token.split("=")[0]
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text), (
                f"`{prog} {' '.join(words)}`: {prog} {' '.join(path)} has no option {option}"
            )
            continue
        choices = _choices(text)
        if "|" in token:
            missing = [t for t in token.split("|") if t not in choices]
            assert not missing, f"`{prog} {' '.join(words)}`: no {missing} in {choices}"
            path.append(token.split("|")[0])
        elif token in choices:
            path.append(token)
        elif choices and not _placeholder(token):
            pytest.fail(f"`{prog} {' '.join(words)}`: {token!r} is not one of {sorted(choices)}")


def _named_commands() -> list[tuple[str, list[str]]]:
    """``pvctl …`` / ``pvhost …`` in inline code and in command blocks."""
    text = README.read_text()
    spans = re.findall(r"`([^`\n]+)`", text)
    spans += [c for b in readme_blocks() if b.lang == "sh" for c in commands(b)]
    found = []
    for span in spans:
        words = span.split()
        for i, word in enumerate(words):
            prog = word.rsplit("/", 1)[-1]
            # `pvhost` the container's name (podman exec pvhost …) and the role are not the CLI.
            if (
                prog in ("pvctl", "pvhost")
                and i + 1 < len(words)
                and not (prog == "pvhost" and i > 0 and words[i - 1] == "exec")
            ):
                if prog == "pvhost" and words[i + 1] not in ("run", "--help", "-h"):
                    continue
                found.append((prog, words[i + 1 :]))
                break
    return found


def test_every_pvctl_and_pvhost_command_the_readme_names_exists() -> None:
    named = _named_commands()
    assert len(named) >= 10, named
    for prog, words in named:
        check_cli(prog, words)


def test_the_cli_check_catches_a_misspelled_command_or_option() -> None:
    check_cli("pvctl", ["remap", "on|off", "VM"])
    with pytest.raises(pytest.fail.Exception, match="not one of"):
        check_cli("pvctl", ["stauts"])
    with pytest.raises(AssertionError, match="no option --jsn"):
        check_cli("pvctl", ["status", "--jsn"])
    with pytest.raises(AssertionError, match="no option --image-dir"):
        check_cli("pvctl", ["vm", "start", "db1", "--image-dir", "X"])


def _ignored(paths: list[str]) -> set[str]:
    res = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"],
        input="\n".join(paths),
        capture_output=True,
        text=True,
        check=False,
    )
    return set(res.stdout.split())


def test_every_repository_path_the_readme_names_exists() -> None:
    top = {p.name for p in REPO.iterdir()}
    candidates = []
    for span in re.findall(r"`([^`\n]+)`", README.read_text()):
        for raw in span.split():
            word = raw.strip("(),;:")
            first = word.split("/", 1)[0]
            if "/" in word and first in top and not any(c in word for c in "<>*{}|…"):
                candidates.append(word.rstrip("/"))
    ignored = _ignored(candidates)  # build outputs (images/out/, .venv/) are made, not kept
    missing = [p for p in candidates if p not in ignored and not (REPO / p).exists()]
    assert len(candidates) >= 4, candidates
    assert not missing, f"README names paths that do not exist: {missing}"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize(
    "doc", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_every_relative_link_resolves(doc: Path) -> None:
    text = doc.read_text()
    # Pages other helpers write this session (their branches merge with this one).
    pending = {"docs/libvirt.md", "docs/guest-agent.md"}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        if rel in pending and not path.exists():
            continue
        assert path.exists(), f"{doc.name}: link to {target} (no {rel})"
        if anchor and path.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            assert anchor in slugs, f"{doc.name}: link to {target}: no heading #{anchor}"


def test_the_toml_examples_are_valid_pvhost_configuration() -> None:
    examples = [b for b in readme_blocks() if b.lang == "toml"]
    assert examples
    for block in examples:
        Config.model_validate(tomllib.loads(block.text))


def test_the_architecture_svg_was_rendered_from_its_current_source() -> None:
    source = REPO / "docs" / "architecture.dot"
    svg = (REPO / "docs" / "architecture.svg").read_text()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    match = re.search(r"<!-- source: docs/architecture\.dot sha256 ([0-9a-f]{64}) -->", svg)
    assert match, "docs/architecture.svg does not say which source it was rendered from"
    assert match.group(1) == digest, (
        "docs/architecture.dot changed after docs/architecture.svg was rendered: "
        "run docs/render-diagrams"
    )
    assert "](docs/architecture.svg)" in README.read_text()
