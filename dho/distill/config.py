"""`DistillConfig`: every option of `dho distill` in one place, checked where it enters, and the one merge.

Options come from, in this order, each overriding the one before: the run's own RUN/config.json (with
`--resume RUN`), a `--config` YAML/JSON file, the command line. `merge` builds the config from them
with one strict rule: an unknown key anywhere is an error naming the file, a missing required option
an error naming the flag. `DistillConfig.__post_init__` then checks the type and range of every value,
wherever the config came from (command line, file, resumed run, Python). On --resume only the options in
`RESUME_FREE` may differ from the run's (`check_resume`): the others change the data order or the numbers.
`--resume auto` takes no base from the folder: the command names the whole run, as when it started.

A key of a `--config` file is the flag (`text-init`, `lambda`, `batch-size`; underscores work too) or the field
(`init_heads_from_text`, `lambda_`); RUN/config.yaml and `--print-config` write the flags (`DistillConfig.to_yaml`).
This module imports no torch, so the config of a command resolves before anything heavy loads.

Out of scope: configs of the other commands (they take flat arguments).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dho.errors import ConfigError, check_choice, check_number
from dho.names import ETA, GRAD_SURGERIES, HEAD_DROPOUT, HEAD_FORMS, METHODS, SURGERY_METHODS, TEXT_INIT_HEADS, VLM_HEADS, ZETA  # torch-free: the CLI builds and checks the config before torch loads

LR_SCHEDULES = ("warmup-cosine", "reference", "linear")
UNLABELED_POOLS = ("union", "exclude-labeled")
EPOCHS = ("unlabeled", "shorter")  # an epoch: one pass over the unlabeled stream, or over the shorter of the two
FORWARDS = ("joint", "separate")
DECODES = ("cpu", "gpu")  # where the training views are decoded and resampled (see dho/data/gpu_views.py)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
VIEW_SAMPLINGS = ("cycle", "random")
INTERPOLATIONS = ("bilinear", "bicubic")
REPORT_TO = ("jsonl", "tensorboard", "wandb")
BETA_GRIDS = ("wide", "reference")
TEACHER_CHOICE = re.compile(r"^[A-Za-z0-9._+-]+$")  # mean, a member's index or name (dho.ensemble.NAME)  # the names of dho.evaluate.BETA_GRIDS (the grids of an alpha/beta search)
# Options that may change on --resume without changing the result. Anything that changes the data order
# or the numerics (workers set the thread count and the consumers, the device the kernels, compile and
# decode the kernels and pixels) is refused on resume, so a resumed run stays bit-identical.
RESUME_FREE = {"log_every", "checkpoint_every", "max_steps", "val", "eval_every_epoch", "report_to", "keep_checkpoints",
               "run_name", "group", "tags"}
# The flag of each option whose name is not the field's with dashes (`lambda` is Python's keyword); RUN/config.yaml and
# --print-config key the options by their flags, --config reads both spellings (`flag_name`, `field_name`).
FLAGS = {"lambda_": "lambda", "init_heads_from_text": "text-init"}
# Names other tools give these options, suggested when a --config key is unknown (close spellings are found anyway).
SYNONYMS = {
    "learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "num_epochs": "epochs", "n_epochs": "epochs",
    "max_epochs": "epochs", "num_workers": "workers", "temperature": "eta", "kd_temperature": "eta", "model": "student",
    "arch": "student", "output_dir": "out", "out_dir": "out", "output": "out", "run_dir": "out", "clip_grad": "grad_clip",
    "max_grad_norm": "grad_clip", "gradient_clip_val": "grad_clip", "gradient_accumulation_steps": "accum_steps",
    "accumulate_grad_batches": "accum_steps", "warmup": "warmup_steps", "teacher_cache": "labeled_cache",
}
WANDB_TAG_CHARS = 64  # W&B refuses longer tags (and longer groups than WANDB_GROUP_CHARS) when the run is created
WANDB_GROUP_CHARS = 128


@dataclass(frozen=True)
class DistillConfig:
    """Every training option in one place; the defaults follow the paper (Table 6)."""

    labeled: str
    labeled_cache: str
    student: str
    out: str
    unlabeled: Optional[str] = None  # the unlabeled pool; samples already in `labeled` are not repeated
    unlabeled_cache: Optional[str] = None
    teacher: str = "mean"  # of an ensemble cache (`dho merge-caches`): mean | a member's INDEX or NAME
    method: str = "dho"
    student_pretrained: Optional[str] = None  # tag / local checkpoint / none (random init)
    epochs: int = 20  # few-shot ImageNet: 20; 10 datasets: 200; low-shot: 32
    batch_size: int = 64  # per side and global over ranks: B labeled + B unlabeled per step (paper: 256+256)
    lr: float = 1e-3  # low-shot CLIP students: 5e-5
    weight_decay: float = 1e-2  # low-shot CLIP students: 5e-2
    warmup_steps: int = 0  # linear warmup, then cosine decay to 0 (low-shot: 5000)
    warmup_fraction: Optional[float] = None  # warm-up as a fraction of all steps (overrides warmup_steps)
    lr_schedule: str = "warmup-cosine"  # or "reference" / "linear" (the authors' code; see dho/distill/schedule.py)
    unlabeled_pool: str = "union"  # unlabeled batches from labeled ∪ unlabeled, or "exclude-labeled" (reference code)
    epoch: str = "unlabeled"  # one pass over the unlabeled stream, or "shorter" (the reference's zip of two loaders)
    forward: str = "joint"  # one forward over [labeled; unlabeled], or "separate" (two: BatchNorm statistics apart)
    select_best_on_val: bool = False  # keep the epoch best on --val (alpha/beta searched there), as the reference
    beta_grid: str = "wide"  # the beta grid of that search (dho.evaluate.BETA_GRIDS); "reference": train_others.py's
    lambda_: float = 0.5  # L = lambda * L_CE + (1 - lambda) * L_KD
    eta: float = ETA  # KD temperature; the cache is re-tempered exactly if it was stored at another eta
    zeta: float = ZETA  # scale 1/zeta of the aligned cosine kd_head (VLM students)
    alpha: float = 0.5  # inference mix of the heads (Eq. 11), stored with the model
    beta: float = 0.5  # inference temperature of kd_head (Eq. 11)
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    workers: int = 2  # DataLoader workers per rank (decode + crop replay)
    seed: int = 0
    view_sampling: str = "cycle"  # cycle: view = pass mod V; random: per (seed, key, pass)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    accum_steps: int = 1  # gradient accumulation: each optimiser step = accum_steps forward passes
    grad_surgery: str = "none"  # "pcgrad": CE and KD gradients projected off each other when they conflict (Yu et al.
    #                             2020), as the authors' train_imgnet_pc_grad.py on ce+kd (dho/distill/surgery.py)
    ema: Optional[float] = None  # decay of an EMA of the student's weights (timm's ModelEmaV3); the run's model is the EMA
    ema_warmup: bool = False  # the EMA's decay warms up as min(ema, 1 - (1 + step)^(-2/3)) (timm's warmup)
    checkpoint_every: int = 500  # steps between checkpoints (also written at the end of each epoch)
    log_every: int = 20  # steps between metric lines
    max_steps: Optional[int] = None  # stop early after this many steps (smoke runs); the schedule keeps its length
    val: Optional[str] = None  # validation dataset evaluated at the end (and per epoch with eval_every_epoch)
    eval_every_epoch: bool = False
    log_grad_cosine: int = 0  # every N steps: the gradient-conflict diagnostics of Figs. 4 and 13; 0 = off
    init_heads_from_text: bool = True  # language-aware init of both heads (VLM students)
    text_init_heads: str = "both"  # which heads the text init sets: both | ce | kd (Table 5's per-head rows)
    align_kd_head: bool = True  # kd_head aligned with the teacher's rule, Eq. 10 (VLM students)
    vlm_heads: str = "reference"  # form of the aligned head and text init: "reference" (authors' code) | "eq10"
    ce_head: str = "linear"  # linear (§3.2, every main result) | mlp: Linear -> LayerNorm -> GELU -> Dropout -> Linear (§E.2)
    kd_head: str = "linear"  # the same for kd_head (Table 14: NL-Head-CE, NL-Head-KD, NL-Head-CE+KD)
    head_hidden: Optional[int] = None  # hidden width H of the mlp heads; None = the feature dim D (the paper gives none)
    head_dropout: float = HEAD_DROPOUT  # dropout of the mlp heads (the paper gives none)
    freeze_backbone: bool = False  # g frozen (linear evaluation / prompt tuning, Table 13): only heads and prompts train
    vpt_tokens: int = 0  # VPT-deep prompt tokens per prompted block (open_clip ViT students); 0 = none
    vpt_depth: int = 0  # blocks whose input gets new prompts (Table 13: 3 or 9); 0 with vpt_tokens 0
    coop_context: int = 0  # CoOp (Table 13): ce_head = N learned context vectors through the frozen text tower; 0 = none
    promptsrc_tokens: int = 0  # PromptSRC (Table 13): N prompt tokens per prompted block of both towers; 0 = none
    promptsrc_depth: int = 0  # PromptSRC: blocks of each tower whose input gets new prompts (its DG config: 3)
    interpolation: Optional[str] = None  # student resampling (bilinear | bicubic); None = the student's own
    window: int = 2  # shards per shuffle window of each consumer
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over all ranks (SyncBatchNorm)
    compile: bool = False  # torch.compile the student's forward + loss (execution only: same math, fused kernels)
    report_to: str = "jsonl"  # metrics sinks, comma-separated: jsonl (always) | tensorboard | wandb
    keep_checkpoints: int = 1  # checkpoints kept: last.pt, plus step-S.pt of the newest N when N > 1
    decode: str = "cpu"  # cpu: workers decode + replay the views (PIL); gpu: JPEG batches decoded on the CUDA device
    run_name: Optional[str] = None  # the W&B run's display name; None: the run folder's name
    group: Optional[str] = None  # the W&B group (runs of one sweep or seed set side by side)
    tags: Optional[str] = None  # W&B tags, comma-separated

    def __post_init__(self) -> None:
        """Type and range of every option, wherever the config came from (command line, --config YAML,
        config.json on resume, Python): YAML's `5e-5` arrives as a string and becomes a float here."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), str(f.type)))
        if not self.student.strip():
            raise ConfigError("--student must name a student (see `dho distill --help`)")
        if not TEACHER_CHOICE.match(self.teacher):
            raise ConfigError(f"--teacher {self.teacher!r}: give mean, a teacher's index (0, 1, ...) or its name in the "
                              "ensemble cache (see `dho cache-info CACHE`)")
        for option, value, choices in (
            ("--method", self.method, METHODS), ("--lr-schedule", self.lr_schedule, LR_SCHEDULES),
            ("--unlabeled-pool", self.unlabeled_pool, UNLABELED_POOLS), ("--epoch", self.epoch, EPOCHS),
            ("--forward", self.forward, FORWARDS), ("--precision", self.precision, PRECISIONS),
            ("--view-sampling", self.view_sampling, VIEW_SAMPLINGS), ("--vlm-heads", self.vlm_heads, VLM_HEADS),
            ("--decode", self.decode, DECODES), ("--text-init-heads", self.text_init_heads, TEXT_INIT_HEADS),
            ("--grad-surgery", self.grad_surgery, GRAD_SURGERIES),
            ("--ce-head", self.ce_head, HEAD_FORMS), ("--kd-head", self.kd_head, HEAD_FORMS),
        ):
            check_choice(option, value, choices)
        if self.grad_surgery != "none" and self.method not in SURGERY_METHODS:
            raise ConfigError(f"--grad-surgery {self.grad_surgery} projects two loss terms apart; --method {self.method} has "
                              f"one: use --method {' | '.join(SURGERY_METHODS)} or --grad-surgery none")
        if self.ema is not None:
            check_number("--ema", self.ema, low=0, high=1, low_open=True)
            if self.ema == 1:
                raise ConfigError("--ema 1 never moves from the initial weights; give a decay below 1 (e.g. 0.999) or leave --ema out")
        elif self.ema_warmup:
            raise ConfigError("--ema-warmup warms up the EMA of --ema DECAY; give --ema too (e.g. --ema 0.999)")
        if self.head_hidden is not None:
            check_number("--head-hidden", self.head_hidden, low=1, integer=True)
        if check_number("--head-dropout", self.head_dropout, low=0, high=1) == 1:
            raise ConfigError("--head-dropout must be in [0, 1); got 1 (every hidden unit dropped)")
        if self.ce_head == self.kd_head == "linear" and (self.head_hidden is not None or self.head_dropout != HEAD_DROPOUT):
            raise ConfigError("--head-hidden and --head-dropout shape the mlp heads; give --ce-head mlp and/or --kd-head mlp, "
                              "or leave them out")
        check_number("--vpt-tokens", self.vpt_tokens, low=0, integer=True)
        check_number("--vpt-depth", self.vpt_depth, low=0, integer=True)
        if (self.vpt_tokens > 0) != (self.vpt_depth > 0):
            raise ConfigError(f"VPT needs both --vpt-tokens N and --vpt-depth D >= 1 (got {self.vpt_tokens} and "
                              f"{self.vpt_depth}); give both, or neither for the plain tower")
        check_number("--coop-context", self.coop_context, low=0, integer=True)
        if self.coop_context and not self.freeze_backbone:
            raise ConfigError("--coop-context trains CoOp's context with both CLIP towers frozen; add --freeze-backbone")
        if self.coop_context and self.ce_head != "linear":
            raise ConfigError("--coop-context makes ce_head CoOp's text classifier; drop --ce-head mlp")
        self._check_promptsrc()
        if self.freeze_backbone and self.log_grad_cosine and not self.vpt_tokens:
            raise ConfigError("--log-grad-cosine compares the gradients of g's parameters, and --freeze-backbone trains none "
                              "of them; drop one (with --vpt-tokens the prompts are those parameters)")
        if self.warmup_fraction is not None:
            check_number("--warmup-fraction", self.warmup_fraction, low=0, high=1)
        check_choice("--beta-grid", self.beta_grid, BETA_GRIDS)
        if self.select_best_on_val and self.val is None:
            raise ConfigError("--select-best-on-val needs --val DATASET (a validation split)")
        report_sinks(self.report_to)  # names and installed packages, before anything runs
        self.tag_list()  # each tag W&B accepts
        if self.group is not None and not 0 < len(self.group) <= WANDB_GROUP_CHARS:
            raise ConfigError(f"--group must be 1 to {WANDB_GROUP_CHARS} characters (W&B's limit); got {len(self.group)}")
        if self.run_name is not None and not self.run_name.strip():
            raise ConfigError("--run-name must not be empty; leave it out to name the W&B run after the run folder")
        if self.interpolation is not None:
            check_choice("--interpolation", self.interpolation, INTERPOLATIONS)
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--accum-steps", self.accum_steps),
                              ("--checkpoint-every", self.checkpoint_every), ("--log-every", self.log_every),
                              ("--window", self.window), ("--keep-checkpoints", self.keep_checkpoints)):
            check_number(option, value, low=1, integer=True)
        for option, value in (("--warmup-steps", self.warmup_steps), ("--workers", self.workers),
                              ("--log-grad-cosine", self.log_grad_cosine)):
            check_number(option, value, low=0, integer=True)
        check_number("--seed", self.seed, low=0, high=2**32 - 1, integer=True)
        if self.max_steps is not None:
            check_number("--max-steps", self.max_steps, low=1, integer=True)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--weight-decay", self.weight_decay, low=0)
        check_number("--grad-clip", self.grad_clip, low=0)
        check_number("--lambda", self.lambda_, low=0, high=1)
        check_number("--alpha", self.alpha, low=0, high=1)
        for option, value in (("--eta", self.eta), ("--zeta", self.zeta), ("--beta", self.beta)):
            check_number(option, value, low=0, low_open=True)

    def _check_promptsrc(self) -> None:
        """--promptsrc-tokens / --promptsrc-depth: both or neither, on frozen towers, with a method whose CE term L_SCL
        can join (Objective.ce_share), and without what would replace its prompts or its GPA model."""
        check_number("--promptsrc-tokens", self.promptsrc_tokens, low=0, integer=True)
        check_number("--promptsrc-depth", self.promptsrc_depth, low=0, integer=True)
        if (self.promptsrc_tokens > 0) != (self.promptsrc_depth > 0):
            raise ConfigError(f"PromptSRC needs both --promptsrc-tokens N and --promptsrc-depth D >= 1 (got "
                              f"{self.promptsrc_tokens} and {self.promptsrc_depth}); its DG config: 4 and 3")
        if not self.promptsrc_tokens:
            return
        from dho.distill.objective import PROMPTSRC_METHODS  # torch: only when PromptSRC is asked for

        if not self.freeze_backbone:
            raise ConfigError("--promptsrc-tokens trains prompts with both CLIP towers frozen; add --freeze-backbone")
        if self.method not in PROMPTSRC_METHODS:
            raise ConfigError(f"--promptsrc-tokens trains ce_head with PromptSRC's losses: use --method "
                              f"{' or '.join(PROMPTSRC_METHODS)} (PromptSRC alone / with DHO), not {self.method}")
        clashes = [flag for flag, on in (("--coop-context", self.coop_context), ("--vpt-tokens", self.vpt_tokens),
                                         ("--ce-head mlp", self.ce_head != "linear"), ("--ema", self.ema is not None),
                                         ("--select-best-on-val", self.select_best_on_val),
                                         ("--grad-surgery", self.grad_surgery != "none"),
                                         ("--log-grad-cosine", self.log_grad_cosine)) if on]
        if clashes:
            raise ConfigError(f"--promptsrc-tokens brings its own prompts, text classifier and GPA model; drop "
                              f"{', '.join(clashes)}")

    @classmethod
    def check_keys(cls, values: dict, where: str, spelled: Optional[dict] = None) -> None:
        """An option key that is not a field is an error naming `where` (the file it came from), the keys as `spelled`
        there (field -> the key as written), and the option each one probably means."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            spelled = spelled or {}
            names = [spelled.get(k, k) for k in unknown]
            hints = [f"{name}: did you mean {' or '.join(flag_name(c) for c in close)}?" for name, k in zip(names, unknown)
                     if (close := _close_options(k, known))]
            raise ConfigError(f"{where}: unknown option keys {names}" + (f" ({'; '.join(hints)})" if hints else "")
                              + f"; known: {sorted(flag_name(k) for k in known)}")

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "DistillConfig":
        """The config of `values`, strictly: an unknown key is an error naming `where`, a missing required
        one an error naming its flag."""
        cls.check_keys(values, where)
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ConfigError("missing " + ", ".join("--" + flag_name(k) for k in missing)
                              + " (on the command line or in --config)")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> "DistillConfig":
        """Strict load of a resolved config.json (a run's)."""
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The options keyed by their flags, as YAML (RUN/config.yaml, --print-config); `--config` reads it back to
        this config."""
        import yaml

        header = ("# dho distill options, keyed by their flags (RUN/config.json holds the same under Python names).\n"
                  "# Rerun or continue with: dho distill --config THIS_FILE [--resume auto]\n")
        return header + yaml.safe_dump({flag_name(k): v for k, v in self.to_dict().items()}, sort_keys=False,
                                       allow_unicode=True, default_flow_style=False, width=1000)

    def tag_list(self) -> list[str]:
        """--tags 'sweep-3, r18' -> ['sweep-3', 'r18'], checked: no empty tag, none longer than W&B allows."""
        if self.tags is None:
            return []
        tags = [t.strip() for t in self.tags.split(",")]
        if not all(tags):
            raise ConfigError(f"--tags {self.tags!r} has an empty tag; give comma-separated names, e.g. --tags sweep-3,r18")
        long = [t for t in tags if len(t) > WANDB_TAG_CHARS]
        if long:
            raise ConfigError(f"--tags: {long[0]!r} is longer than {WANDB_TAG_CHARS} characters (W&B's limit); shorten it")
        return list(dict.fromkeys(tags))


def flag_name(field: str) -> str:
    """The option's flag without its dashes: lambda_ -> lambda, init_heads_from_text -> text-init, batch_size -> batch-size."""
    return FLAGS.get(field, field.replace("_", "-"))


def field_name(key) -> str:
    """A key of --config, spelled as the flag (text-init, text_init, lambda, batch-size) or as the field
    (init_heads_from_text, lambda_, batch_size) -> the field's name."""
    key = str(key).replace("-", "_")
    return next((field for field, flag in FLAGS.items() if flag.replace("-", "_") == key), key)


def _close_options(key: str, known: list[str]) -> list[str]:
    """The options an unknown key probably means: another tool's name for it, or the (at most two) closest spellings."""
    if key in SYNONYMS:
        return [SYNONYMS[key]]
    flags = {flag_name(k).replace("-", "_"): k for k in known}
    matches = [flags.get(m, m) for m in difflib.get_close_matches(key, list(flags) + known, n=4, cutoff=0.75)]
    return list(dict.fromkeys(matches))[:2]


def _coerce(name: str, value, annotation: str):
    """A config value as its field's type: numbers from strings (YAML reads `5e-5` as a string), ints
    from integral floats; anything else that does not fit is a ConfigError naming the option."""
    option = "--" + flag_name(name)
    optional = annotation.startswith("Optional[")
    kind = annotation[len("Optional["):-1] if optional else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{option} needs a value")
    try:
        if kind == "int" and not isinstance(value, bool):
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and number.is_integer():
                number = int(number)
            if isinstance(number, int):
                return number
        elif kind == "float" and not isinstance(value, bool):
            return float(value)
        elif kind == "bool" and isinstance(value, bool):
            return value
        elif kind == "str" and isinstance(value, (str, Path)):
            return str(value)
    except (TypeError, ValueError):
        pass
    wanted = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind, kind)
    raise ConfigError(f"{option} must be {wanted}; got {value!r}")


