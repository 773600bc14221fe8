"""Prompt templates: every source of them, filling them with class names, and the mean over them.

A template is a string with `{}` where the class name goes. `resolve_templates(spec)` reads a spec:

    tip-adapter     the 7 ImageNet prompts of Tip-Adapter (the DHO reference code's; the teacher's default)
    openai          open_clip's 80 OPENAI_IMAGENET_TEMPLATES
    simple          "a photo of a {}."
    coop:NAME       the CoOp benchmark's prompt of dataset NAME (ImageNet: the 7 of Tip-Adapter)
    FILE            one template per line (blank lines skipped)
    [list]          the templates themselves

The zero-shot classifier of the teacher (Eq. 1) and the language-aware head init of a VLM student
are both `template_mean` of the text embeddings of `fill_templates(templates, classnames)` (class names
with `_` read with spaces, `PROMPT_NAMES`); each
caller keeps its own batching of the text encoder (batch composition changes float results).

torch and open_clip are imported where they are used, so resolving templates loads neither.
Out of scope: per-class templates, templates with more than one `{}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dho import coop
from dho.errors import ConfigError
from dho.names import TEACHER_TEMPLATES  # noqa: F401  "tip-adapter", the teacher's default (the reference code's)
from dho.text_files import read_lines

if TYPE_CHECKING:
    import torch

# The 7 ImageNet prompts of Tip-Adapter, used by the DHO reference code.
TIP_ADAPTER_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
BUILTIN = ("tip-adapter", "openai", "simple")  # the template sets selectable by name
STUDENT_INIT_TEMPLATES = ("a photo of a {}.",)  # VLM student head init; Alg. 1 input: "A photo of [CLASS]"
# How a class name becomes the name in a prompt: every "_" a space ("american_bulldog" -> "american bulldog"),
# as the DHO reference code, Tip-Adapter and CoOp fill templates (`classname.replace('_', ' ')`). Recorded in
# a cache's teacher identity (`teacher.prompt_names`, schema v5); caches of v1-v4 put the names in as given.
PROMPT_NAMES = "underscores-to-spaces"

# The CoOp benchmark's prompt per dataset (canonical `coop.SPECS` names); ImageNet keeps Tip-Adapter's 7,
# as the DHO reference code does.
COOP_TEMPLATES: dict[str, list[str]] = {
    "caltech101": ["a photo of a {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "sun397": ["a photo of a {}."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
    "imagenet": TIP_ADAPTER_TEMPLATES,
}


def builtin_templates(name: str) -> list[str]:
    """The built-in template set `name` (one of BUILTIN)."""
    if name == "openai":
        import open_clip  # here only: the teacher and the VLM student builder are open_clip's modules

        # open_clip stores them as functions of the class name; '{}' turns each back into a template.
        return [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    return {"tip-adapter": list(TIP_ADAPTER_TEMPLATES), "simple": list(STUDENT_INIT_TEMPLATES)}[name]


def coop_templates(name: str) -> list[str]:
    """The CoOp benchmark's prompt of dataset NAME (or one of CoOp's spellings); ImageNet: Tip-Adapter's 7."""
    return list(COOP_TEMPLATES[coop.coop_name(name)])


def resolve_templates(spec: str | Sequence[str]) -> list[str]:
    """Templates from a built-in name, coop:NAME, a file (one template per line) or a list; each must contain '{}'."""
    if isinstance(spec, (list, tuple)):
        templates = [str(t) for t in spec]
        source = "the given list"
    elif spec in BUILTIN:
        return builtin_templates(spec)
    elif str(spec).startswith("coop:"):
        return coop_templates(str(spec)[len("coop:"):])
    elif Path(spec).is_file():
        lines = read_lines(Path(spec), "template file")
        templates = [line.strip() for line in lines if line.strip()]
        source = f"template file {spec}"
    else:
        raise ConfigError(
            f"--templates {spec!r} is neither a built-in template set ({', '.join(BUILTIN)}), "
            "coop:DATASET (the CoOp benchmark's prompt), nor an existing file with one template per line"
        )
    if not templates:
        raise ConfigError(f"{source} holds no templates; write one template per line, e.g. 'a photo of a {{}}.'")
    for t in templates:
        if "{}" not in t:
            raise ConfigError(f"template {t!r} in {source} has no '{{}}' where the class name goes: every template "
                              "must contain '{}'")
    return templates


def prompt_name(classname: str) -> str:
    """The name a prompt shows for `classname` (the PROMPT_NAMES rule): underscores become spaces."""
    return classname.replace("_", " ")


def fill_templates(templates: Sequence[str], classnames: Sequence[str]) -> list[str]:
    """The prompts, class-major: every template with `{}` replaced by class 0's prompt name, then class 1's, ...
    (C * T); `prompt_name` turns each class name into the name in the prompt."""
    return [t.replace("{}", prompt_name(c)) for c in classnames for t in templates]


def template_mean(emb: "torch.Tensor", renormalize: bool) -> "torch.Tensor":
    """Per-class mean over the templates of text embeddings (..., T, D) -> (..., D), L2-normalised again
    with `renormalize` (Eq. 1's w_c when the embeddings are unit rows)."""
    import torch.nn.functional as F

    mean = emb.mean(dim=-2)  # (..., D)
    return F.normalize(mean, dim=-1) if renormalize else mean
