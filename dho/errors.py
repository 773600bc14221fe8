"""Errors that describe a problem with the user's input, files or environment.

The CLI prints them as one line (no traceback) and exits with status 2. Every message says
which file / shard / key is involved and what to do about it.
"""


class DhoError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class DatasetError(DhoError):
    """A dataset folder, manifest or shard is missing, inconsistent or corrupt."""


class CacheError(DhoError):
    """A teacher cache is missing, incomplete, of another schema, or built for other data."""


class ConfigError(DhoError):
    """An option or config value is invalid or inconsistent with the inputs."""


class Interrupted(DhoError):
    """SIGTERM/SIGINT/SIGUSR1 stopped a long command after it saved what can be resumed (exit status 3)."""

    EXIT_CODE = 3


def check_number(option: str, value, *, low=None, high=None, low_open: bool = False, integer: bool = False):
    """Return `value` if it is a finite number (an integer when `integer`) in [low, high] (low excluded when
    `low_open`); otherwise raise a ConfigError naming the option and the allowed range. The one range check
    every command's options go through where they enter (CLI, --config file or Python call)."""
    import math

    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        fmt = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
        if low is not None and high is not None:
            allowed = f"{kind} in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}]"
        elif low is not None:
            allowed = f"{kind} {'>' if low_open else '>='} {fmt(low)}"
        else:
            allowed = kind
        raise ConfigError(f"{option} must be {allowed}; got {value!r}")
    return value


def check_choice(option: str, value, choices) -> str:
    """Return `value` if it is one of `choices`, else a ConfigError listing them."""
    if value not in choices:
        hint = did_you_mean(value, map(str, choices)) if isinstance(value, str) else ""
        raise ConfigError(f"{option} must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")
    return value


def did_you_mean(name: str, choices, n: int = 3) -> str:
    """' (did you mean 'resnet18'?)' for the choices closest to `name` (difflib, case and '_'/'-' folded), else ''."""
    import difflib

    fold = lambda text: text.lower().replace("_", "-")  # noqa: E731
    scored = []
    for choice in dict.fromkeys(choices):
        matcher = difflib.SequenceMatcher(None, fold(name), fold(choice))
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6:
            scored.append((matcher.ratio(), choice))
    best = max((r for r, _ in scored), default=0.0)
    close = [c for r, c in sorted(scored, key=lambda rc: -rc[0]) if r >= max(0.6, best - 0.05)][:n]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
