"""`dho --help` and every registered command's `--help` list every option and show its default."""

from __future__ import annotations

import re

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


def test_top_level_help_lists_every_command_with_its_whole_summary():
    """Each command's one-line summary is its explicit short_help, shown whole (typer's own cut at the first
    sentence made analyze's "How ce_head, kd_head and Eq.")."""
    text = _help(["--help"])
    assert "Dual-Head Optimization" in text
    for name in ["prepare", "index", "split"] + COMMAND_NAMES:
        short = COMMAND.commands[name].short_help
        assert short and not short.endswith("...") and f" {name} {short} " in text, (name, short)
    assert " analyze How the heads agree and fail, spectrum, probe, t-SNE " in text


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_help_mentions_every_option_with_its_default(name):
    text = _help([name, "--help"])
    command = COMMAND.commands[name]
    assert command.help and command.help.split("\n")[0].strip()[:30] in text
    assert "default: (" not in text  # a show_default text is shown as it is, not in click's parentheses
    missing = []  # options whose help shows no default
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.name in text.lower()
            continue
        for opt in param.opts + param.secondary_opts:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{name}: {opt} missing from --help"
        assert param.help, f"{name}: {param.opts[0]} has no help text"
        assert "[default:" not in param.help, f"{name}: {param.opts[0]} types its default; give show_default= instead"
        if param.required:
            continue
        if isinstance(param.show_default, str):
            squeezed = re.sub(r"\s", "", text)  # the wrapping may break a default's text anywhere, even after a '-'
            assert "[default:" + re.sub(r"\s", "", param.show_default) + "]" in squeezed, f"{name}: {param.opts[0]} default not shown"
            continue
        stated = re.search(r"required", param.help.lower()) is not None  # "[required unless ...]"
        auto = param.show_default is not False and param.default is not None and not (param.is_flag and param.default is False)
        missing.extend([] if stated or auto else [param.opts[0]])
        if auto:
            shown = str(param.default).lower() if not isinstance(param.default, bool) else ("" if not param.secondary_opts else param.opts[0].lstrip("-"))
            assert f"[default: {shown}" in text.lower(), f"{name}: {param.opts[0]} default {param.default!r} not shown"
    assert not missing, f"{name}: {missing} show no default; give them show_default= (or '[required ...]' in their help)"


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_every_command_shows_an_example_and_defaults_device_to_auto(name):
    text = _help([name, "--help"])
    assert f"Example: dho {name} " in text
    for param in COMMAND.commands[name].params:
        if "--device" in getattr(param, "opts", []):
            assert param.default in ("auto", None), f"{name}: --device defaults to {param.default!r}, not auto"


def _sections(name: str) -> dict[str, list[str]]:
    """The option sections of `dho NAME --help` as printed: title -> the options listed under it, in order."""
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    sections, title = {}, None
    for line in result.output.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title is not None and re.match(r"^  (-\w, )?--[\w-]+", line):
            sections[title].append(re.match(r"^  (?:-\w, )?(--[\w-]+)", line).group(1))
    return sections


def test_distill_and_precompute_help_group_their_options_in_panels():
    """`dho distill --help` lists its options under Run, Data, Model, Method, Optimisation and schedule, Logging and
    checkpoints, Speed, Distributed and Fidelity switches, in that order, each option once."""
    from dho.cli import (DATA, DISTRIBUTED, FIDELITY, LOGGING, METHOD, MODEL, OPTIM, PREPROCESS, RUN, SPEED, TARGETS,
                         TEACHER, VIEWS)

    distill = _sections("distill")
    assert list(distill) == ["Arguments", RUN, DATA, MODEL, METHOD, OPTIM, LOGGING, SPEED, DISTRIBUTED, FIDELITY, "Options"]
    assert distill[DATA][:2] == ["--labeled", "--labeled-cache"] and "--student" in distill[MODEL]
    assert {"--lr", "--epochs", "--batch-size", "--lr-schedule"} <= set(distill[OPTIM])
    assert {"--method", "--lambda", "--alpha", "--beta"} <= set(distill[METHOD])
    assert {"--forward", "--epoch", "--unlabeled-pool", "--vlm-heads"} <= set(distill[FIDELITY])
    assert distill[DISTRIBUTED] == ["--device", "--sync-bn"] and distill["Options"] == ["--help"]
    listed = [o for opts in distill.values() for o in opts]
    options = [p.opts[0] for p in COMMAND.commands["distill"].params if p.param_type_name == "option"] + ["--help"]
    assert sorted(listed) == sorted(options)  # every option once
    teacher = _sections("precompute-teacher")
    assert list(teacher) == ["Arguments", TEACHER, VIEWS, TARGETS, PREPROCESS, SPEED, DISTRIBUTED, "Options"]
    assert teacher[TEACHER] == ["--model", "--pretrained", "--templates", "--text-classifier-norm"]
    assert _sections("evaluate").keys() == {"Arguments", "Options"}  # a short list stays one section


def test_precompute_teacher_help_shows_the_functions_defaults():
    """The `[default: X]` of each `dho precompute-teacher` option is `precompute()`'s default (no drift: the CLI
    passes an option on only when it is given, so the function's default is the one that runs): the help renders
    dho.precompute_options.DEFAULTS, which must be the signature's."""
    import inspect

    from dho.cli import shown
    from dho.precompute import precompute
    from dho.precompute_options import DEFAULTS

    signature = {k: p.default for k, p in inspect.signature(precompute).parameters.items() if p.default is not p.empty}
    assert {k: signature[k] for k in DEFAULTS} == DEFAULTS
    text = _help(["precompute-teacher", "--help"])
    checked = 0
    for param in COMMAND.commands["precompute-teacher"].params:
        name = param.name.rstrip("_")
        if name not in signature or param.param_type_name == "argument" or param.required:
            continue
        default = signature[name]
        if param.default is not None:  # the CLI's own default (a flag): precompute's
            assert param.default == default, name
            continue
        if default is None:  # a text that says what None means ("none = dense", "from the pretrained config")
            assert param.show_default.startswith(("none", "auto", "from ", "on for CUDA")), (name, param.show_default)
            continue
        assert param.show_default == shown(default) and f"[default: {shown(default)}]" in text, (name, param.show_default)
        checked += 1
    assert checked >= 10, checked
