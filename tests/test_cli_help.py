"""`dho --help` and every registered command's `--help` list every option and show its default."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from dho.cli import app

COMMAND = typer.main.get_command(app)
COMMAND_NAMES = sorted(COMMAND.commands)


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│]+", " ", result.output)  # undo rich's box drawing and line wrapping


def test_top_level_help_lists_every_command():
    text = _help(["--help"])
    assert "Dual-Head Optimization" in text
    for name in ["prepare", "index", "split"] + COMMAND_NAMES:
        assert name in text


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_help_mentions_every_option_with_its_default(name):
    text = _help([name, "--help"])
    command = COMMAND.commands[name]
    assert command.help and command.help.split("\n")[0].strip()[:30] in text
    missing = []  # options whose help shows no default
    for param in command.params:
        if isinstance(param, click.Argument):
            assert param.name in text.lower()
            continue
        for opt in param.opts + param.secondary_opts:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{name}: {opt} missing from --help"
        assert param.help, f"{name}: {param.opts[0]} has no help text"
        if param.required:
            continue
        explicit = re.search(r"default|required", param.help.lower()) is not None  # "[default: ...]", a sentence, or "[required unless ...]"
        auto = param.show_default is not False and param.default is not None and not (param.is_flag and param.default is False)
        missing.extend([] if explicit or auto else [param.opts[0]])
        if auto and not explicit:
            shown = str(param.default).lower() if not isinstance(param.default, bool) else ("" if not param.secondary_opts else param.opts[0].lstrip("-"))
            assert f"[default: {shown}" in text.lower(), f"{name}: {param.opts[0]} default {param.default!r} not shown"
    assert not missing, f"{name}: {missing} show no default; add '[default: ...]' (or '[required ...]') to their help"


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_every_command_shows_an_example_and_defaults_device_to_auto(name):
    text = _help([name, "--help"])
    assert f"Example: dho {name} " in text
    for param in COMMAND.commands[name].params:
        if "--device" in getattr(param, "opts", []):
            assert param.default in ("auto", None), f"{name}: --device defaults to {param.default!r}, not auto"


def test_precompute_teacher_help_shows_the_functions_defaults():
    """`Default: X.` in each `dho precompute-teacher` option's help is `precompute()`'s default (no drift: the
    CLI passes an option on only when it is given, so the function's default is the one that runs)."""
    import inspect

    from dho.precompute import precompute

    defaults = {k: p.default for k, p in inspect.signature(precompute).parameters.items()}
    checked = 0
    for param in COMMAND.commands["precompute-teacher"].params:
        m = re.search(r"Default: ([^ ]+?)\.(?:\s|$)", param.help or "")
        name = param.name.rstrip("_")
        if m is None or name not in defaults or not isinstance(defaults[name], (int, float, str)):
            continue
        shown, default = m.group(1), defaults[name]
        if isinstance(default, bool):
            assert shown == ("on" if default else "off"), name
        else:
            assert type(default)(shown) == default, (name, shown, default)
        checked += 1
    assert checked >= 10, checked