def report_sinks(report_to: str) -> list[str]:
    """--report-to 'tensorboard,wandb' -> ['jsonl', 'tensorboard', 'wandb'] (jsonl always), checked:
    an unknown name or a sink whose package is missing is a one-line error before training starts."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report-to {report_to!r}: unknown {unknown}; choose from {', '.join(REPORT_TO)} (comma-separated)")
    sinks = ["jsonl"] + [n for n in REPORT_TO[1:] if n in names]
    for sink in sinks[1:]:
        try:
            __import__(sink)  # the package is named as the sink
        except ImportError:
            raise ConfigError(f"--report-to {sink} needs the {sink} package, which is not installed: "
                              f"pip install 'dho[{sink}]' (or drop {sink} from --report-to)") from None
    return sinks


def load_options_file(path: Path) -> dict:
    """A YAML or JSON mapping of option names (flags or fields, underscores or dashes: text-init, text_init,
    init_heads_from_text) to values -> {field: value}."""
    return read_options_file(path)[0]


def read_options_file(path: Path) -> tuple[dict, dict]:
    """`load_options_file`, and how each key was written there -> ({field: value}, {field: key as written})."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        """YAML's mappings with a repeated key refused (PyYAML keeps the last one silently)."""

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"--config {path}: option {key!r} is given twice (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeys)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__}); "
                          "write one `option: value` per line") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    out, spelled = {}, {}
    for k, v in raw.items():
        key = field_name(k)
        if key in out:  # batch-size beside batch_size, text-init beside init_heads_from_text: two spellings of one option
            raise ConfigError(f"--config {path}: {spelled[key]!r} and {k!r} are one option; keep one")
        out[key], spelled[key] = v, k
    return out, spelled


