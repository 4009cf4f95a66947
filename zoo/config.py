"""Configuration: YAML files with ``defaults:`` composition and ``a.b=c`` overrides, onto the ``zoo.schema`` dataclasses.

Precedence: dataclass defaults < config files in order (a file's ``defaults: [base.yaml]`` loads first, relative to
that file) < ``key=value`` overrides in order. Keys and types are strict everywhere; a mistake raises
``ConfigError`` with one line (``unknown key 'model.dimm' (command line); did you mean 'model.dim'?``).

This module imports neither torch nor lightning, so a bad key fails in a tenth of a second.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import importlib.resources
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.errors import ConfigError  # noqa: F401  (re-exported: ``from zoo.config import ConfigError``)
from zoo.registry import ARCHITECTURES, block_kinds, bundled_config_names
from zoo.schema import (  # noqa: F401  (re-exported: the schema is part of this module's API)
    AttentionConfig, TitansMemoryConfig, TitansMACConfig, TitansWindowConfig, TitansMAGConfig, GDNConfig, MoMConfig,
    MambaConfig, Mamba2Config, MemoryFormerConfig, VisionConfig, HMTConfig, EmbeddingConfig, RetrievalDataConfig,
    ModelConfig, DataConfig, OptimConfig, TrainerConfig, RunConfig, EvalConfig, Config)


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
    message = f"unknown key '{dotted}' ({where})"
    prefix, _, key = dotted.rpartition(".")
    moved = [name for name, keys in _HYBRID_OPTIONS.items() if key in keys] if prefix == "model.titans" else []
    if moved:
        return ConfigError(f"{message}: the hybrids' options moved to their own sections; set "
                           f"{' / '.join(f'model.{name}.{key}' for name in moved)} (their memory options under "
                           f"model.titans_mac.memory etc.)")
    close = difflib.get_close_matches(dotted, _valid_keys(Config), n=1, cutoff=0.6)
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
def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """A path first (relative to ``relative_to`` for ``defaults:``), then a bundled config by bare name."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    for path in candidates:
        if path.is_file():
            return path
    if Path(name).is_dir():
        raise ConfigError(f"config={name} is a directory; give a .yaml file or a bundled config name "
                          f"(bundled: {', '.join(bundled_config_names())})")
    stem = Path(name).name
    stem = stem[:-5] if stem.endswith(".yaml") else stem[:-4] if stem.endswith(".yml") else stem
    bundled = importlib.resources.files("zoo") / "configs" / f"{stem}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    raise ConfigError(f"config file not found: {name} (no such path, no bundled config '{stem}'; "
                      f"bundled: {', '.join(bundled_config_names())})")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a config file names the same key twice."""

    def __init__(self, key: str, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path) -> dict:
    try:
        content = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except DuplicateKeyError as error:
        raise ConfigError(f"config file {path} gives key '{error.key}' twice (line {error.line}); "
                          f"keep one of them") from None
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
    return ParsedArgs(cfg, found)


def validate(cfg: Config) -> None:
    """Cross-field checks that follow the merge (torch-free)."""
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
    if not math.isfinite(cfg.optim.lr) or cfg.optim.lr < 0:
        raise ConfigError(f"optim.lr must be a finite number >= 0, got {cfg.optim.lr}")
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {cfg.trainer.max_steps}")
    if cfg.trainer.precision == "16-mixed" and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.precision=16-mixed needs a GPU; use bf16-mixed or 32-true on CPU")
    if cfg.data.batch_size < 1 or cfg.data.seq_len < 2:
        raise ConfigError("data.batch_size must be >= 1 and data.seq_len >= 2")
    accepted = ARCHITECTURES[cfg.model.architecture].data
    if cfg.data.name not in accepted:
        readers = [name for name, entry in ARCHITECTURES.items() if cfg.data.name in entry.data]
        other = f", or model.architecture={' or '.join(readers)}" if readers else ""
        raise ConfigError(f"model.architecture={cfg.model.architecture} does not fit data.name={cfg.data.name}: "
                          f"set data.name={' or '.join(accepted)}{other}")
    if cfg.data.pack and cfg.model.architecture != "lm":
        raise ConfigError(f"data.pack=true trains model.architecture=lm (the language model passes the document "
                          f"boundaries to every block); model.architecture={cfg.model.architecture} takes unpacked "
                          f"windows: set data.pack=false")
    if cfg.data.pack and cfg.data.name not in ("kjv", "text"):
        raise ConfigError(f"data.pack=true packs text documents; data.name={cfg.data.name} is not text data "
                          f"(use data.name=kjv or text, or data.pack=false)")
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


# Fields that configs saved by older versions hold and nothing reads any more: dropped when a saved config is read.
REMOVED_FIELDS = (("data", "induction", "eval_lengths"),)


def from_dict(data: dict) -> Config:
    """Rebuild a ``Config`` from ``to_dict`` output; unknown keys are errors (``REMOVED_FIELDS`` are dropped, older
    section layouts migrated by ``migrate_layout``)."""
    cfg = Config()
    _apply_mapping(cfg, migrate_layout(_without_removed_fields(data)), "", "saved config")
    return cfg


# The hybrids' own options that configs saved before model.titans_mac / titans_mag / titans_mal existed kept in
# model.titans, next to the memory's.
_HYBRID_OPTIONS = {"titans_mac": ("heads", "segment_len", "persistent_tokens"),
                   "titans_mag": ("heads", "window", "persistent_tokens"),
                   "titans_mal": ("heads", "window", "persistent_tokens")}


# The hybrids' options added with the fixes that make them learn (docs/titans.md#hybrid-choices), at the values that
# reproduce the module before them: a saved hybrid section without an option was written by that module.
_HYBRID_ORIGINAL = {"titans_mac": {"store": "attention", "memory_token_norm": False, "out_proj": False, "conv_size": 0},
                    "titans_mag": {"out_proj": False, "conv_size": 0, "memory_persistent": False},
                    "titans_mal": {"conv_size": 0, "memory_persistent": False}}


def migrate_layout(data: dict) -> dict:
    """A saved config (``config.json``, a checkpoint's hyper-parameters) in the current section layout.

    Three rules, each for a layout that older zoo versions wrote:
    - ``model.titans`` holding ``segment_len``, ``window`` or ``persistent_tokens`` is the old shared Titans section:
      its memory options stay in ``model.titans`` and also become the ``memory`` of each hybrid section, whose own
      options (``heads``, ``segment_len`` / ``window``, ``persistent_tokens``) come from it too. A hybrid section the
      config already has is kept.
    - ``model.mom`` without a ``model.gdn`` section: Gated DeltaNet read ``heads`` and ``head_dim`` from
      ``model.mom``, so ``model.gdn`` takes them from there.
    - ``model.mom`` without ``aux_loss_form``: it was saved when the load-balancing loss was the mean of per-layer
      losses, so it gets ``aux_loss_form: layer_mean`` (its ``aux_loss_scale`` is recorded).
    - a hybrid section without an option of ``_HYBRID_ORIGINAL`` was saved before that option existed: it gets the
      value that reproduces the module of then.
    """
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    model = dict(model)
    titans = model.get("titans")
    hybrid_keys = {key for keys in _HYBRID_OPTIONS.values() for key in keys} - {"heads"}
    if isinstance(titans, dict) and hybrid_keys & set(titans):
        memory = {key: value for key, value in titans.items() if key not in hybrid_keys}
        model["titans"] = memory
        for section, keys in _HYBRID_OPTIONS.items():
            if section not in model:
                model[section] = {**{key: titans[key] for key in keys if key in titans}, "memory": dict(memory)}
    mom = model.get("mom")
    if "gdn" not in model and isinstance(mom, dict):
        model["gdn"] = {key: mom[key] for key in ("heads", "head_dim") if key in mom}
    if isinstance(mom, dict) and "aux_loss_form" not in mom:
        model["mom"] = {**mom, "aux_loss_form": "layer_mean"}
    for section, original in _HYBRID_ORIGINAL.items():
        if isinstance(model.get(section), dict):
            model[section] = {**original, **model[section]}
    return {**data, "model": model}


def _without_removed_fields(data: dict) -> dict:
    """A copy of ``data`` without the ``REMOVED_FIELDS`` it holds."""
    data = copy.deepcopy(data)
    for *sections, name in REMOVED_FIELDS:
        section = data
        for key in sections:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(name, None)
    return data


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
