"""dho: distill vision-language models into small classifiers with Dual-Head Optimization.

The Python API (`dho.api`): `dho.load_run(RUN)` and `dho.load_export(PATH)`. They are loaded on first use
(PEP 562), so `import dho` and `dho --help` start without torch.
"""

__version__ = "0.1.0"

_API = ("load_run", "load_export", "Run", "ExportedModel", "Predictions")  # dho.api's names, reached as dho.NAME
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from dho import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
