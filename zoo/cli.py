"""The ``zoo`` command: train | eval | export | generate | list.

    zoo train config=transformer-mqar.yaml trainer.max_steps=100 model.dim=256
    zoo eval checkpoint=checkpoints/transformer-mqar
    zoo export checkpoint=runs/x/last.ckpt out=exported/x
    zoo generate checkpoint=runs/x/model prompt="In the beginning" max_new_tokens=200
    zoo list

Mistakes (unknown keys, wrong types, missing files or checkpoints) print one line and exit with code 2; set
``ZOO_DEBUG=1`` for the traceback. Parsing happens before torch is imported.
"""
from __future__ import annotations

import errno
import math
import os
import sys

from zoo.config import ConfigError, help_text, parse_args
from zoo.errors import ZooError
from zoo.strict_json import dumps_strict

VERBS = {
    "train": "train a model from a config: zoo train config=NAME.yaml [key=value ...] [resume=auto|true|PATH]",
    "eval": "evaluate an export directory on its held-out data: zoo eval checkpoint=DIR [tasks=NAME] [key=value ...]",
    "export": "write an export directory from a training checkpoint: zoo export checkpoint=FILE.ckpt out=DIR "
              "[format=zoo|hf]",
    "generate": "continue a prompt: zoo generate checkpoint=DIR prompt=TEXT [max_new_tokens=N temperature=T top_k=K]",
    "list": "list mixers, bundled configs and shipped checkpoints",
}

GENERATE_OPTIONS = ("checkpoint", "prompt", "max_new_tokens", "temperature", "top_k", "seed")


def usage() -> str:
    lines = ["usage: zoo VERB [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    lines += ["", "zoo VERB --help shows the verb's keys."]
    return "\n".join(lines)


def verb_help(verb: str) -> str:
    head = f"zoo {verb}: {VERBS[verb]}"
    if verb == "train":
        extra = ("  top-level: config=FILE|NAME (repeatable), resume=auto|true|PATH, print_config=true, verbose=true\n"
                 "  keys (defaults < config files < key=value overrides):")
        return f"{head}\n\n{extra}\n{help_text()}"
    if verb == "eval":
        return (f"{head}\n\n  checkpoint=DIR (an export directory: config.json + model.safetensors)\n"
                f"  tasks=NAME[,NAME] ({eval_tasks_help()}; default: the checkpoint's own data)\n"
                f"  overrides apply to the saved config, e.g. data.eval_batch_size=64 eval.max_batches=10 "
                f"eval.out=FILE\n")
    if verb == "export":
        return (f"{head}\n\n  checkpoint=FILE.ckpt  out=DIR (default: <run>/model)\n"
                f"  format=zoo|hf (hf: a pure Mamba / Mamba-2 LM as a Hugging Face directory; checkpoint= may be "
                f"an export directory; out= required)\n")
    if verb == "generate":
        return (f"{head}\n\n  checkpoint=DIR  prompt=TEXT  max_new_tokens=200  temperature=0.8 (0 = greedy)  "
                f"top_k=50 (null = no cut)  seed=0\n"
                f"  architectures that generate: {', '.join(generating_architectures())}\n")
    return head


def split_options(argv: list[str], allowed: tuple[str, ...], verb: str) -> tuple[dict, list[str]]:
    """Pull ``name=value`` for the verb's own names out of ``argv``; the rest are config overrides."""
    options, rest = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"unexpected argument '{arg}'; arguments are key=value (zoo {verb} --help)")
        if key in allowed:
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def require(options: dict, key: str, verb: str) -> str:
    if key not in options:
        raise ConfigError(f"zoo {verb} needs {key}=...; see zoo {verb} --help")
    return options[key]


# ---------------------------------------------------------------------------------------------------------- verbs
def cmd_train(argv: list[str]) -> int:
    parsed = parse_args(argv)
    options = parsed.options
    flags = {}
    for name in ("print_config", "verbose"):
        value = options.get(name, "false").lower()
        if value not in ("true", "false"):
            raise ConfigError(f"{name}: expected true or false, got {options[name]!r}")
        flags[name] = value == "true"
    if flags["print_config"]:
        from zoo.config import dump_yaml

        print(dump_yaml(parsed.config), end="")
        return 0
    from zoo.train.fit import train

    try:
        result = train(parsed.config, argv, resume=options.get("resume"), verbose=flags["verbose"])
    except OSError as error:
        if error.errno == errno.ENOSPC and not error.filename:
            from zoo.train.run import run_dir

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir(parsed.config))) from error
        raise
    if result:
        print("eval " + dumps_strict({k: v for k, v in result.items() if k != "config"}, "the eval line", indent=None),
              flush=True)
    return 0