def merge(given: dict, options_file: Optional[Path] = None, resume_dir: Optional[Path] = None,
          resume: bool | str = False) -> DistillConfig:
    """The config of one `dho distill` command: RUN/config.json of `resume_dir` (`--resume RUN`), then the
    `--config` file, then the options `given` on the command line (None = not given), each overriding the
    one before (see the module docstring). With resume="auto" (`--resume auto`) the command names the whole
    run itself, as when it started: `--out` and the options, never a base from the folder."""
    values: dict = {}
    if resume == "auto" and resume_dir is not None:
        raise ConfigError(f"--resume auto takes the run from --out; {resume_dir} names a second one")
    if resume_dir is not None:  # `--resume RUN_DIR`: the run's own resolved options are the base
        from dho.run_dir import RunDir  # imports torch: only on resume (a new run's config is checked before torch loads)

        run = RunDir(resume_dir)
        if not resume:
            raise ConfigError(f"a run folder ({resume_dir}) is given without --resume; to start a run use --out")
        if not run.config.is_file():
            raise ConfigError(f"--resume {resume_dir}: no run there (no {run.config.name}); give the folder that "
                              "`dho distill --out` wrote")
        if given.get("out") is not None and Path(given["out"]).resolve() != Path(resume_dir).resolve():
            raise ConfigError(f"--resume {resume_dir} and --out {given['out']} name two runs; give one")
        stored = run.read_config()
        DistillConfig.check_keys(stored, str(run.config))
        values.update(stored, out=str(resume_dir))
    if options_file is not None:
        from_file, spelled = read_options_file(options_file)
        DistillConfig.check_keys(from_file, f"--config {options_file}", spelled)
        values.update(from_file)
    values.update({k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None})
    if resume == "auto" and values.get("out") is None:
        raise ConfigError("--resume auto needs --out RUN, the run to start or continue (on the command line or in "
                          "--config); to continue the run folder named auto, write `--resume ./auto`")
    if values.get("student_pretrained") in ("none", ""):
        values["student_pretrained"] = None
    return DistillConfig.from_dict(values, "the command line")


def check_resume(old: DistillConfig, new: DistillConfig, out: Path, auto: bool = False) -> None:
    """Refuse a resume whose options differ from the run's in anything but RESUME_FREE."""
    diffs = [f.name for f in dataclasses.fields(new) if f.name not in RESUME_FREE and getattr(old, f.name) != getattr(new, f.name)]
    if diffs:
        changed = ", ".join(f"{d}: {getattr(old, d)!r} -> {getattr(new, d)!r}" for d in diffs)
        if auto:  # the command of a requeued job met another run in its --out
            raise ConfigError(f"--resume auto: {out} holds a run made with other options ({changed}); they change the data "
                              f"order or the numerics: give the options of that run (`dho distill --resume {out}` takes them "
                              "from its config.json), or choose another --out")
        raise ConfigError(f"--resume with changed options ({changed}); they change the data order or the numerics: "
                          f"resume with the run's options (`dho distill --resume {out}` takes them from its config.json)")
