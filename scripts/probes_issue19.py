"""Replay issue 19's probe cases against a fresh clone: exit codes, one-line errors, nothing lost.

    python scripts/probes_issue19.py [--branch BRANCH] [--repo PATH] [--jobs N]

Clones ``--repo`` (default: this checkout) at ``--branch`` (default: its current branch) into a temporary directory,
runs every case of the issue there with ``python -m zoo.cli`` (tiny configs, a few steps), and prints a table
case / expected / got / pass. Expected exit codes: 0 success, 2 a mistake in config or input, 1 a failed run, 130 / 143
an interrupted one (SIGINT / SIGTERM). Every failure must be one line on stderr without "Traceback" (ZOO_DEBUG unset),
and what a case must not lose (a user's files, a checkpoint, eval.json, model/) is compared byte for byte.
Exits 1 when a case fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TINY = ["model.dim=32", "model.depth=1", "model.vocab_size=64", "model.attention.heads=2", "data.name=mqar",
        "data.mqar.seq_len=32", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=64", "data.mqar.train_examples=200",
        "data.mqar.test_examples=32", "data.batch_size=8", "data.eval_batch_size=32", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "trainer.checkpoint_every_n_steps=2"]
TEXT = ["model.dim=32", "model.depth=1", "model.attention.heads=2", "data.name=text", "data.seq_len=16",
        "data.batch_size=2", "data.eval_batch_size=2", "trainer.limit_val_batches=1", "trainer.max_steps=2"]


@dataclass
class Result:
    case: str
    expected: str
    got: str
    ok: bool
    note: str = ""


@dataclass
class Probe:
    """One replayed case: ``run(clone, scratch)`` returns (got, ok, note)."""

    case: str
    expected: str
    run: object
    results: list = field(default_factory=list)


def digest(path: Path) -> str:
    """A hash of a file, or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for item in sorted(path.rglob("*")):
            if item.is_file():
                h.update(str(item.relative_to(path)).encode() + item.read_bytes())
    else:
        h.update(b"<absent>")
    return h.hexdigest()


