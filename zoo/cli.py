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
from pathlib import Path

from zoo.config import ConfigError, help_text, parse_args
from zoo.errors import ZooError
from zoo.strict_json import dumps_strict

VERBS = {
    "train": "train a model from a config: zoo train config=NAME.yaml [key=value ...] [resume=auto|true|PATH]",
    "eval": "evaluate an export directory on its held-out data: zoo eval checkpoint=DIR [tasks=NAME] [key=value ...]",
    "export": "write an export directory from a training checkpoint: zoo export checkpoint=FILE.ckpt out=DIR "
              "[format=zoo|hf]",
    "generate": "continue prompts: zoo generate checkpoint=DIR prompt=TEXT [max_new_tokens=N temperature=T top_k=K "
                "top_p=P ...]",
    "sweep": "run a grid of trainings and report them: zoo sweep config=SWEEP.yaml [jobs=N shard=i/n report=true]",
    "list": "list mixers, bundled configs and shipped checkpoints",
}

GENERATE_OPTIONS = ("checkpoint", "prompt", "prompts", "max_new_tokens", "temperature", "top_k", "top_p",
                    "repetition_penalty", "stop", "stream", "seed")
GENERATE_REPEATABLE = ("prompt", "stop")


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
                f"eval.out=FILE\n"
                f"  harness_tasks=NAME[,NAME] harness_include=DIR harness_limit=N: lm-evaluation-harness tasks "
                f"(pip install 'memzoo[eval]'),\n  their results under \"harness\" in the output\n")
    if verb == "export":
        return (f"{head}\n\n  checkpoint=FILE.ckpt  out=DIR (default: <run>/model)\n"
                f"  format=zoo|hf (hf: a pure Mamba / Mamba-2 LM as a Hugging Face directory; checkpoint= may be "
                f"an export directory; out= required)\n")
    if verb == "generate":
        return (f"{head}\n\n  checkpoint=DIR  prompt=TEXT (repeatable; prompts of different lengths are left-padded "
                f"into one batch)  prompts=FILE (one prompt a line)\n"
                f"  max_new_tokens=200  temperature=0.8 (0 = greedy)  top_k=50 (null = no cut)  top_p=null (nucleus, "
                f"in (0, 1])  repetition_penalty=1.0 (1 = off)\n"
                f"  stop=TEXT (repeatable: a row ends when its new text ends with it)  stream=false (true: print "
                f"tokens as they come, one prompt)  seed=0\n"
                f"  architectures that generate: {', '.join(generating_architectures())}\n")
    if verb == "sweep":
        return (f"{head}\n\n  config=FILE|NAME (a sweep file; bundled: zoo/configs/sweeps/)  jobs=1 (cells at a time)  "
                f"shard=0/1 (run the i-th of n slices)\n  report=true (write results.csv, results.md and figures from "
                f"the finished cells instead of running)  list=true (print the cells and their commands)\n")
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


def true_false_flags(options: dict, names: tuple[str, ...]) -> dict[str, bool]:
    """The boolean options ``names`` (default false), with a one-line error for anything but true/false."""
    flags = {}
    for name in names:
        value = options.get(name, "false").lower()
        if value not in ("true", "false"):
            raise ConfigError(f"{name}: expected true or false, got {options[name]!r}")
        flags[name] = value == "true"
    return flags


# ---------------------------------------------------------------------------------------------------------- verbs
def cmd_train(argv: list[str]) -> int:
    parsed = parse_args(argv)
    options = parsed.options
    flags = true_false_flags(options, ("print_config", "verbose"))
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


EVAL_OPTIONS = ("checkpoint", "tasks", "harness_tasks", "harness_include", "harness_limit")


def imported_directory(path: str) -> bool:
    """Whether ``path`` is an imported (Hugging Face, mamba_ssm, fla) directory rather than a zoo export; an
    unreadable or unrecognised config.json counts as a zoo export, whose reader names the problem."""
    from zoo.hf_import import foreign_format

    try:
        return Path(path).is_dir() and foreign_format(path) in ("hf", "mamba_ssm")
    except ValueError:  # not UTF-8 or not JSON
        return False


