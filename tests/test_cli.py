"""The command table: one grammar, help from the table, one-line errors, and docs/cli.md kept true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dymu_lightning import cli
from dymu_lightning.cli import BY_NAME, COMMANDS, TASKS, main
from dymu_lightning.config.recipes import packaged_recipes
from dymu_lightning.config.schema import SCHEMAS

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_target_imports_and_takes_its_options(command):
    import inspect

    function = cli._load(command.target)
    parameters = inspect.signature(function).parameters
    expected = {o.flags[-1].lstrip("-").replace("-", "_") for o in command.options}
    assert expected <= set(parameters), f"{command.target} lacks {expected - set(parameters)}"


def test_every_task_of_the_schemas_has_a_runner():
    assert set(TASKS) == set(SCHEMAS)
    for check, run in TASKS.values():
        assert callable(cli._load(check)) and callable(cli._load(run))


def test_help_lists_every_command_with_its_table_help(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert re.search(rf"^  {command.name} +{re.escape(command.help)}$", out, re.MULTILINE)


def test_command_help_comes_from_the_table(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["shards", "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dymu shards")
    for option in BY_NAME["shards"].options:
        assert option.help.split("(")[0].strip() in " ".join(out.split())


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert main(["chek", "recipe=quickstart"]) == 2
    assert capsys.readouterr().err == "error: unknown command 'chek'; did you mean 'check'?\n"


def test_key_value_first_means_the_run_command():
    argv = ["recipe=quickstart", "seed=3"]
    assert cli._split(argv) == (BY_NAME["run"], argv)
    assert cli._split(["check", *argv]) == (BY_NAME["check"], argv)


def test_a_recipe_command_without_a_recipe_is_one_line(capsys):
    assert main(["check", "seed=3"]) == 2
    assert capsys.readouterr().err == "error: a recipe command needs recipe=NAME (see `dymu ls`)\n"


def test_cp_copies_a_packaged_recipe_that_then_checks(tmp_path, capsys):
    assert main(["cp", "quickstart", str(tmp_path)]) == 0
    copied = tmp_path / "quickstart.yaml"
    assert copied.read_text() == packaged_recipes()["quickstart"].read_text()
    assert main(["check", f"recipe={copied}"]) == 0
    assert main(["cp", "quickstart", str(copied)]) == 2
    assert capsys.readouterr().err.endswith(f"error: {copied} exists; pass --overwrite to replace it\n")
    assert main(["cp", "quikstart", str(tmp_path / "x.yaml")]) == 2
    assert "no packaged recipe 'quikstart'; did you mean 'quickstart'?" in capsys.readouterr().err


def test_docs_table_matches_the_command_table():
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| `(.+?)` \|$", (DOCS / "cli.md").read_text(), re.MULTILINE)
    assert rows == [(c.name, c.help, c.example) for c in COMMANDS]


@pytest.mark.parametrize(
    ("argv", "flag", "problem"),
    [
        (["align_small_llava", "--train", "0"], "--train", "must be >= 1, got 0"),
        (["vlm_study", "--test", "-1"], "--test", "must be >= 1, got -1"),
        (["finetune_study", "--calibration", "ten"], "--calibration", "expected a whole number, got 'ten'"),
    ],
)
def test_an_image_count_below_one_is_refused_before_any_work(argv, flag, problem, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {problem}")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["align_small_llava", "--force", "--lr", "0"], "--lr must be > 0, got 0.0"),
        (["align_small_llava", "--force", "--warmup", "-2"], "--warmup must be >= 0, got -2"),
        (["align_small_llava", "--force", "--class-loss", "-1"], "--class-loss must be >= 0, got -1.0"),
        (
            ["align_small_llava", "--force", "--captions", "all"],
            "--class-loss reads the name after 'A photo of a': it needs --captions scoring",
        ),
    ],
)
def test_bad_alignment_settings_are_refused_before_any_work(argv, problem, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {problem}")
