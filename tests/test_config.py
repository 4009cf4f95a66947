"""Config parser and CLI argument handling (docs/training.md#config-parser)."""
import subprocess
import sys
import textwrap

import pytest

from zoo.config import Config, ConfigError, parse_args
from tests.helpers import run_zoo


def test_bad_key_exits_2_before_torch_import():
    code = textwrap.dedent("""
        import sys
        from zoo.cli import main
        rc = main(["train", "config=transformer-mqar", "model.dimm=3"])
        assert "torch" not in sys.modules, "torch was imported before the config was validated"
        sys.exit(rc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'model.dimm' (command line); did you mean 'model.dim'?" in lines[0]
    assert "Traceback" not in out.stderr


def test_yaml_float_strings_convert(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  min_lr_ratio: 1\ntrainer:\n  precision: bf16-mixed\n")
    cfg = parse_args([f"config={path}", "optim.weight_decay=1e-2", "trainer.max_steps=7"]).config
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr_ratio == 1.0 and isinstance(cfg.optim.min_lr_ratio, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-2)
    assert cfg.trainer.max_steps == 7


def test_str_field_keeps_command_line_text():
    cfg = parse_args(["trainer.precision=32-true", "run.name=007"]).config
    assert cfg.trainer.precision == "32-true" and cfg.run.name == "007"


def test_print_config_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_zoo("train", "config=transformer-mqar", "model.dim=96", "print_config=true") == 0
    out = capsys.readouterr().out
    assert "dim: 96" in out and "name: transformer-mqar" in out
    assert list(tmp_path.iterdir()) == []


def test_defaults_compose_in_order_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  dim: 64\n  depth: 3\noptim:\n  lr: 1e-3\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\nmodel:\n  dim: 96\n")
    cfg = parse_args([f"config={tmp_path / 'child.yaml'}", "optim.lr=5e-4"]).config
    assert (cfg.model.dim, cfg.model.depth, cfg.optim.lr) == (96, 3, 5e-4)
    assert cfg.run.name == "child"


def test_defaults_cycle_names_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle: a.yaml -> b.yaml -> a.yaml"):
        parse_args([f"config={tmp_path / 'a.yaml'}"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.dimm' \(in .*typo.yaml\); did you mean 'model.dim'\?"):
        parse_args([f"config={path}"])


@pytest.mark.parametrize("text, key, line", [("model:\n  dim: 32\n  dim: 64\n", "dim", 3),
                                             ("model:\n  dim: 32\ntrainer:\n  max_steps: 2\nmodel:\n  depth: 1\n",
                                              "model", 5)])
def test_duplicate_key_in_file_is_an_error_naming_key_and_file(tmp_path, text, key, line):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file .*twice.yaml gives key '{key}' twice \(line {line}\)"):
        parse_args([f"config={path}"])


@pytest.mark.parametrize("lr", ["-1e-3", "nan", "inf"])
def test_a_negative_or_non_finite_learning_rate_exits_2_before_data_loading(tmp_path, capsys, lr):
    missing = tmp_path / "never-read.txt"
    assert run_zoo("train", "data.name=text", f"data.path={missing}", f"optim.lr={lr}",
                   f"run.root={tmp_path}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"optim.lr must be a finite number >= 0, got {float(lr)}" in err


@pytest.mark.parametrize("args, message", [
    (["model.dim=abc"], "model.dim: expected int, got 'abc' (command line)"),
    (["trainer.precision=fp8"], "trainer.precision: 'fp8' is not one of"),
    (["config=nope.yaml"], "config file not found: nope.yaml (no such path, no bundled config 'nope'"),
    (["trainr.max_steps=3"], "unknown key 'trainr.max_steps' (command line); did you mean"),
    (["titans.yaml"], "unexpected argument 'titans.yaml'; arguments are key=value (did you mean config=titans.yaml?)"),
    (["model.tie_embeddings=yes"], "model.tie_embeddings: expected bool"),
    (["model.pattern=[atention]"], "unknown mixer 'atention'; did you mean 'attention'?"),
    (["data.name=mqar", "model.vocab_size=256"], "model.vocab_size 256 is smaller than the vocabulary of data mqar (512)"),
    (["data.name=mqar", "data.mqar.num_kv_pairs=40", "data.mqar.seq_len=32", "model.vocab_size=512"],
     "mqar: 4*num_kv_pairs (160) must be <= seq_len (32)"),
    (["trainer.precision=16-mixed", "trainer.accelerator=cpu"], "16-mixed needs a GPU"),
    (["trainer.activation_checkpointing=maybe"], "trainer.activation_checkpointing: expected bool"),
])
def test_bad_value_one_line_error(args, message):
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_bad_input_exit_code_2_no_traceback(capsys):
    assert run_zoo("train", "config=nope.yaml") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bundled_config_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("transformer-mqar", "transformer-mqar.yaml", "transformer"):
        cfg = parse_args([f"config={name}"]).config
        assert cfg.run.name == name.removesuffix(".yaml")


def test_null_clears_optional():
    cfg = parse_args(["model.attention.window=16", "model.attention.window=null"]).config
    assert cfg.model.attention.window is None


def test_help_is_generated_from_the_schema(capsys):
    assert run_zoo("train", "--help") == 0
    out = capsys.readouterr().out
    for key in ("model.dim", "optim.lr", "trainer.precision", "data.mqar.num_kv_pairs"):
        assert key in out
    assert Config().model.dim == 128


# ------------------------------------------------------------------------------------------------ registry
def test_registry_is_torch_free_and_imports_no_config():
    code = ("import sys, zoo.registry; assert 'torch' not in sys.modules; "
            "assert not {'zoo.config', 'zoo.schema'} & set(sys.modules), sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_architecture_choices_come_from_the_table():
    import dataclasses

    from zoo.registry import ARCHITECTURES
    from zoo.schema import ModelConfig

    field = {f.name: f for f in dataclasses.fields(ModelConfig)}["architecture"]
    assert field.metadata["choices"] == tuple(ARCHITECTURES)


def _data_names() -> tuple:
    import dataclasses

    from zoo.schema import DataConfig

    return {f.name: f for f in dataclasses.fields(DataConfig)}["name"].metadata["choices"]


@pytest.mark.parametrize("architecture", ["lm", "vision", "hmt", "embedding"])
def test_the_architecture_table_decides_which_data_fits(architecture):
    """validate() refuses exactly the data.name values the architecture's ARCHITECTURES entry does not list."""
    from zoo.config import validate
    from zoo.registry import ARCHITECTURES

    for data_name in _data_names():
        cfg = Config()
        cfg.model.architecture, cfg.data.name, cfg.data.path, cfg.model.vocab_size = architecture, data_name, "x", 9000
        try:
            validate(cfg)
            refused = ""
        except ConfigError as error:
            refused = str(error)
        fits = data_name in ARCHITECTURES[architecture].data
        assert ("does not fit" not in refused) == fits, (data_name, refused)
        if not fits:
            assert f"set data.name={' or '.join(ARCHITECTURES[architecture].data)}" in refused


# ------------------------------------------------------------------------------------------------ old layouts
OLD_TITANS = {"heads": 2, "head_dim": None, "memory_depth": 1, "memory_expansion": 2, "chunk_size": 8,
              "conv_size": 4, "momentum": True, "forget": False, "theta_max": 0.5, "segment_len": 32, "window": 24,
              "persistent_tokens": 3}
OLD_MOM = {"heads": 4, "head_dim": 16, "num_memories": 3, "topk": 1, "shared_memory": False, "aux_loss_scale": 0.01}


def test_old_titans_section_migrates_to_the_memory_and_hybrid_sections():
    from zoo.config import from_dict

    model = from_dict({"model": {"pattern": ["titans_mac"], "titans": dict(OLD_TITANS)}}).model
    memory = {key: value for key, value in OLD_TITANS.items()
              if key not in ("segment_len", "window", "persistent_tokens")}
    assert vars(model.titans) == {**vars(type(model.titans)()), **memory}
    assert (model.titans_mac.heads, model.titans_mac.segment_len, model.titans_mac.persistent_tokens) == (2, 32, 3)
    assert (model.titans_mag.heads, model.titans_mag.window, model.titans_mag.persistent_tokens) == (2, 24, 3)
    assert (model.titans_mal.heads, model.titans_mal.window, model.titans_mal.persistent_tokens) == (2, 24, 3)
    for hybrid in (model.titans_mac, model.titans_mag, model.titans_mal):
        assert hybrid.memory == model.titans and hybrid.memory is not model.titans


def test_old_config_without_gdn_section_takes_gdn_heads_from_mom():
    from zoo.config import from_dict

    model = from_dict({"model": {"pattern": ["gdn"], "mom": dict(OLD_MOM)}}).model
    assert (model.gdn.heads, model.gdn.head_dim) == (4, 16)
    assert (model.mom.num_memories, model.mom.topk) == (3, 1)


def test_current_layout_round_trips_unchanged():
    from zoo.config import from_dict, to_dict

    cfg = parse_args(["config=titans", "model.gdn.heads=3", "model.titans_mal.memory.chunk_size=4"]).config
    assert from_dict(to_dict(cfg)) == cfg


def test_old_titans_key_on_the_command_line_names_its_new_home():
    with pytest.raises(ConfigError, match=r"model\.titans_mac\.segment_len"):
        parse_args(["model.titans.segment_len=64"])