def eval_config(path: str, rest: list[str]):
    """The config ``zoo eval`` runs with: the export's saved config, or defaults for an imported (Hugging Face,
    fla) directory, then the overrides; the data is read with the directory's own tokenizer unless
    ``data.tokenizer=`` is given."""
    from zoo.checkpoint import read_export_config
    from zoo.config import Config

    base = Config() if imported_directory(path) else read_export_config(path)
    config = parse_args(rest, options=(), base=base).config
    if not any(arg.startswith("data.tokenizer=") for arg in rest) and config.data.name != "digits":
        config.data.tokenizer = str(path)
    return config


def harness_options(options: dict) -> tuple[list[str], str | None, int | None]:
    """``harness_tasks=a,b``, ``harness_include=DIR`` and ``harness_limit=N`` of ``zoo eval``, checked."""
    tasks = [t.strip() for t in options.get("harness_tasks", "").split(",") if t.strip()]
    if not tasks and ("harness_include" in options or "harness_limit" in options):
        raise ConfigError("harness_include= and harness_limit= go with harness_tasks=NAME[,NAME]")
    limit = options.get("harness_limit")
    if limit is not None and (not limit.isdigit() or int(limit) < 1):
        raise ConfigError(f"harness_limit={limit} is not an integer >= 1 (documents per harness task)")
    return tasks, options.get("harness_include"), None if limit is None else int(limit)


def cmd_eval(argv: list[str]) -> int:
    options, rest = split_options(argv, EVAL_OPTIONS, "eval")
    path = require(options, "checkpoint", "eval")
    harness_tasks, harness_include, harness_limit = harness_options(options)
    config = eval_config(path, rest)
    tasks = eval_tasks(options, config)
    from zoo.checkpoint import load_export
    from zoo.data.loader import build_data
    from zoo.eval.evaluate import evaluate

    harness = None
    if harness_tasks:  # first: a mistake in the harness options shows before the held-out evaluation runs
        from zoo.eval.evaluate import harness_results

        harness = harness_results(path, harness_tasks, harness_include, config.data.eval_batch_size, harness_limit)
    model = load_export(path)
    results = {}
    for task, data_name in (tasks or {config.data.name: config.data.name}).items():
        config.data.name = data_name
        data = build_data(config.data)
        results[task] = evaluate(model, data, config.data.eval_batch_size, config.eval.max_batches,
                                 config.data.name)
    result = next(iter(results.values())) if len(results) == 1 else {"tasks": results}
    result["checkpoint"] = str(path)
    if harness is not None:
        result["harness"] = harness
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


def generate_fraction(options: dict, key: str, default: str, low: float, high: float | None,
                      null_allowed: bool = False) -> float | None:
    """A number option of zoo generate in (low, high] (no upper bound when high is None), or null."""
    text = options.get(key, default)
    if null_allowed and text == "null":
        return None
    expected = f"a number in ({low}, {high}]" if high is not None else f"a finite number > {low}"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= low or (high is not None and value > high):
        raise ConfigError(f"zoo generate: {key}={text} is not {expected}" + (" or null" if null_allowed else ""))
    return value


def generate_prompts(argv: list[str], options: dict) -> list[str]:
    """The prompts of zoo generate: every ``prompt=`` value, then the lines of ``prompts=FILE``; one empty prompt
    when none is given."""
    prompts = [arg.partition("=")[2] for arg in argv if arg.partition("=")[0] == "prompt"]
    if "prompts" in options:
        path = Path(options["prompts"])
        if not path.is_file():
            raise ConfigError(f"zoo generate: prompts={path} is not a file; give a text file with one prompt a line")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    return prompts or [""]


