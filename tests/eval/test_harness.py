"""Tokenizers travel with model directories; lm-evaluation-harness scores zoo models exactly (model ``zoo``)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_zoo
from zoo.checkpoint import export_model
from zoo.config import from_dict
from zoo.data.tokenizer import ByteTokenizer, FileTokenizer, load_tokenizer
from zoo.models import build_model

lm_eval = pytest.importorskip("lm_eval")
from zoo.eval.harness import ZooLM  # noqa: E402

DOCS = [{"question": "In the beginning", "answer": " God", "wrong": " dog"},
        {"question": "And the earth was", "answer": " without form", "wrong": " full"},
        {"question": "Let there be", "answer": " light", "wrong": " night"}]


def export_lm(out, pattern="gdn", **data):
    """An export directory of an untrained one-block LM of ``pattern``."""
    config = from_dict({"model": {"dim": 32, "depth": 2, "pattern": [pattern], "attention": {"heads": 2}},
                        "data": data})
    torch.manual_seed(0)
    model = build_model(config)
    export_model(model, config, out)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "model"
    return export_lm(out), out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice, a rolling-perplexity and a generation task over one local jsonl (lm-eval's json loader)."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              f"doc_to_text: \"{{{{question}}}}\"\n")
    (root / "choice.yaml").write_text(
        "task: zoo_choice\noutput_type: multiple_choice\n" + common +
        "doc_to_choice: \"{{[answer, wrong]}}\"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    (root / "rolling.yaml").write_text(
        "task: zoo_rolling\noutput_type: loglikelihood_rolling\n" + common.replace("{{question}}", "") +
        "doc_to_target: \"{{question}}{{answer}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    (root / "until.yaml").write_text(
        "task: zoo_until\noutput_type: generate_until\n" + common + "doc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"e\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


class Request:
    """The part of lm-eval's ``Instance`` an LM reads."""

    def __init__(self, *args):
        self.args = args


def summed_log_prob(model, context: list[int], continuation: list[int]) -> float:
    """zoo's own log-probability of ``continuation`` after ``context``, in float64 from one full forward."""
    ids = torch.tensor([context + continuation])
    logits, _ = model(ids)
    logprobs = logits.double().log_softmax(-1)[0, len(context) - 1:-1]                    # (n, V)
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


# ------------------------------------------------------------------------------------------------------ tokenizers
def test_exports_record_their_tokenizer(tmp_path, kjv_fixture):
    export_lm(tmp_path / "bytes")
    assert json.loads((tmp_path / "bytes" / "zoo_tokenizer.json").read_text())["type"] == "bytes"
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(kjv_fixture.read_text().splitlines(),
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"]))
    source = tmp_path / "bpe.json"
    tok.save(str(source))
    export_lm(tmp_path / "bpe", tokenizer=str(source))
    source.unlink()                                      # the export keeps its own copy
    loaded = load_tokenizer(tmp_path / "bpe")
    assert isinstance(loaded, FileTokenizer) and loaded.decode(loaded.encode("In the beginning")) == "In the beginning"
    assert loaded.vocab_size == 300


def test_shipped_checkpoints_carry_their_tokenizer():
    for name in ("titans-kjv", "hmt-kjv", "memoryformer-kjv", "nv-embed-ict", "mom-mqar", "titans-mqar",
                 "transformer-mqar"):
        assert isinstance(load_tokenizer(f"checkpoints/{name}"), ByteTokenizer), name


def test_older_export_without_record_uses_its_config(tmp_path):
    export_lm(tmp_path / "old")
    (tmp_path / "old" / "zoo_tokenizer.json").unlink()
    assert isinstance(load_tokenizer(tmp_path / "old"), ByteTokenizer)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["data"]["tokenizer"] = str(tmp_path / "gone.json")
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="carries no tokenizer"):
        load_tokenizer(tmp_path / "old")


def test_hf_directory_tokenizer_names_its_eos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_tokenizer(tmp_path).eos_id == 2


