"""
configurator: typed overrides, config files, and one-line errors for every mistake.

    python -m pytest -q tests/test_configurator.py
"""
import io
import os

import pytest

from conftest import assert_user_error, run_script
from configurator import configure
from utils import UserError


def settings():
    # a stand-in for a script's globals(): plain settings plus things that are not settings
    return {"__doc__": "test script", "_private": 1, "pytest": pytest,
            "max_iters": 100, "learning_rate": 1e-3, "compile": True, "out_dir": "out",
            "global_layers": "", "dtype": "auto"}


def test_each_type_and_snapshot(capsys):
    g = settings()
    config = configure(g, ["--max_iters=7", "--learning_rate=3e-4", "--compile=False",
                           "--out_dir=out-x", "--dtype='float16'"])
    assert config == {"max_iters": 7, "learning_rate": 3e-4, "compile": False,
                      "out_dir": "out-x", "global_layers": "", "dtype": "float16"}
    assert g["max_iters"] == 7 and g["out_dir"] == "out-x"  # updated in place
    assert "Overriding: max_iters = 7" in capsys.readouterr().out


def test_int_for_float_and_lowercase_bools():
    g = settings()
    configure(g, ["--learning_rate=1", "--compile=false"])
    assert g["learning_rate"] == 1.0 and type(g["learning_rate"]) is float
    assert g["compile"] is False
    configure(g, ["--compile=true"])
    assert g["compile"] is True


def test_inf_and_nan_are_floats_for_the_range_checks_to_judge():
    """--learning_rate=inf is a float (the script's range check then names the setting and its
    bounds), not 'expected float, got str'; an int setting still refuses it."""
    import math
    g = settings()
    for text, check in (("inf", math.isinf), ("-inf", math.isinf), ("nan", math.isnan), ("Infinity", math.isinf)):
        configure(g, [f"--learning_rate={text}"])
        assert type(g["learning_rate"]) is float and check(g["learning_rate"]), text
    with pytest.raises(UserError, match="--max_iters: expected int, got str 'inf'"):
        configure(g, ["--max_iters=inf"])


def test_a_number_past_int64_is_one_error_and_the_largest_passes():
    """torch takes sizes and seeds as int64: a larger number was a TypeError deep in torch."""
    g = settings()
    for name in ("max_iters", "learning_rate"):
        with pytest.raises(UserError, match=f"--{name}: {2**63} is too large a number"):
            configure(g, [f"--{name}={2**63}"])
        with pytest.raises(UserError, match="too large"):
            configure(g, [f"--{name}={-2**63}"])
    configure(g, [f"--max_iters={2**63 - 1}"])
    assert g["max_iters"] == 2**63 - 1


def test_str_keeps_raw_text():
    g = settings()
    configure(g, ["--global_layers=0"])
    assert g["global_layers"] == "0"
    configure(g, ["--global_layers=0,5"])
    assert g["global_layers"] == "0,5"
    configure(g, ["--out_dir=a=b=c"])  # only the first "=" separates name and value
    assert g["out_dir"] == "a=b=c"