def zoo(clone: Path, *argv: str, cwd: Path | None = None, env: dict | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m zoo.cli argv`` with the clone first on the path."""
    environment = {key: value for key, value in os.environ.items() if key != "ZOO_DEBUG"}
    environment.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                       **(env or {}))
    command = [sys.executable, "-m", "zoo.cli", *argv]
    return subprocess.run(command, cwd=cwd or clone, env=environment, capture_output=True, text=True, timeout=timeout)


def one_line_error(process: subprocess.CompletedProcess) -> tuple[bool, str]:
    """Whether stderr is one ``zoo:`` line with no traceback; and that line."""
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    ok = len(lines) == 1 and last.startswith("zoo:") and "Traceback" not in process.stderr
    return ok, last if ok else process.stderr.strip().replace("\n", " | ")[-300:]


def expect_error(code: int, *must_contain: str):
    """A check: exit ``code``, one line, containing each of ``must_contain``."""
    def check(process):
        one, line = one_line_error(process)
        missing = [text for text in must_contain if text not in line]
        ok = process.returncode == code and one and not missing
        note = line if not missing else f"{line} (missing: {missing})"
        return f"exit {process.returncode}", ok, note
    return check


def train(clone: Path, root: Path, name: str, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return zoo(clone, "train", *TINY, f"run.root={root}", f"run.name={name}", *extra, **kwargs)


# ------------------------------------------------------------------------------------------------------------ cases
def case_export(clone: Path, scratch: Path) -> list[Result]:
    """Item 1: export into a user folder, the run directory, '.', then into empty, missing and previous exports."""
    results = []
    finished = train(clone, scratch, "e", "trainer.max_steps=2")
    if finished.returncode != 0:
        return [Result("export: train a run", "exit 0", f"exit {finished.returncode}", False, finished.stderr[-300:])]
    run, ckpt = scratch / "e", scratch / "e" / "last.ckpt"
    user = scratch / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for label, out, cwd in (("export out=<user folder>", user, None), ("export out=<run directory>", run, None),
                            ("export out=. (a user folder)", Path("."), user)):
        target = (cwd or clone) / out
        before = digest(target)
        got, ok, note = expect_error(2, "not a zoo export")(zoo(clone, "export", f"checkpoint={ckpt}", f"out={out}",
                                                                cwd=cwd))
        kept = digest(target) == before
        results.append(Result(label, "exit 2, nothing deleted", got + ("" if kept else ", FILES CHANGED"),
                              ok and kept, note))
    (scratch / "empty").mkdir()
    for label, out in (("export out=<empty dir>", scratch / "empty"), ("export out=<missing dir>", scratch / "new"),
                       ("export out=<previous export>", run / "model")):
        process = zoo(clone, "export", f"checkpoint={ckpt}", f"out={out}")
        files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        ok = process.returncode == 0 and files == ["config.json", "model.safetensors"]
        results.append(Result(label, "exit 0", f"exit {process.returncode}", ok, process.stderr.strip()[-200:]))
    return results


def case_fresh_start_over_artifacts(clone: Path, scratch: Path) -> list[Result]:
    """Item 3: a finished run whose checkpoints are gone; a fresh start must refuse and change nothing."""
    finished = train(clone, scratch, "r", "trainer.max_steps=2")
    if finished.returncode != 0:
        return [Result("fresh start: train a run", "exit 0", f"exit {finished.returncode}", False,
                       finished.stderr[-300:])]
    run = scratch / "r"
    for name in ("last.ckpt", "previous.ckpt"):
        (run / name).unlink(missing_ok=True)
    before = digest(run)
    got, ok, note = expect_error(2, "run.name")(train(clone, scratch, "r", "trainer.max_steps=2"))  # no resume here
    kept = digest(run) == before
    return [Result("fresh start over a finished run's artifacts", "exit 2, nothing overwritten",
                   got + ("" if kept else ", FILES CHANGED"), ok and kept, note)]


def case_truncated_last_ckpt(clone: Path, scratch: Path) -> list[Result]:
    """Item 10: a truncated last.ckpt: a fresh start says how to go on; resume=auto falls back to previous.ckpt."""
    finished = train(clone, scratch, "t", "trainer.max_steps=4")
    if finished.returncode != 0:
        return [Result("truncated last.ckpt: train a run", "exit 0", f"exit {finished.returncode}", False,
                       finished.stderr[-300:])]
    last = scratch / "t" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    fresh = expect_error(2, "resume=auto")(train(clone, scratch, "t", "trainer.max_steps=4"))
    resumed = train(clone, scratch, "t", "trainer.max_steps=6", "resume=auto")
    ok = resumed.returncode == 0 and "previous" in resumed.stderr
    return [Result("fresh start over a truncated last.ckpt", "exit 2, way forward", *fresh),
            Result("resume=auto over a truncated last.ckpt", "exit 0, falls back to previous.ckpt",
                   f"exit {resumed.returncode}", ok, resumed.stderr.strip().splitlines()[0] if resumed.stderr else "")]


def case_eval_keeps_eval_json(clone: Path, scratch: Path) -> list[Result]:
    """Item 4: zoo eval on a shipped checkpoint with eval.max_batches=1 leaves its eval.json alone."""
    target = clone / "checkpoints" / "mom-mqar"
    before = digest(target / "eval.json")
    out = scratch / "eval-out.json"
    process = zoo(clone, "eval", f"checkpoint={target}", "eval.max_batches=1", f"eval.out={out}")
    kept = digest(target / "eval.json") == before
    try:
        json.loads(out.read_text())
        valid = True
    except (OSError, ValueError):
        valid = False
    ok = process.returncode == 0 and kept and valid
    return [Result("eval over a shipped eval.json (eval.max_batches=1)", "exit 0, eval.json unchanged, eval.out JSON",
                   f"exit {process.returncode}" + ("" if kept else ", EVAL.JSON CHANGED"), ok,
                   process.stderr.strip()[-200:])]


def case_signals(clone: Path, scratch: Path) -> list[Result]:
    """Items 5 and 2: SIGTERM exits 143 and SIGINT 130, each after saving the last completed step; resume completes."""
    results = []
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        name = f"sig{int(signum)}"
        environment = {key: value for key, value in os.environ.items() if key != "ZOO_DEBUG"}
        environment.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        command = [sys.executable, "-m", "zoo.cli", "train", *TINY, f"run.root={scratch}", f"run.name={name}",
                   "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=1000"]
        process = subprocess.Popen(command, cwd=clone, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        for line in process.stdout:
            if line.startswith("step 2/"):
                break
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
        saved = (scratch / name / "last.ckpt").is_file() and "saved step" in err
        label = f"{signal.Signals(signum).name} during training"
        results.append(Result(label, f"exit {code}, last step saved", f"exit {process.returncode}"
                              + ("" if saved else ", NOTHING SAVED"), process.returncode == code and saved,
                              err.strip().splitlines()[0] if err.strip() else ""))
        resumed = train(clone, scratch, name, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1000",
                        "resume=auto")
        results.append(Result(f"resume=auto after {signal.Signals(signum).name}", "exit 0",
                              f"exit {resumed.returncode}", resumed.returncode == 0, resumed.stderr.strip()[-200:]))
    return results


def case_generate_options(clone: Path, scratch: Path) -> list[Result]:
    """Items 7, 8, 10: every bad generate option and generating from a vision or embedding checkpoint."""
    lm = clone / "checkpoints" / "transformer-mqar"
    cases = [("generate max_new_tokens=-5", [f"checkpoint={lm}", "max_new_tokens=-5"], ("max_new_tokens",)),
             ("generate max_new_tokens=abc", [f"checkpoint={lm}", "max_new_tokens=abc"], ("max_new_tokens",)),
             ("generate temperature=-1", [f"checkpoint={lm}", "temperature=-1"], ("temperature",)),
             ("generate temperature=nan", [f"checkpoint={lm}", "temperature=nan"], ("temperature",)),
             ("generate top_k=0", [f"checkpoint={lm}", "top_k=0"], ("top_k",)),
             ("generate on a vision checkpoint", [f"checkpoint={clone / 'checkpoints' / 'vim-digits'}"], ()),
             ("generate on an embedding checkpoint", [f"checkpoint={clone / 'checkpoints' / 'nv-embed-ict'}"], ())]
    results = []
    for label, argv, words in cases:
        results.append(Result(label, "exit 2, one line", *expect_error(2, *words)(
            zoo(clone, "generate", "prompt=hi", *argv))))
    return results


def case_data_files(clone: Path, scratch: Path) -> list[Result]:
    """Item 8 (and 7's dropped records): bad data files are one line naming the file; dropped records are counted."""
    good = [json.dumps({"text": "In the beginning God created the heaven and the earth. " * 4})] * 40
    files = {"empty": b"", "binary": bytes(range(256)) * 8, "non-UTF-8": "caf\xe9\n".encode("latin-1") * 50,
             "malformed JSON": b'{"text": "a"}\n{"text": \n',
             "non-string text field": b'{"text": 5}\n' * 20,
             "missing text field": b'{"other": "a"}\n' * 20}
    results = []
    for label, data in files.items():
        path = scratch / f"{label.replace(' ', '_')}.jsonl"
        path.write_bytes(data)
        results.append(Result(f"data file: {label}", "exit 2, one line naming the file",
                              *expect_error(2, path.name)(zoo(clone, "train", *TEXT, f"data.path={path}",
                                                               f"run.root={scratch}", f"run.name=d-{path.stem}"))))
    mixed = scratch / "some_without_text.jsonl"
    mixed.write_text("\n".join(good + ['{"other": "x"}'] * 3) + "\n")
    process = zoo(clone, "train", *TEXT, f"data.path={mixed}", f"run.root={scratch}", "run.name=d-mixed")
    counted = "3" in process.stderr and "Traceback" not in process.stderr
    results.append(Result("data file: 3 records without the text field", "exit 0, a warning counting 3",
                          f"exit {process.returncode}", process.returncode == 0 and counted,
                          process.stderr.strip().splitlines()[0] if process.stderr.strip() else ""))
    results.append(Result("data.path=<a directory>", "exit 2, says it is a directory", *expect_error(2, "director")(
        zoo(clone, "train", *TEXT, f"data.path={scratch}", f"run.root={scratch}", "run.name=d-dir"))))
    return results


def case_config_mistakes(clone: Path, scratch: Path) -> list[Result]:
    """Items 7, 8: duplicate YAML keys, a negative learning rate, a garbage config.json, a .ckpt where an export
    directory is expected."""
    results = []
    config = scratch / "dup.yaml"
    config.write_text("model:\n  dim: 32\n  dim: 64\n")
    results.append(Result("duplicate YAML key", "exit 2, one line", *expect_error(2, "dim")(
        zoo(clone, "train", f"config={config}", f"run.root={scratch}", "run.name=dup"))))
    results.append(Result("optim.lr=-1", "exit 2 before data loading", *expect_error(2, "lr")(
        train(clone, scratch, "neg", "optim.lr=-1"))))
    garbage = scratch / "garbage-export"
    shutil.copytree(clone / "checkpoints" / "transformer-mqar", garbage)
    (garbage / "config.json").write_bytes(bytes(range(256)))
    results.append(Result("garbage config.json (eval)", "exit 2, one line", *expect_error(2, "config.json")(
        zoo(clone, "eval", f"checkpoint={garbage}"))))
    finished = train(clone, scratch, "c", "trainer.max_steps=2")
    ckpt = scratch / "c" / "last.ckpt"
    if finished.returncode == 0:
        for verb, extra in (("eval", []), ("generate", ["prompt=hi"])):
            results.append(Result(f"{verb} checkpoint=<a .ckpt>", "exit 2, points at zoo export",
                                  *expect_error(2, "zoo export")(zoo(clone, verb, f"checkpoint={ckpt}", *extra))))
        script = f"import zoo\ntry:\n    zoo.load({str(ckpt)!r})\nexcept Exception as e:\n    print(e)\n"
        loaded = subprocess.run([sys.executable, "-c", script], cwd=clone, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(clone)})
        ok = "zoo export" in loaded.stdout and "\n" not in loaded.stdout.strip()
        results.append(Result("zoo.load(<a .ckpt>)", "one-line error pointing at zoo export",
                              "error" if loaded.stdout.strip() else "no error", ok, loaded.stdout.strip()[-200:]))
    return results


def case_nan_weights(clone: Path, scratch: Path) -> list[Result]:
    """Item 7: an export with NaN weights loads with a warning, and eval writes strict JSON (null, not NaN)."""
    import torch
    from safetensors.torch import load_file, save_file

    target = scratch / "nan-export"
    shutil.copytree(clone / "checkpoints" / "transformer-mqar", target)
    tensors = load_file(target / "model.safetensors")
    name = next(key for key, value in tensors.items() if value.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, target / "model.safetensors")
    out = scratch / "nan-eval.json"
    process = zoo(clone, "eval", f"checkpoint={target}", "eval.max_batches=1", f"eval.out={out}")
    try:
        text = out.read_text()
        json.loads(text, parse_constant=lambda constant: (_ for _ in ()).throw(ValueError(constant)))
        strict = True
    except (OSError, ValueError):
        strict = False
    warned = "nan" in process.stderr.lower() and "Traceback" not in process.stderr
    ok = process.returncode in (0, 1) and strict and warned
    return [Result("eval of an export with NaN weights", "a warning, strict JSON (null)",
                   f"exit {process.returncode}" + ("" if strict else ", NOT STRICT JSON"), ok,
                   process.stderr.strip().splitlines()[0] if process.stderr.strip() else "")]


def case_permission_and_disk(clone: Path, scratch: Path) -> list[Result]:
    """Items 8, 10: run.root not writable (immutable when this runs as root); a full disk (a 1 MiB tmpfs when
    mounting is allowed)."""
    results = []
    locked = scratch / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    # root ignores modes: an immutable directory (chattr +i) refuses root too, with EPERM
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    if os.geteuid() == 0 and not immutable:
        results.append(Result("run.root not writable", "exit 2, one line", "skipped", True, "root without chattr"))
    else:
        try:
            results.append(Result("run.root not writable", "exit 2, one line", *expect_error(2, "permission")(
                train(clone, locked, "p", "trainer.max_steps=2"))))
        finally:
            if immutable:
                subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    full = scratch / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)],
                             capture_output=True).returncode == 0
    if not mounted:
        results.append(Result("disk full in the run directory", "exit 1, names the path, says resume=auto",
                              "skipped", True, "cannot mount a tmpfs here (tests/train/test_faults.py simulates it)"))
        return results
    try:
        got = expect_error(1, str(full), "resume=auto")(train(clone, full, "f", "trainer.max_steps=4",
                                                               "model.dim=256", "model.vocab_size=4096"))
        results.append(Result("disk full in the run directory", "exit 1, names the path, says resume=auto", *got))
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
    return results


