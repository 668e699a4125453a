"""The shell completions the packages install (`gpud completion bash|zsh|fish`, generated from
the argparse parser): run in the real shells, each offers exactly the commands and actions that
`gpud --help` and `gpud COMMAND --help` list, and file names only after a path option."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "COLUMNS": "200"}


def gpud(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gpud", *args], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def help_commands(path: str) -> list[str]:
    """The sub-commands `gpud PATH --help` lists under its COMMAND or ACTION heading."""
    text = gpud(*path.split(), "--help")
    block = re.search(r"^  [A-Z]+\n((?:    .*\n|              .*\n)+)", text, re.M)
    if block is None:
        return []
    return re.findall(r"^    (\S+)", block.group(1), re.M)


def command_paths() -> list[str]:
    """ "" and every command that has actions of its own (ports, gpus, keys, deploy)."""
    return ["", *(name for name in help_commands("") if help_commands(name))]


def need(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("completions")
    (where / "zsh").mkdir()
    files = {
        "bash": where / "gpud.bash",
        "zsh": where / "zsh" / "_gpud",
        "fish": where / "gpud.fish",
    }
    for shell, file in files.items():
        file.write_text(gpud("completion", shell))
    return files


def offered(shell: str, script: Path, line: str) -> list[str]:
    """What ``shell`` offers for the command line ``line`` (its real completion code)."""
    if shell == "bash":
        words = line.split() + ([""] if line.endswith(" ") else [])
        probe = (
            f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
            f'COMP_CWORD={len(words) - 1}; _gpud; printf "%s\\n" "${{COMPREPLY[@]}}"'
        )
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
        return out.stdout.split()
    if shell == "fish":
        probe = f"source {script}; complete -C {line!r}"
        out = subprocess.run(["fish", "-c", probe], capture_output=True, text=True, timeout=30)
        return [entry.split("\t")[0] for entry in out.stdout.splitlines()]
    # zsh: completion widgets need a terminal, so this reads the table `_gpud` describes from
    # (its words after a command path), loaded as compinit loads it, from the fpath.
    path = " ".join(line.split()[1:])
    probe = (
        f"fpath=({script.parent} $fpath); autoload -Uz compinit; compinit -u -D; "
        f'print -r -- "comp=$_comps[gpud]"; source {script}; '
        f'_gpud_words {path!r}; print -rl -- "${{(@)reply%%:*}}"'
    )
    out = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    assert lines and lines[0] == "comp=_gpud", out  # compinit found it and bound it to gpud
    return [w.replace("\\:", ":") for w in lines[1:]]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_shell_offers_the_commands_help_lists(shell: str, scripts: dict[str, Path]) -> None:
    need(shell)
    for path in command_paths():
        line = f"gpud {path} " if path else "gpud "
        words = offered(shell, scripts[shell], line)
        commands = [w for w in words if not w.startswith("-")]
        assert sorted(commands) == sorted(help_commands(path)), (shell, path, words)
        assert "--help" in words, (shell, path)


@pytest.mark.parametrize("shell", ["bash", "fish"])
def test_a_path_option_completes_files_and_a_number_nothing(
    shell: str, scripts: dict[str, Path], tmp_path: Path
) -> None:
    need(shell)
    (tmp_path / "gpud-a.toml").write_text("")
    assert offered(shell, scripts[shell], f"gpud status --config {tmp_path}/gpud-") == [
        f"{tmp_path}/gpud-a.toml"
    ]
    assert offered(shell, scripts[shell], "gpud ports lease --count ") == []


def test_zsh_and_fish_scripts_parse(scripts: dict[str, Path]) -> None:
    for shell in ("zsh", "fish"):
        need(shell)
        result = subprocess.run([shell, "-n", str(scripts[shell])], capture_output=True, text=True)
        assert result.returncode == 0, (shell, result.stderr)


def test_help_with_quotes_and_colons_survives_quoting() -> None:
    import argparse

    from gpud.manpage import fish_completion, zsh_completion

    parser = argparse.ArgumentParser(prog="gpud")
    sub = parser.add_subparsers()
    sub.add_parser("odd", help="it's a \\ test: with 'quotes' and $HOME")
    for shell, text in (("zsh", zsh_completion(parser)), ("fish", fish_completion(parser))):
        if shutil.which(shell) is None:
            continue
        if shell == "zsh":
            probe = f"{text}\n_gpud_words ''; print -r -- \"$reply[1]\""
            out = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True)
            assert out.stdout.strip() == "odd:it's a \\ test: with 'quotes' and $HOME", out
        else:
            probe = f"{text}\n__gpud_words ''"
            out = subprocess.run(["fish", "-c", probe], capture_output=True, text=True)
            assert out.stdout.splitlines()[0] == "odd\tit's a \\ test: with 'quotes' and $HOME", out