def generating_architectures() -> list[str]:
    """The ``model.architecture`` values ``zoo generate`` accepts (``generates`` in ``ARCHITECTURES``)."""
    from zoo.registry import ARCHITECTURES

    return [name for name, entry in ARCHITECTURES.items() if entry.generates]


def eval_tasks_help() -> str:
    """Which checkpoints offer which ``tasks=`` names (the ``eval_tasks`` of ``ARCHITECTURES``)."""
    from zoo.registry import ARCHITECTURES

    return "; ".join(f"{name} checkpoints: {', '.join(entry.eval_tasks)}"
                     for name, entry in ARCHITECTURES.items() if entry.eval_tasks)


def eval_tasks(options: dict, config) -> dict[str, str]:
    """The ``tasks=`` of ``zoo eval`` (comma-separated), checked, each with the ``data.name`` holding its held-out
    split; default: the checkpoint's own data (its task, where the architecture names tasks)."""
    from zoo.registry import architecture

    name = config.model.architecture
    offered = architecture(name).eval_tasks
    if "tasks" not in options:
        return {task: data for task, data in offered.items() if data == config.data.name}
    tasks = [t.strip() for t in options["tasks"].split(",") if t.strip()]
    if not offered:
        raise ConfigError(f"tasks= names eval tasks ({eval_tasks_help()}); this checkpoint is "
                          f"model.architecture={name}: omit tasks=")
    for task in tasks or [""]:
        if task not in offered:
            raise ConfigError(f"unknown eval task '{task}'; known: {', '.join(offered)}")
    return {task: offered[task] for task in tasks}


def cmd_eval(argv: list[str]) -> int:
    options, rest = split_options(argv, ("checkpoint", "tasks"), "eval")
    path = require(options, "checkpoint", "eval")
    from zoo.checkpoint import read_export_config

    config = parse_args(rest, options=(), base=read_export_config(path)).config
    tasks = eval_tasks(options, config)
    from zoo.checkpoint import load_export
    from zoo.data.loader import build_data
    from zoo.eval.evaluate import evaluate

    model = load_export(path)
    results = {}
    for task, data_name in (tasks or {config.data.name: config.data.name}).items():
        config.data.name = data_name
        data = build_data(config.data)
        results[task] = evaluate(model, data, config.data.eval_batch_size, config.eval.max_batches,
                                 config.data.name)
    result = next(iter(results.values())) if len(results) == 1 else {"tasks": results}
    result["checkpoint"] = str(path)
    text = dumps_strict(result, "eval results")
    print(text)
    out = config.eval.out  # never the checkpoint's own eval.json: a shipped card's reference numbers stay
    if out:
        try:
            with open(out, "w") as handle:
                handle.write(text + "\n")
        except OSError as error:
            print(f"warning: could not write {out} ({error.strerror}); set eval.out=FILE", file=sys.stderr)
    return 0


EXPORT_FORMATS = ("zoo", "hf")


def cmd_export(argv: list[str]) -> int:
    options, rest = split_options(argv, ("checkpoint", "out", "format"), "export")
    if rest:
        raise ConfigError(f"zoo export takes checkpoint=, out= and format= only, got {rest[0]!r}")
    from pathlib import Path

    form = options.get("format", "zoo")
    if form not in EXPORT_FORMATS:
        raise ConfigError(f"zoo export: format={form} is unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    ckpt = Path(require(options, "checkpoint", "export"))
    if form == "hf":
        from zoo.hf.export import export_hf_from

        out = export_hf_from(ckpt, require(options, "out", "export"))
        print(f"exported {ckpt} to {out} (Hugging Face format)")
        return 0
    from zoo.checkpoint import export_from_ckpt

    out = export_from_ckpt(ckpt, options.get("out") or ckpt.parent / "model")
    print(f"exported {ckpt} to {out}")
    return 0


def generate_integer(options: dict, key: str, default: str, minimum: int, null_allowed: bool = False) -> int | None:
    """The integer option ``key`` of zoo generate, at least ``minimum`` (or null), with a one-line error naming it."""
    text = options.get(key, default)
    if null_allowed and text == "null":
        return None
    expected = f"an integer >= {minimum}" + (" or null" if null_allowed else "")
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"zoo generate: {key}={text} is not {expected}") from None
    if value < minimum:
        raise ConfigError(f"zoo generate: {key}={text} is not {expected}")
    return value