CASES = [case_export, case_fresh_start_over_artifacts, case_truncated_last_ckpt, case_eval_keeps_eval_json,
         case_signals, case_generate_options, case_data_files, case_config_mistakes, case_nan_weights,
         case_permission_and_disk]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--repo", default=str(here))
    parser.add_argument("--branch", default=None)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="run only these case functions (case_export ...)")
    options = parser.parse_args()
    branch = options.branch or subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=options.repo,
                                              capture_output=True, text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="zoo-probes-"))
    os.chmod(work, 0o755)
    clone = work / "clone"
    subprocess.run(["git", "clone", "--quiet", "--branch", branch, options.repo, str(clone)], check=True)
    start = time.monotonic()

    def run_case(case):
        scratch = work / case.__name__
        scratch.mkdir()
        os.chmod(scratch, 0o777)
        try:
            return case(clone, scratch)
        except Exception as error:  # a probe that breaks is a failed case, not a crashed script
            return [Result(case.__name__, "runs", f"{type(error).__name__}", False, str(error)[:200])]

    with ThreadPoolExecutor(options.jobs) as pool:
        chosen = [case for case in CASES if options.only is None or case.__name__ in options.only]
        results = [result for batch in pool.map(run_case, chosen) for result in batch]
    width = max(len(r.case) for r in results)
    print(f"{'case':<{width}}  {'expected':<48}  {'got':<22}  pass")
    for r in results:
        print(f"{r.case:<{width}}  {r.expected:<48}  {r.got:<22}  {'yes' if r.ok else 'NO'}")
        if r.note and (not r.ok or os.environ.get("PROBES_VERBOSE")):
            print(f"{'':<{width}}    {r.note}")
    passed = sum(r.ok for r in results)
    print(f"\n{passed}/{len(results)} passed on branch {branch} ({time.monotonic() - start:.0f} s; clone in {clone})")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
