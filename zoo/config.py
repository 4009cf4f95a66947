"""Configuration: one dataclass per section, YAML files with ``defaults:`` composition, ``a.b=c`` overrides.

Precedence: dataclass defaults < config files in order (a file's ``defaults: [base.yaml]`` loads first, relative to
that file) < ``key=value`` overrides in order. Keys and types are strict everywhere; a mistake raises
``ConfigError`` with one line (``unknown key 'model.dimm' (command line); did you mean 'model.dim'?``).

This module imports neither torch nor lightning, so a bad key fails in a tenth of a second.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from zoo.data.tasks import InductionConfig, MQARConfig, NIAHConfig, SelectiveCopyConfig


from zoo.errors import ConfigError  # noqa: E402  (re-exported: ``from zoo.config import ConfigError``)


def _choices(*values: str, help: str) -> Any:
    return {"choices": values, "help": help}


# ----------------------------------------------------------------------------------------------------- sections
@dataclass
class AttentionConfig:
    """Options of the ``attention`` mixer (``zoo.layers.Attention``)."""

    heads: int = field(default=4, metadata={"help": "query heads"})
    kv_heads: Optional[int] = field(default=None, metadata={"help": "key/value heads (grouped-query); null = heads"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width; null = dim // heads"})
    window: Optional[int] = field(default=None, metadata={"help": "sliding-window length; null = full causal"})
    persistent_tokens: int = field(default=0, metadata={"help": "learned prefix tokens visible to every query"})
    causal: bool = field(default=True, metadata={"help": "false = bidirectional (encoders)"})
    rope: bool = field(default=True, metadata={"help": "rotary position embeddings on queries and keys"})
    conv_size: int = field(default=0, metadata={"help": "residual short causal conv on the input (0 = none)"})
    rope_base: float = field(default=10000.0, metadata={"help": "rotary base frequency"})


@dataclass
class TitansConfig:
    """Options of the Titans mixers: ``titans`` (the LMM alone), ``titans_mac``, ``titans_mag``, ``titans_mal``."""

    heads: int = field(default=4, metadata={"help": "memory (and attention) heads"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width d; null = dim // heads"})
    memory_depth: int = field(default=2, metadata={"help": "layers L of the memory MLP (1 = matrix memory)"})
    memory_expansion: int = field(default=4, metadata={"help": "hidden width of the memory MLP / d"})
    chunk_size: int = field(default=16, metadata={"help": "tokens b whose gradients share the chunk-start weights"})
    conv_size: int = field(default=4, metadata={"help": "short causal conv on q, k, v"})
    momentum: bool = field(default=True, metadata={"help": "false = the paper's 'w/o momentum' ablation"})
    forget: bool = field(default=True, metadata={"help": "false = the paper's 'w/o weight decay' ablation"})
    theta_max: float = field(default=1.0, metadata={"help": "upper bound of the inner learning rate"})
    segment_len: int = field(default=128, metadata={"help": "MAC segment length C (a multiple of chunk_size)"})
    window: int = field(default=128, metadata={"help": "MAG/MAL sliding-window length"})
    persistent_tokens: int = field(default=16, metadata={"help": "learned persistent-memory tokens N_p (hybrids)"})


@dataclass
class MoMConfig:
    """Options of ``mom`` (Mixture-of-Memories) and ``gdn`` (Gated DeltaNet, the one-memory baseline)."""

    heads: int = field(default=2, metadata={"help": "heads H"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head key/value width d; null = dim // heads"})
    num_memories: int = field(default=4, metadata={"help": "routed memories M (mom only)"})
    topk: int = field(default=2, metadata={"help": "memories each token is routed to (mom only)"})
    shared_memory: bool = field(default=True, metadata={"help": "add the always-on shared memory (mom only)"})
    aux_loss_scale: float = field(default=1e-3, metadata={"help": "weight of the load-balancing loss (mom only)"})


@dataclass
class MambaConfig:
    """Options of ``mamba`` (Mamba-1, S6) and ``bimamba`` (Vim's bidirectional block)."""

    d_state: int = field(default=16, metadata={"help": "SSM state size N"})
    d_conv: int = field(default=4, metadata={"help": "depthwise causal conv width"})
    expand: int = field(default=2, metadata={"help": "inner width E / dim"})
    dt_rank: Optional[int] = field(default=None, metadata={"help": "rank R of the delta projection; null = ceil(dim/16)"})


@dataclass
class Mamba2Config:
    """Options of ``mamba2`` (state-space duality)."""

    d_state: int = field(default=64, metadata={"help": "SSM state size N"})
    headdim: int = field(default=32, metadata={"help": "head width P"})
    ngroups: int = field(default=1, metadata={"help": "groups G sharing B and C"})
    chunk_size: int = field(default=64, metadata={"help": "SSD chunk length"})
    expand: int = field(default=2, metadata={"help": "inner width E / dim"})
    d_conv: int = field(default=4, metadata={"help": "depthwise causal conv width"})


@dataclass
class MemoryFormerConfig:
    """Options of the ``memoryformer`` block (``MemoryAttention`` mixer + ``MemoryFFN``, hash-lookup layers)."""

    heads: int = field(default=4, metadata={"help": "attention heads"})
    tau: int = field(default=8, metadata={"help": "bits per hash chunk: each table has 2^tau rows"})
    score: str = field(default="prob", metadata=_choices(
        "prob", "l1prob", help="bucket weight: the paper's product of sigmoids, or the released code's L1 form"))
    rotary_pct: float = field(default=0.25, metadata={"help": "fraction of each head's channels rotated by RoPE"})


@dataclass
class VisionConfig:
    """Options of ``model.architecture=vision`` (``VisionClassifier``: patch embedding, middle class token)."""

    image_size: int = field(default=8, metadata={"help": "square input images of this many pixels per side"})
    channels: int = field(default=1, metadata={"help": "input channels"})
    patch_size: int = field(default=2, metadata={"help": "square patch side"})
    num_classes: int = field(default=10, metadata={"help": "output classes"})


@dataclass
class ModelConfig:
    """The network: a stack of pre-norm blocks built from ``pattern``, repeated to ``depth`` blocks."""

    architecture: str = field(default="lm", metadata=_choices(
        "lm", "vision", help="lm = decoder language model; vision = image classifier over patches"))
    vocab_size: int = field(default=258, metadata={"help": "token vocabulary (at least the data's)"})
    dim: int = field(default=128, metadata={"help": "model width D"})
    depth: int = field(default=2, metadata={"help": "number of blocks"})
    pattern: list = field(default_factory=lambda: ["attention"],
                          metadata={"help": "mixer names repeated to depth; 'mlp' is an MLP-only block"})
    mlp: str = field(default="swiglu", metadata=_choices("swiglu", "none", help="channel mixer of each block"))
    mlp_expansion: float = field(default=8 / 3, metadata={"help": "SwiGLU hidden width / dim"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the input embedding with the LM head"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the embeddings and each residual branch"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    init_std: float = field(default=0.02, metadata={"help": "std of embedding and linear initialisation"})
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    titans: TitansConfig = field(default_factory=TitansConfig)
    mom: MoMConfig = field(default_factory=MoMConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    memoryformer: MemoryFormerConfig = field(default_factory=MemoryFormerConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


@dataclass
class DataConfig:
    """What the model reads: bundled KJV text, local text files, or a synthetic memory task."""

    name: str = field(default="kjv", metadata=_choices(
        "kjv", "text", "mqar", "selective_copy", "induction", "niah", "digits",
        help="kjv = bundled King James text; text = local files in data.path; digits = scikit-learn's 8x8 "
             "digits (vision); others are synthetic tasks"))
    path: Optional[str] = field(default=None, metadata={"help": "local .txt/.jsonl/.parquet file (data.name=text)"})
    text_field: str = field(default="text", metadata={"help": "column holding text in .jsonl/.parquet files"})
    tokenizer: str = field(default="bytes", metadata={"help": "'bytes' or a path to a tokenizer.json"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window (text data)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per device per step"})
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per evaluation batch"})
    seed: int = field(default=0, metadata={"help": "seed of the data (shuffling, synthetic examples)"})
    split: str = field(default="book", metadata=_choices(
        "book", "fraction", help="held-out text: the last 10% of books, or a random fraction of chapters"))
    val_fraction: float = field(default=0.01, metadata={"help": "held-out chapters when split=fraction"})
    mqar: MQARConfig = field(default_factory=MQARConfig)
    selective_copy: SelectiveCopyConfig = field(default_factory=SelectiveCopyConfig)
    induction: InductionConfig = field(default_factory=InductionConfig)
    niah: NIAHConfig = field(default_factory=NIAHConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay; no weight decay on norms, biases and embeddings."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices"})
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr of the cosine"})
    decay_steps: Optional[int] = field(default=None, metadata={
        "help": "step where the cosine ends; null = trainer.max_steps (fix it to stop early and resume on schedule)"})


@dataclass
class TrainerConfig:
    """Lightning Trainer settings, mapped field by field."""

    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    accelerator: str = field(default="auto", metadata=_choices("auto", "cpu", "gpu", help="device kind"))
    devices: int = field(default=1, metadata={"help": "devices (processes) per node"})
    num_nodes: int = 1
    strategy: str = field(default="auto", metadata=_choices(
        "auto", "ddp", "fsdp", help="ddp runs on CPU (gloo) and GPU; fsdp (sharded) needs GPUs"))
    precision: str = field(default="32-true", metadata=_choices(
        "32-true", "bf16-mixed", "16-mixed", "bf16-true", help="numeric precision"))
    gradient_clip_val: float = field(default=1.0, metadata={"help": "clip the gradient norm; 0 disables"})
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = field(default=10, metadata={"help": "progress line and metrics interval"})
    val_check_interval: int = field(default=200, metadata={"help": "validate every N optimizer steps"})
    limit_val_batches: int = field(default=20, metadata={"help": "held-out batches per validation"})
    checkpoint_every_n_steps: int = field(default=100, metadata={"help": "write last.ckpt every N steps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    stop_at_accuracy: Optional[float] = field(default=None, metadata={
        "help": "stop once val/accuracy reaches this (synthetic tasks; Zoology stops at 0.99)"})


@dataclass
class RunConfig:
    """Where a run writes: ``<root>/<name>/``."""

    name: Optional[str] = field(default=None, metadata={"help": "run directory name; null = the config file's stem"})
    root: str = field(default="runs", metadata={"help": "parent directory of runs"})


@dataclass
class EvalConfig:
    """``zoo eval`` and end-of-training evaluation."""

    max_batches: Optional[int] = field(default=None, metadata={"help": "cap on held-out batches; null = all"})
    out: Optional[str] = field(default=None, metadata={"help": "JSON output path; null = <checkpoint>/eval.json"})


@dataclass
class Config:
    """A whole run. The same dataclasses are the Python API and what ``config.json`` stores."""

    seed: int = field(default=0, metadata={"help": "training seed (init, dropout); data.seed is separate"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------- values
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _describe(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def convert_value(key: str, raw: Any, tp, where: str, from_text: bool, choices=None) -> Any:
    """Convert ``raw`` to the field type ``tp``; ``from_text`` marks command-line text (str fields keep it as is)."""
    base, optional = _unwrap_optional(tp)
    if from_text and base is bool:
        parsed = raw  # only true/false: YAML 1.1 would also read yes/no/on/off as booleans
    elif from_text and base is not str:
        parsed = yaml.safe_load(raw) if raw.strip() else None
    else:
        parsed = raw
    if parsed is None or (from_text and raw == "null"):
        if optional:
            return None
        if not (from_text and base is str):
            raise ConfigError(f"{key}: expected {_describe(base)}, got null ({where})")
    value = _coerce(key, raw if (from_text and base is str) else parsed, base, where)
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key}: {value!r} is not one of {allowed} ({where})")
    return value


def _coerce(key: str, value: Any, base, where: str) -> Any:
    def bad():
        return ConfigError(f"{key}: expected {_describe(base)}, got {value!r} ({where})")

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad()
    if base is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if base is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if base is list or typing.get_origin(base) is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise bad()
        return list(value)
    if base is dict or typing.get_origin(base) is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    raise bad()


# ----------------------------------------------------------------------------------------------------- merging
def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(f.type) or dataclasses.is_dataclass(_field_types(cls)[f.name]):
            keys.extend(_valid_keys(_field_types(cls)[f.name], dotted + "."))
    return keys


def _unknown_key(dotted: str, cls, section: str, where: str) -> ConfigError:
    candidates = _valid_keys(Config)
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    message = f"unknown key '{dotted}' ({where})"
    if close:
        message += f"; did you mean '{close[0]}'?"
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    message += f" valid keys under {section or 'the top level'}: {names}"
    return ConfigError(message)


def _apply_mapping(obj, mapping: dict, prefix: str, where: str) -> None:
    """Merge a nested mapping into the dataclass ``obj`` key by key (lists replace, mappings merge)."""
    cls = type(obj)
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(dotted, cls, prefix.rstrip("."), where)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {tp.__name__} keys, got {value!r} ({where})")
            _apply_mapping(getattr(obj, key), value, dotted + ".", where)
        else:
            choices = fields[key].metadata.get("choices")
            setattr(obj, key, convert_value(dotted, value, tp, where, from_text=False, choices=choices))


def _apply_override(cfg: Config, dotted: str, raw: str) -> None:
    where = "command line"
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        cls = type(obj)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise _unknown_key(dotted, cls, ".".join(parts[:i]), where)
        tp = _field_types(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                value = yaml.safe_load(raw)
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section; set one of its keys, e.g. {dotted}."
                                      f"{dataclasses.fields(tp)[0].name}=... ({where})")
                _apply_mapping(getattr(obj, part), value, dotted + ".", where)
            else:
                choices = fields[part].metadata.get("choices")
                setattr(obj, part, convert_value(dotted, raw, tp, where, from_text=True, choices=choices))
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section ({where})")
        obj = getattr(obj, part)


# ----------------------------------------------------------------------------------------------------- files
def bundled_config_names() -> list[str]:
    """Names of the configs shipped inside the package (``zoo/configs/*.yaml``)."""
    root = importlib.resources.files("zoo") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """A path first (relative to ``relative_to`` for ``defaults:``), then a bundled config by bare name."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    for path in candidates:
        if path.is_file():
            return path
    stem = Path(name).name
    stem = stem[:-5] if stem.endswith(".yaml") else stem[:-4] if stem.endswith(".yml") else stem
    bundled = importlib.resources.files("zoo") / "configs" / f"{stem}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    raise ConfigError(f"config file not found: {name} (no such path, no bundled config '{stem}'; "
                      f"bundled: {', '.join(bundled_config_names())})")


def _load_yaml(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML ({getattr(error, 'problem', error)}{line})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(content).__name__}")
    return content


def _apply_file(cfg: Config, path: Path, chain: tuple[Path, ...]) -> None:
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(p.name for p in (*chain, resolved))
        raise ConfigError(f"config files include each other in a cycle: {names}")
    content = _load_yaml(path)
    defaults = content.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ConfigError(f"defaults in {path} must be a list of config files, got {defaults!r}")
    for name in defaults:
        _apply_file(cfg, resolve_config_path(str(name), relative_to=path.parent), (*chain, resolved))
    _apply_mapping(cfg, content, "", f"in {path}")


# ----------------------------------------------------------------------------------------------------- entry
@dataclass
class ParsedArgs:
    """The result of parsing a command line: the resolved config plus the verb's own top-level arguments."""

    config: Config
    options: dict[str, str]
    config_files: list[Path]


def parse_args(argv: list[str], options: tuple[str, ...] = ("resume", "print_config", "verbose"),
               base: Config | None = None) -> ParsedArgs:
    """Resolve ``config=...`` files and ``a.b=c`` overrides onto ``base`` (defaults when None).

    ``options`` are the verb's top-level arguments (``resume``, ``checkpoint``, ...), returned as raw strings.
    """
    cfg = base if base is not None else Config()
    files: list[Path] = []
    found: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for arg in argv:
        if "=" not in arg:
            hint = f" (did you mean config={arg}?)" if arg.endswith((".yaml", ".yml")) else ""
            raise ConfigError(f"unexpected argument '{arg}'; arguments are key=value{hint}")
        key, raw = arg.split("=", 1)
        if key == "config":
            files.append(resolve_config_path(raw))
        elif key in options:
            found[key] = raw
        elif "." in key or key in {f.name for f in dataclasses.fields(Config)}:
            overrides.append((key, raw))
        else:
            extra = sorted(set(options) | {"config"} | {f.name for f in dataclasses.fields(Config)})
            close = difflib.get_close_matches(key, extra + _valid_keys(Config), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{key}' (command line){hint} valid here: {', '.join(extra)}")
    for path in files:
        _apply_file(cfg, path, ())
    for key, raw in overrides:
        _apply_override(cfg, key, raw)
    if cfg.run.name is None:
        cfg.run.name = files[-1].stem if files else "run"
    validate(cfg)
    return ParsedArgs(cfg, found, files)


def validate(cfg: Config) -> None:
    """Cross-field checks that follow the merge (torch-free)."""
    from zoo.registry import block_kinds

    kinds = block_kinds()
    if not cfg.model.pattern:
        raise ConfigError("model.pattern is empty; name at least one mixer, e.g. model.pattern=[attention]")
    for name in cfg.model.pattern:
        if name not in kinds:
            close = difflib.get_close_matches(str(name), kinds, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.pattern: unknown mixer '{name}'{hint} known: {', '.join(kinds)}")
    for key in ("dim", "depth", "vocab_size"):
        if getattr(cfg.model, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg.model, key)}")
    attn = cfg.model.attention
    if attn.head_dim is None and cfg.model.dim % attn.heads:
        raise ConfigError(f"model.dim ({cfg.model.dim}) must be divisible by model.attention.heads ({attn.heads}), "
                          f"or set model.attention.head_dim")
    if attn.kv_heads is not None and attn.heads % attn.kv_heads:
        raise ConfigError(f"model.attention.heads ({attn.heads}) must be a multiple of kv_heads ({attn.kv_heads})")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {cfg.trainer.max_steps}")
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.strategy=fsdp needs GPUs (Lightning's FSDP refuses CPU); use ddp on CPU")
    if cfg.trainer.precision == "16-mixed" and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.precision=16-mixed needs a GPU; use bf16-mixed or 32-true on CPU")
    if cfg.data.batch_size < 1 or cfg.data.seq_len < 2:
        raise ConfigError("data.batch_size must be >= 1 and data.seq_len >= 2")
    if (cfg.model.architecture == "vision") != (cfg.data.name == "digits"):
        raise ConfigError(f"model.architecture={cfg.model.architecture} does not fit data.name={cfg.data.name}: "
                          f"the vision classifier reads images (data.name=digits) and language models read tokens")
    if cfg.data.name == "text" and not cfg.data.path:
        raise ConfigError("data.name=text needs data.path=FILE (a local .txt, .jsonl or .parquet file)")
    task = task_config(cfg.data)
    if task is not None:
        try:
            task.validate()
        except ValueError as error:
            raise ConfigError(f"data.{cfg.data.name}: {error}") from None
        if cfg.model.vocab_size < task.vocab_size:
            raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the vocabulary of data "
                              f"{cfg.data.name} ({task.vocab_size})")


def task_config(data: DataConfig):
    """The synthetic task section selected by ``data.name``, or None for text data."""
    return getattr(data, data.name) if data.name in ("mqar", "selective_copy", "induction", "niah") else None


def to_dict(cfg) -> dict:
    """The config as plain containers (what ``config.yaml``, ``config.json`` and checkpoints store)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a ``Config`` from ``to_dict`` output; unknown keys are errors."""
    cfg = Config()
    _apply_mapping(cfg, data, "", "saved config")
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(cls=Config, prefix: str = "") -> str:
    """Lines ``key (type, default): help`` for every field, from the dataclasses."""
    lines = []
    types_ = _field_types(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {dotted}.*  ({tp.__doc__.strip().splitlines()[0] if tp.__doc__ else tp.__name__})")
            lines.extend(help_text(tp, dotted + ".").splitlines())
            continue
        base, optional = _unwrap_optional(tp)
        default = getattr(instance, f.name)
        if isinstance(default, float):
            default = f"{default:.4g}"
        kind = _describe(base) + (" | null" if optional else "")
        choices = f.metadata.get("choices")
        if choices:
            kind = " | ".join(choices)
        note = f.metadata.get("help", "")
        lines.append(f"    {dotted} ({kind}, default {default})" + (f": {note}" if note else ""))
    return "\n".join(lines)
