"""Progress display: Rich's bar in an interactive terminal, plain progress lines otherwise."""
import io
import sys

from lightning.pytorch.callbacks import RichProgressBar

from zoo.config import parse_args
from zoo.train import fit
from zoo.train.callbacks import ProgressLines
from tests.helpers import TINY_MQAR, run_zoo, train_losses


class FakeStdout(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_terminal_gets_rich_and_anything_else_plain_lines(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stdout", FakeStdout(tty=True))
    assert fit.use_progress_bar()
    monkeypatch.setenv("CI", "1")
    assert not fit.use_progress_bar()
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys, "stdout", FakeStdout(tty=False))
    assert not fit.use_progress_bar()

    cfg = parse_args(TINY_MQAR).config
    bar, lines = fit.progress_callbacks(cfg, interactive=True)
    assert isinstance(bar, RichProgressBar) and isinstance(lines, ProgressLines) and not lines.print_lines
    (plain,) = fit.progress_callbacks(cfg, interactive=False)
    assert isinstance(plain, ProgressLines) and plain.print_lines


def test_training_runs_with_the_rich_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "use_progress_bar", lambda: True)
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=r", "trainer.max_steps=3",
                   "trainer.val_check_interval=3") == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert sorted(train_losses(tmp_path / "r")) == [1, 2, 3]
    assert (tmp_path / "r" / "eval.json").is_file()


def test_the_progress_line_shows_the_learning_rate_of_the_step_it_reports(tmp_path, monkeypatch, capsys):
    from zoo.train.task import lr_lambda

    monkeypatch.setattr(fit, "use_progress_bar", lambda: False)
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=r", "trainer.max_steps=4",
                   "trainer.val_check_interval=4", "optim.lr=1e-2", "optim.warmup_steps=4") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    schedule = lr_lambda(4, 4, 0.1)
    expected = [f"lr {1e-2 * schedule(step - 1):.2e}" for step in (1, 2, 3, 4)]   # step s runs scheduler step s-1
    assert [line.split(" | ")[2] for line in lines] == expected