def print_stream(tokenizer):
    """A streamer for one row: prints the text of each new token as it comes (holding back a partial character)."""
    ids, shown = [], [0]

    def put(tokens):
        ids.append(int(tokens[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

    return put


def cmd_generate(argv: list[str]) -> int:
    options, rest = split_options(argv, GENERATE_OPTIONS, "generate")
    if rest:
        raise ConfigError(f"unknown key '{rest[0].split('=')[0]}' for zoo generate; valid: {', '.join(GENERATE_OPTIONS)}")
    path = require(options, "checkpoint", "generate")
    max_new = generate_integer(options, "max_new_tokens", "200", minimum=0)
    temperature = generate_temperature(options.get("temperature", "0.8"))
    top_k = generate_integer(options, "top_k", "50", minimum=1, null_allowed=True)
    top_p = generate_fraction(options, "top_p", "null", 0.0, 1.0, null_allowed=True)
    repetition_penalty = generate_fraction(options, "repetition_penalty", "1.0", 0.0, None)
    seed = generate_integer(options, "seed", "0", minimum=0)
    stream = options.get("stream", "false")
    if stream not in ("true", "false"):
        raise ConfigError(f"zoo generate: stream={stream} is not true or false")
    stop_texts = [arg.partition("=")[2] for arg in argv if arg.partition("=")[0] == "stop"]
    if "" in stop_texts:
        raise ConfigError("zoo generate: stop= is empty; give the text that ends a row, e.g. stop=.")
    prompts = generate_prompts(argv, options)
    if stream == "true" and len(prompts) > 1:
        raise ConfigError(f"zoo generate: stream=true prints one row as it comes, got {len(prompts)} prompts; "
                          f"give one prompt or stream=false")
    import torch

    from zoo.checkpoint import load_export, read_export_config
    from zoo.data.tokenizer import load_tokenizer

    config = None if imported_directory(path) else read_export_config(path)
    if config is not None and config.model.architecture not in generating_architectures():
        raise ConfigError(f"zoo generate: checkpoint={path} is a model.architecture={config.model.architecture} "
                          f"model, which does not generate text; architectures that generate: "
                          f"{', '.join(generating_architectures())}")
    model = load_export(path)
    tokenizer = load_tokenizer(Path(path))
    rows = [tokenizer.encode(prompt) or [tokenizer.eos_id] for prompt in prompts]
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[tokenizer.eos_id] * (width - len(ids)) + ids for ids in rows])  # (B, T) left-padded
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
    padded = bool((attention_mask == 0).any())
    generator = torch.Generator().manual_seed(seed)
    if stream == "true":
        print(prompts[0], end="", flush=True)
    try:
        out = model.generate(input_ids, max_new, attention_mask=attention_mask if padded else None,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, eos_id=None,
                             stop=[tokenizer.encode(text) for text in stop_texts] or None,
                             streamer=print_stream(tokenizer) if stream == "true" else None, generator=generator)
    except ValueError as error:
        raise ConfigError(f"zoo generate: {error}") from None
    if stream == "true":
        print()
        return 0
    for row, ids in enumerate(rows):
        print(tokenizer.decode(out[row, width - len(ids):].tolist()))
    return 0


def cmd_sweep(argv: list[str]) -> int:
    options, rest = split_options(argv, ("config", "jobs", "shard", "report", "list"), "sweep")
    if rest:
        raise ConfigError(f"zoo sweep takes config=, jobs=, shard=, report=, list=; got '{rest[0]}' (set config keys "
                          f"in the sweep file's set: section)")
    from zoo.sweep import load_sweep, parse_shard, run_sweep

    sweep = load_sweep(require(options, "config", "sweep"))
    jobs = options.get("jobs", "1")
    if not jobs.isdigit() or int(jobs) < 1:
        raise ConfigError(f"zoo sweep: jobs={jobs} is not an integer >= 1 (the number of cells run at a time)")
    jobs = int(jobs)
    shard = parse_shard(options.get("shard", "0/1"))
    flags = true_false_flags(options, ("report", "list"))
    if flags["list"]:
        for cell in sweep.cells[shard[0]::shard[1]]:
            print(f"{cell.name}: zoo train {' '.join(cell.train_args)} run.root={sweep.root}")
        return 0
    if flags["report"]:
        from zoo.sweep_report import write_report

        print(write_report(sweep))
        return 0
    return run_sweep(sweep, jobs, shard)


def cmd_list(argv: list[str]) -> int:
    if argv:
        raise ConfigError(f"zoo list takes no arguments, got {argv[0]!r}")
    from zoo.registry import list_everything

    for kind, names in list_everything().items():
        print(f"{kind}: {', '.join(names) if names else '(none)'}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate, "sweep": cmd_sweep,
            "list": cmd_list}


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