# ------------------------------------------------------------------------------------------------------ harness
def test_loglikelihood_equals_zoo_summed_log_prob(tiny_lm):
    model, out = tiny_lm
    lm = ZooLM(str(out), batch_size=2)
    pairs = [("In the beginning", " God"), ("In the beginning", " dog"), ("", "Let"), ("And the earth ", "was")]
    results = lm.loglikelihood([Request(*pair) for pair in pairs])
    byte = ByteTokenizer()
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        stripped = context.rstrip(" ")
        context_ids = byte.encode(stripped) or [byte.eos_id]
        continuation_ids = byte.encode(context[len(stripped):] + continuation)
        assert logprob == pytest.approx(summed_log_prob(model, context_ids, continuation_ids), rel=1e-5, abs=1e-5)
        assert isinstance(greedy, bool)


def test_rolling_is_one_pass_of_the_state(tiny_lm):
    model, out = tiny_lm
    text = "In the beginning God created the heaven and the earth."
    ids = ByteTokenizer().encode(text)
    expected = summed_log_prob(model, [ByteTokenizer.eos_id], ids)
    for chunk in (1000, 7):                                  # one forward, or chunks that carry the state
        (total,) = ZooLM(str(out), chunk_tokens=chunk).loglikelihood_rolling([Request(text)])
        assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_cuts_at_the_stop_string(tiny_lm):
    model, out = tiny_lm
    lm = ZooLM(str(out))
    prompt = "In the"
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    full = ByteTokenizer().decode(model.generate(ids, 12)[0, ids.shape[1]:].tolist())
    stop = full[3] if len(full) > 3 else "\n"
    (text,) = lm.generate_until([Request(prompt, {"until": [stop], "max_gen_toks": 12})])
    assert text == full.split(stop, 1)[0]
    (text,) = lm.generate_until([Request(prompt, {"until": [], "max_gen_toks": 5})])
    assert text == ByteTokenizer().decode(model.generate(ids, 5)[0, ids.shape[1]:].tolist())


def test_simple_evaluate_on_local_tasks(tiny_lm, task_dir):
    model, out = tiny_lm
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    output = lm_eval.simple_evaluate(model="zoo", model_args=f"pretrained={out},batch_size=2",
                                     tasks=["zoo_choice", "zoo_rolling", "zoo_until"], task_manager=manager,
                                     log_samples=False)
    byte = ByteTokenizer()
    hits = [summed_log_prob(model, byte.encode(d["question"]), byte.encode(d["answer"])) >
            summed_log_prob(model, byte.encode(d["question"]), byte.encode(d["wrong"])) for d in DOCS]
    assert output["results"]["zoo_choice"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert output["results"]["zoo_rolling"]["word_perplexity,none"] > 1
    assert "exact_match,none" in output["results"]["zoo_until"]


def test_zoo_eval_writes_harness_results_beside_eval(tiny_lm, task_dir, tmp_path, capsys):
    _, out = tiny_lm
    before = sorted(p.name for p in out.iterdir())
    result_file = tmp_path / "eval.json"
    assert run_zoo("eval", f"checkpoint={out}", "harness_tasks=zoo_choice", f"harness_include={task_dir}",
                   f"data.path={task_dir / 'docs.jsonl'}", "data.name=text", "data.text_field=question",
                   "data.seq_len=8", "eval.max_batches=1", f"eval.out={result_file}") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(result_file.read_text())
    assert "loss" in printed and 0 <= printed["harness"]["results"]["zoo_choice"]["acc,none"] <= 1
    assert sorted(p.name for p in out.iterdir()) == before                 # nothing written into the checkpoint


def test_zoo_eval_harness_errors_are_one_line(tiny_lm, task_dir, capsys):
    _, out = tiny_lm
    for args, named in ((["harness_tasks=nope", f"harness_include={task_dir}"], "unknown harness task 'nope'"),
                        (["harness_include=x"], "go with harness_tasks"),
                        (["harness_tasks=zoo_choice", "harness_include=/no/such/dir"], "harness_include=/no/such")):
        assert run_zoo("eval", f"checkpoint={out}", *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
