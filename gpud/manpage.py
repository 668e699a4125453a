"""The man page and the shell completions, generated from the CLI's own argparse parser, so
they list every sub-command and option there is and cannot drift from `--help`.

Packaging runs them at build time: `gpud manpage > gpud.1` and `gpud completion SHELL` for
bash, zsh and fish (installed where each shell looks: packaging/build.py, COMPLETION_FILES).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

# Options whose value is a path: the completion offers file names for them.
PATH_OPTIONS = ("--config", "--socket", "--key")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command of ``parser``, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            found += [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return found


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every command below ``parser`` (depth first) as (words, help, parser)."""
    for name, help_text, sub in _subcommands(parser):
        yield (*path, name), help_text, sub
        yield from _walk(sub, (*path, name))


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
    ]


def _key(action: argparse.Action) -> tuple[tuple[str, ...], str]:
    return tuple(action.option_strings), action.help or ""


def _shared_options(
    parsers: Iterator[argparse.ArgumentParser],
) -> dict[tuple[tuple[str, ...], str], argparse.Action]:
    """Options that many commands share word for word (--config, --socket, --timeout, --json):
    listed once, not under each command."""
    count: dict[tuple[tuple[str, ...], str], int] = {}
    first: dict[tuple[tuple[str, ...], str], argparse.Action] = {}
    for sub in parsers:
        for action in _options(sub):
            if action.option_strings and action.help is not argparse.SUPPRESS:
                count[_key(action)] = count.get(_key(action), 0) + 1
                first.setdefault(_key(action), action)
    return {key: first[key] for key, n in count.items() if n >= 5}