def generate_temperature(text: str) -> float:
    """``temperature=`` of zoo generate: a finite number >= 0 (0 = greedy), with a one-line error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"zoo generate: temperature={text} is not a finite number >= 0 (0 = greedy)")
    return value


def cmd_generate(argv: list[str]) -> int:
    options, rest = split_options(argv, GENERATE_OPTIONS, "generate")
    if rest:
        raise ConfigError(f"unknown key '{rest[0].split('=')[0]}' for zoo generate; valid: {', '.join(GENERATE_OPTIONS)}")
    path = require(options, "checkpoint", "generate")
    max_new = generate_integer(options, "max_new_tokens", "200", minimum=0)
    temperature = generate_temperature(options.get("temperature", "0.8"))
    top_k = generate_integer(options, "top_k", "50", minimum=1, null_allowed=True)
    seed = generate_integer(options, "seed", "0", minimum=0)
    import torch

    from zoo.checkpoint import load_export, read_export_config
    from zoo.data.tokenizer import load_tokenizer

    config = read_export_config(path)
    if config.model.architecture not in generating_architectures():
        raise ConfigError(f"zoo generate: checkpoint={path} is a model.architecture={config.model.architecture} "
                          f"model, which does not generate text; architectures that generate: "
                          f"{', '.join(generating_architectures())}")
    model = load_export(path)
    tokenizer = load_tokenizer(config.data.tokenizer)
    ids = tokenizer.encode(options.get("prompt", "")) or [tokenizer.eos_id]
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new, temperature=temperature, top_k=top_k, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_list(argv: list[str]) -> int:
    if argv:
        raise ConfigError(f"zoo list takes no arguments, got {argv[0]!r}")
    from zoo.registry import list_everything

    for kind, names in list_everything().items():
        print(f"{kind}: {', '.join(names) if names else '(none)'}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"zoo: unknown verb '{verb}'; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(verb_help(verb))
        return 0
    debug = os.environ.get("ZOO_DEBUG", "0") not in ("", "0")
    try:
        return COMMANDS[verb](rest)
    except Exception as error:
        if debug:
            raise
        return report(error, verb)
    except KeyboardInterrupt as interrupt:
        print(f"zoo: {interrupt or 'interrupted'}", file=sys.stderr, flush=True)
        return 130


def os_error_in_chain(error: BaseException, number: int) -> OSError | None:
    """The first ``OSError`` with errno ``number`` in ``error`` or the errors it was raised from."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == number:
            return error
        error = error.__cause__ or error.__context__
    return None


def report(error: Exception, verb: str) -> int:
    """One line on stderr; exit 2 for mistakes in input, 1 for a failed run of ``zoo <verb>``."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    disk_full = os_error_in_chain(error, errno.ENOSPC)
    if disk_full is not None:
        then = "rerun the same command with resume=auto to complete the run" if verb == "train" else "rerun it"
        print(f"zoo: no space left on device writing {disk_full.filename or 'the output'}; free space there, "
              f"then {then}", file=sys.stderr, flush=True)
        return 1
    if isinstance(error, PermissionError):
        print(f"zoo: permission denied: {error.filename or message}; make it writable or choose another place "
              f"(run.root=DIR for training)", file=sys.stderr, flush=True)
        return 2
    if isinstance(error, (ZooError, FileNotFoundError, ImportError)):
        print(f"zoo: {message}", file=sys.stderr, flush=True)
        return 2
    if isinstance(error, FloatingPointError):
        print(f"zoo: {message}", file=sys.stderr, flush=True)
        return 1
    print(f"zoo: {type(error).__name__}: {message} (set ZOO_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