def test_config_file_in_order(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nmax_iters = 50\nlearning_rate = max_iters // 10\n_tmp = 3\n")
    g = settings()
    configure(g, [str(path), "--max_iters=9"])
    assert g["max_iters"] == 9 and g["learning_rate"] == 5.0


def test_given_names_what_flags_and_config_files_set_even_to_a_default(tmp_path):
    """A resume keeps some of the checkpoint's settings unless given: a config file that
    restates a default gives that setting, as a flag does; a setting only read is not given."""
    path = tmp_path / "cfg.py"
    path.write_text("out_dir = 'out'\nif out_dir:\n    compile = True\nmax_iters = max_iters\nprint(learning_rate)\n")
    g, given = settings(), set()
    before = dict(g)
    configure(g, [str(path), "--dtype=auto"], given=given)
    assert g == before  # every value is its default
    assert given == {"out_dir", "compile", "max_iters", "dtype"}


def test_config_file_after_a_flag_that_it_would_change_is_refused(tmp_path):
    """A config file given after --max_iters=7 that sets max_iters would undo the flag without a
    word (a run in another --out_dir, a checkpoint replaced): one line says to put it first."""
    path = tmp_path / "cfg.py"
    path.write_text("max_iters = 50\n")
    g = settings()
    with pytest.raises(UserError, match=r"comes after --max_iters=7 and sets max_iters too; put config files first"):
        configure(g, ["--max_iters=7", "--compile=False", str(path)])
    assert g["max_iters"] == 7  # nothing of the file was applied
    g = settings()
    configure(g, [str(path), "--max_iters=7"])  # the order that is meant
    assert g["max_iters"] == 7
    g = settings()
    configure(g, ["--max_iters=50", "--compile=False", str(path)])  # the file agrees with the flag
    assert g["max_iters"] == 50 and g["compile"] is False


@pytest.mark.parametrize("argv, fragments", [
    (["--lerning_rate=1"], ["unknown setting --lerning_rate", "did you mean --learning_rate?"]),
    (["--zzz=1"], ["unknown setting --zzz", "--help"]),
    (["--learning_rate=abc"], ["--learning_rate: expected float, got str 'abc'"]),
    (["--max_iters=1.5"], ["--max_iters: expected int, got float 1.5"]),
    (["--compile=1"], ["--compile: expected bool, got int 1", "write True or False"]),
    (["--compile=yes"], ["--compile: expected bool, got str 'yes'", "write True or False"]),
    (["--max_iters=1e3"], ["--max_iters: expected int, got float 1000.0", "write 1000"]),
    (["--config=config/x.py"], ["unknown setting --config", "given without a flag"]),
    (["--max_iters", "3"], ["--max_iters needs its value after '='", "--max_iters=VALUE"]),  # argparse's way
    (["--max_iter"], ["bad argument '--max_iter'", "--name=value", "did you mean --max_iters?"]),
    (["--wandb_log=True"], ["unknown setting --wandb_log", "this script logs no scalars"]),  # nanoGPT's settings
    (["--init_from=gpt2"], ["unknown setting --init_from", "GPT-2's weights do not fit"]),  # (no such flag here)
    (["-max_iters=3"], ["bad argument '-max_iters=3'"]),
    (["max_iters=3"], ["bad argument 'max_iters=3'"]),
    (["no/such/config.py"], ["config file no/such/config.py not found"]),
    (["config/train_shakespeare_char_cpu.p"], ["not found; did you mean config/train_shakespeare_char_cpu.py?"]),
    (["config/train_shakespeare_char_cpu"], ["not found; did you mean config/train_shakespeare_char_cpu.py?"]),
])
def test_errors_are_one_line(argv, fragments):
    with pytest.raises(UserError) as info:
        configure(settings(), argv)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_checkpoint_given_as_a_config_file_is_named_as_such(tmp_path):
    """A run's checkpoint (or any binary file) where a config file goes: one line saying what it
    is and how a run's folder is given, not a UnicodeDecodeError."""
    for name, data in (("ckpt.pt", b"PK\x03\x04 zip"), ("blob", b"\x80\x02\x00binary")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="is not a Python file of settings but a checkpoint or another binary "
                                            r"file \(a run's folder is named with --out_dir=FOLDER\)"):
            configure(settings(), [str(tmp_path / name)])


@pytest.mark.parametrize("body, fragments", [
    ("lerning_rate = 0.1\n", ["unknown setting 'lerning_rate'", "--learning_rate"]),
    ("wandb_log = True\n", ["unknown setting 'wandb_log'", "wandb is not supported"]),  # nanoGPT's, turned on
    ("max_iters = 'many'\n", ["max_iters: expected int, got str 'many'"]),
    ("max_iters = = 3\n", ["SyntaxError"]),
    ("max_iters = undefined_name\n", ["NameError"]),
    ("for i in range(2):\n    pass\n", ["unknown setting 'i'", "starts with _ and is left alone"]),
])
def test_config_file_errors_name_the_file(tmp_path, body, fragments):
    path = tmp_path / "cfg.py"
    path.write_text(body)
    with pytest.raises(UserError) as info:
        configure(settings(), [str(path)])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_help_lists_settings(capsys):
    with pytest.raises(SystemExit) as info:
        configure(settings(), ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "test script" in out and "--max_iters=100" in out and "_private" not in out


def test_help_describes_a_setting_by_its_global_not_an_argument_of_the_same_name(tmp_path, capsys):
    """A call inside the script that passes `temperature=temperature,  # a comment` on a line of
    its own is not a second setting: --help lists the global once, with its own description."""
    script = tmp_path / "script.py"
    script.write_text("temperature = 0.8  # how random the draw is\n\n\ndef main():\n"
                      "    run(1,\n        temperature=temperature,  # passed on\n    )\n")
    g = dict(settings(), __file__=str(script), temperature=0.8)
    with pytest.raises(SystemExit):
        configure(g, ["--help"])
    lines = [l for l in capsys.readouterr().out.splitlines() if "temperature" in l]
    assert lines == ["  --temperature=0.8  how random the draw is"]


def test_script_reports_one_line_without_traceback():
    proc = run_script("gen_sample_data.py", "--blok_size=3")
    assert_user_error(proc, "did you mean --block_size")
    assert proc.returncode == 2
    assert_user_error(run_script("gen_sample_data.py", "--block_size=big"), "expected int")


@pytest.mark.parametrize("body, fragment", [
    ("raise SystemExit(0)\n", "exits (SystemExit: 0)"),
    ("import sys\nsys.exit(5)\n", "exits (SystemExit: 5)"),
    ("raise GeneratorExit('odd')\n", ": GeneratorExit: odd"),
], ids=["SystemExit", "sys.exit", "GeneratorExit"])
def test_config_file_that_exits_is_an_error_naming_it(tmp_path, body, fragment):
    """Only Exception was caught: a config file that exits ended the script without a word."""
    path = tmp_path / "cfg.py"
    path.write_text(body)
    with pytest.raises(UserError) as info:
        configure(settings(), [str(path)])
    assert str(info.value).startswith(f"config file {path}") and fragment in str(info.value)


def test_ctrl_c_in_a_config_file_still_stops(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        configure(settings(), [str(path)])


def test_config_file_that_is_a_folder(tmp_path):
    with pytest.raises(UserError, match=f"config file {tmp_path} is a folder; give the path of a Python file"):
        configure(settings(), [str(tmp_path)])
    # a script with an out_dir: a run's folder given bare is probably meant as one
    with pytest.raises(UserError, match=f"a run's folder is named with --out_dir={tmp_path}"):
        configure(dict(settings(), out_dir="out"), [str(tmp_path)])


def test_a_recipe_path_from_another_folder_says_where_the_recipe_is(tmp_path, monkeypatch):
    """`cd /tmp && python /path/to/train.py config/...py`: the relative path is not found here,
    and the error names the folder it looked in and the project's file."""
    import configurator
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        configure(settings(), ["config/train_shakespeare_char_cpu.py"])
    message = str(info.value)
    assert f"not found in {tmp_path}" in message
    assert os.path.join(configurator._HERE, "config", "train_shakespeare_char_cpu.py") in message


def test_a_training_recipe_given_to_another_script_says_whose_it_is():
    """python sample.py config/train_shakespeare_char_cpu.py: its first training setting is
    named, and so is the script the recipe is for."""
    proc = run_script("sample.py", "config/train_shakespeare_char_cpu.py")
    assert_user_error(proc, "config/train_shakespeare_char_cpu.py configures train.py; sample.py takes its own")
    proc = run_script("sample.py", "--init_from=gpt2-xl")
    assert_user_error(proc, "reads the checkpoint in --out_dir (--checkpoint_name names it); GPT-2's weights")


@pytest.mark.parametrize("script, reads", [("kv_study.py", "reads its base checkpoint from --base"),
                                           ("gen_sample_data.py", "starts from no checkpoint")])
def test_init_from_says_where_each_script_starts(script, reads):
    assert_user_error(run_script(script, "--init_from=resume"), f"unknown setting --init_from; this script {reads}")


def test_nanogpts_settings_at_what_a_script_does_anyway_are_ignored_and_said_to_be():
    """--init_from=resume where the script reads a checkpoint, --wandb_log=False anywhere: the
    settings are the ones given without them, and a line says each was ignored; any other value
    is refused as before."""
    echo = io.StringIO()
    g = dict(out_dir="out", checkpoint_name="ckpt.pt", seed=1)
    assert configure(g, ["--init_from=resume", "--wandb_log=False", "--seed=2"], echo=echo) == {
        "out_dir": "out", "checkpoint_name": "ckpt.pt", "seed": 2}
    assert "Ignoring: init_from = resume" in echo.getvalue() and "Ignoring: wandb_log = False" in echo.getvalue()
    for argv in (["--init_from=gpt2"], ["--wandb_log=True"]):
        with pytest.raises(UserError, match="only resume|unknown setting --wandb_log"):
            configure(dict(g), argv, echo=io.StringIO())
    with pytest.raises(UserError, match="starts from no checkpoint"):
        configure(dict(seed=1), ["--init_from=resume"], echo=io.StringIO())
    with pytest.raises(UserError, match=r"--init_from=gpt2: only resume, .*GPT-2's weights do not fit"):
        configure(dict(g), ["--init_from=gpt2"], echo=io.StringIO())


def test_a_nanogpt_config_file_with_its_wandb_lines_is_read_and_the_lines_ignored(tmp_path):
    """nanoGPT's config/train_shakespeare_char.py sets wandb_log = False, wandb_project and
    wandb_run_name: the file configures the rest, a line says each wandb one was ignored; with
    wandb_log = True it is refused (wandb is not supported here)."""
    path = tmp_path / "nanogpt.py"
    path.write_text("max_iters = 7\nwandb_log = False # override via command line if you like\n"
                    "wandb_project = 'shakespeare-char'\nwandb_run_name = 'mini-gpt'\n")
    echo, g = io.StringIO(), settings()
    configure(g, [str(path)], echo=echo)
    assert g["max_iters"] == 7 and "wandb_log" not in g
    assert all(f"Ignoring: {n}" in echo.getvalue() for n in ("wandb_log", "wandb_project", "wandb_run_name"))
    path.write_text("max_iters = 7\nwandb_log = True\n")
    with pytest.raises(UserError, match="unknown setting 'wandb_log'; wandb is not supported here"):
        configure(settings(), [str(path)], echo=io.StringIO())


def test_nanogpts_bench_flags_are_answered():
    """--real_data=True is what bench.py does (ignored, said); False, and --profile, are refused saying why."""
    echo = io.StringIO()
    configure(dict(bench_iters=3), ["--real_data=True"], echo=echo)
    assert "Ignoring: real_data = True" in echo.getvalue()
    with pytest.raises(UserError, match="always times batches of --dataset's text"):
        configure(dict(bench_iters=3), ["--real_data=False"], echo=io.StringIO())
    with pytest.raises(UserError, match="no profiler is built in"):
        configure(dict(bench_iters=3), ["--profile=True"], echo=io.StringIO())


def test_wandb_points_to_tensorboard_only_where_the_script_writes_it():
    with pytest.raises(UserError, match=r"TensorBoard scalars are written \(--tensorboard=True"):
        configure(dict(settings(), tensorboard=True), ["--wandb_log=True"])
    with pytest.raises(UserError, match="this script logs no scalars"):
        configure(settings(), ["--wandb_log=1"])


def test_a_recipe_named_without_its_folder_is_found_in_config(monkeypatch):
    """train.py train_shakespeare_char_cpu.py, run in the project's folder: config/ is suggested
    (a letter off too); the project's own scripts are never suggested as config files."""
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))
    for given in ("train_shakespeare_char_cpu.py", "train_shakespeare_char_cpu", "train_shakespeare_char_cpx.py"):
        with pytest.raises(UserError, match="not found; did you mean config/train_shakespeare_char_cpu.py"):
            configure(settings(), [given])
    for unrelated in ("trian.py", "eval.py", "mine.py", "finetune.py"):  # (not config/xl.py or linear.py)
        with pytest.raises(UserError, match="not found$"):
            configure(settings(), [unrelated])


def test_a_path_setting_starting_with_tilde_is_the_home_folder(monkeypatch, tmp_path):
    """The shell leaves --out_dir=~/run as it is: a folder named '~' would appear where one runs.
    Path settings expand it; other text (a prompt) keeps its '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    g = configure(dict(settings(), start="####", dataset="x"), ["--out_dir=~/run", "--dataset=~", "--start=~/hi"])
    assert g["out_dir"] == str(tmp_path / "run") and g["dataset"] == str(tmp_path) and g["start"] == "~/hi"