def _roff(text: str) -> str:
    """``text`` safe in a roff line: backslashes and leading dots or quotes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _synopsis(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    flag = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flag
    metavar = action.metavar or action.dest.upper()
    return f"{flag} {metavar}"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {"default": action.default, "prog": "gpud"}
    if action.choices and not isinstance(action.choices, dict):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return text


def manpage(parser: argparse.ArgumentParser, version: str) -> str:
    """gpud(1) in roff: the synopsis, every command with its arguments and options, the exit
    status and the environment (the parser's epilog)."""
    lines = [
        f'.TH GPUD 1 "" "gpud {_roff(version)}" "gpud manual"',
        ".SH NAME",
        f"gpud \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        ".B gpud",
        "[\\-\\-version] COMMAND [ACTION] [OPTIONS]",
        ".SH COMMANDS",
    ]
    commands = list(_walk(parser))
    shared = _shared_options(sub for _, _, sub in commands)
    for words, help_text, sub in commands:
        lines += [".TP", f".B gpud {_roff(' '.join(words))}", _roff(help_text or "")]
        options = [a for a in _options(sub) if a.help is not argparse.SUPPRESS]
        own = [a for a in options if _key(a) not in shared]
        common = [a.option_strings[0] for a in options if _key(a) in shared]
        if own or common:
            lines.append(".RS")
            for action in own:
                lines += [".TP", f".B {_roff(_synopsis(action))}", _roff(_help(action))]
            if common:
                lines += [".TP", _roff(f"also {', '.join(common)}: see CLIENT OPTIONS")]
            lines.append(".RE")
    if shared:
        lines.append(".SH CLIENT OPTIONS")
        for action in shared.values():
            lines += [".TP", f".B {_roff(_synopsis(action))}", _roff(_help(action))]
    lines += [".SH EXIT STATUS AND ENVIRONMENT", _roff(parser.epilog or "")]
    lines += [
        ".SH FILES",
        ".TP",
        ".B /etc/gpud/gpud.toml",
        "the configuration (check it with `gpud agent \\-\\-check\\-config`)",
        ".TP",
        ".B /etc/gpud/cluster.key",
        "the cluster's gossip key (from `gpud keygen`)",
        ".TP",
        ".B /run/gpud/gpud.sock",
        "the local API socket the client commands talk to",
        ".TP",
        ".B /var/lib/gpud",
        "the state directory (leases, claims, votes, specs)",
        ".SH SEE ALSO",
        "/usr/share/doc/gpud/README.md, serf(1), systemctl(1)",
    ]
    return "\n".join(lines) + "\n"


class _Tree:
    """What every completion script needs: the words (sub-commands, then --options) after each
    command path with their help, and which options take a value or a path."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.words = {(): _words(parser)}
        self.words.update({words: _words(sub) for words, _, sub in _walk(parser)})
        flags = {
            flag
            for sub in [parser, *(s for _, _, s in _walk(parser))]
            for a in _options(sub)
            if a.option_strings and a.nargs != 0
            for flag in a.option_strings
        }
        self.paths = [o for o in PATH_OPTIONS if o in flags]
        self.values = sorted(flags - set(PATH_OPTIONS))


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script: sub-commands, then each command's options; file names after
    the options that take a path."""
    tree = _Tree(parser)
    cases = "\n".join(
        f'        "{" ".join(words)}") words="{" ".join(w for w, _ in choices)}" ;;'
        for words, choices in sorted(tree.words.items())
    )
    arms = _arm(tree.paths, 'COMPREPLY=($(compgen -f -- "$cur")); return') + _arm(
        tree.values, "COMPREPLY=(); return"
    )
    return f"""# bash completion for gpud (generated from its argparse parser: gpud completion bash)
_gpud() {{
    local cur prev path word words i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
{arms}    esac
    path=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        case "$word" in -*) continue ;; esac
        case " $(_gpud_words "$path") " in
            *" $word "*) path="${{path:+$path }}$word" ;;
        esac
    done
    COMPREPLY=($(compgen -W "$(_gpud_words "$path")" -- "$cur"))
}}
_gpud_words() {{
    local words=""
    case "$1" in
{cases}
    esac
    echo "$words"
}}
complete -F _gpud gpud
"""


def zsh_completion(parser: argparse.ArgumentParser) -> str:
    """A zsh completion function (an autoloaded ``_gpud``): the same words as for bash, each
    with its help as the description; file names after the options that take a path."""
    tree = _Tree(parser)
    cases = "\n".join(
        f"        {_zsh_quote(' '.join(words))}) reply=("
        + " ".join(_zsh_quote(w.replace(":", "\\:") + ":" + _one_line(h)) for w, h in choices)
        + ") ;;"
        for words, choices in sorted(tree.words.items())
    )
    return f"""#compdef gpud
# zsh completion for gpud (generated from its argparse parser: gpud completion zsh)
# `_gpud_words PATH` sets reply to the words after the command path PATH, as word:help.
_gpud_words() {{
    reply=()
    case "$1" in
{cases}
    esac
}}
_gpud() {{
    local cmdpath="" word i
    local -a reply choices
    case "${{words[CURRENT-1]}}" in
{_arm(tree.paths, "_files; return")}{_arm(tree.values, "return")}    esac
    for ((i = 2; i < CURRENT; i++)); do
        word="${{words[i]}}"
        [[ "$word" == -* ]] && continue
        _gpud_words "$cmdpath"
        (( ${{reply[(I)${{(b)word}}:*]}} )) && cmdpath="${{cmdpath:+$cmdpath }}$word"
    done
    _gpud_words "$cmdpath"
    choices=("${{reply[@]}}")
    _describe -t gpud-words 'gpud' choices
}}
if [[ "$funcstack[1]" == _gpud ]]; then
    _gpud "$@"
elif (( $+functions[compdef] )); then
    compdef _gpud gpud
fi
"""


def fish_completion(parser: argparse.ArgumentParser) -> str:
    """A fish completion script: the same words as for bash, each with its help; file names
    after the options that take a path, nothing offered after the other value options."""
    tree = _Tree(parser)
    cases = "\n".join(
        f"        case {_fish_quote(' '.join(words))}\n"
        + "\n".join(
            f"            printf '%s\\t%s\\n' {_fish_quote(w)} {_fish_quote(_one_line(h))}"
            for w, h in choices
        )
        for words, choices in sorted(tree.words.items())
    )
    paths = " ".join(_fish_quote(o) for o in tree.paths)
    values = " ".join(_fish_quote(o) for o in tree.values)
    return f"""# fish completion for gpud (generated from its argparse parser: gpud completion fish)
# `__gpud_words PATH` prints the words after the command path PATH, as word<TAB>help.
function __gpud_words
    switch "$argv[1]"
{cases}
    end
end
function __gpud_path
    set -l path ''
    for word in (commandline -opc)[2..-1]
        string match -q -- '-*' $word; and continue
        if contains -- $word (__gpud_words "$path" | string replace -r '\t.*' '')
            set path (string trim -- "$path $word")
        end
    end
    echo $path
end
function __gpud_after
    contains -- (commandline -opc)[-1] $argv
end
complete -c gpud -e
complete -c gpud -f
complete -c gpud -n '__gpud_after {paths}' -F
complete -c gpud -f -n 'not __gpud_after {paths} {values}' -a '(__gpud_words (__gpud_path))'
"""


def _arm(options: list[str], body: str) -> str:
    """A `case` arm (bash and zsh) for ``options``; none when there are none."""
    return f"        {'|'.join(options)}) {body} ;;\n" if options else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _zsh_quote(text: str) -> str:
    """``text`` in zsh's single quotes (nothing expands; a quote ends, is escaped, reopens)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_quote(text: str) -> str:
    """``text`` in fish's single quotes (only \\ and \\' are escapes there)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _words(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(word, help) of the sub-commands and the --options after ``parser``'s command."""
    subs = [(name, help_text) for name, help_text, _ in _subcommands(parser)]
    flags = [
        (f, _help(a) if a.help is not argparse.SUPPRESS else "")
        for a in parser._actions
        for f in a.option_strings
        if f.startswith("--")
    ]
    return subs + flags


COMPLETIONS = {"bash": bash_completion, "zsh": zsh_completion, "fish": fish_completion}


def cmd_manpage(args: argparse.Namespace) -> int:
    from gpud import __version__

    sys.stdout.write(manpage(args.root_parser, __version__))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(COMPLETIONS[args.shell](args.root_parser))
    return 0


def add_commands(sub: Any, root: argparse.ArgumentParser) -> None:
    """`gpud manpage` and `gpud completion SHELL` (``root``: the parser they describe)."""
    sub.add_parser(
        "manpage", help="print gpud(1), the man page, in roff (packaging installs it)"
    ).set_defaults(func=cmd_manpage, root_parser=root)
    completion = sub.add_parser(
        "completion", help="print a shell completion script (packaging installs it)"
    )
    completion.add_argument("shell", choices=sorted(COMPLETIONS), help="the shell")
    completion.set_defaults(func=cmd_completion, root_parser=root)
