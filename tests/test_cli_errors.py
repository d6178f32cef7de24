"""`qdiff.cli.run_main`: a user's mistake is one line and exit 2, Ctrl-C exit 130, a bug keeps
its traceback, and --debug / QDIFF_DEBUG shows every traceback."""

from __future__ import annotations

import argparse
import errno

import pytest

from qdiff import cli
from qdiff.config import ConfigError


def _raise(error: BaseException):
    def body():
        raise error
    return body


def test_a_user_error_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run_main(_raise(ConfigError("quant.act_bits=9 is out of range; allowed: 2..8.")))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: quant.act_bits=9 is out of range; allowed: 2..8.\n"


def test_ctrl_c_says_how_to_continue_and_exits_130(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run_main(_raise(KeyboardInterrupt()), interrupted="resume with --resume")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted: resume with --resume\n"


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full; free some space"),
                                         (errno.EROFS, "read-only; choose a folder"),
                                         (errno.EACCES, "permission denied; choose a folder")])
def test_a_full_or_read_only_folder_is_named_in_one_line(capsys, code, words):
    with pytest.raises(SystemExit) as stop:
        cli.run_main(_raise(OSError(code, "os text", "/runs/x/log.jsonl")))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /runs/x/log.jsonl: ") and words in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run_main(_raise(ZeroDivisionError("bug")))
    with pytest.raises(OSError):  # an OSError that is no user's doing is a bug too
        cli.run_main(_raise(OSError(errno.EIO, "I/O error", "/dev/x")))


def test_debug_flag_or_environment_shows_the_traceback(monkeypatch):
    with pytest.raises(ConfigError):
        cli.run_main(_raise(ConfigError("x")), argparse.Namespace(debug=True))
    monkeypatch.setenv("QDIFF_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.run_main(_raise(KeyboardInterrupt()))


@pytest.mark.parametrize("kind, text, message", [
    (cli.positive_int, "0", "0 must be 1 or more"),
    (cli.positive_int, "-5", "-5 must be 1 or more"),
    (cli.positive_int, "2.5", "'2.5' is not an integer"),
    (cli.nonnegative_float, "inf", "'inf' is not a finite number"),
    (cli.nonnegative_float, "nan", "'nan' is not a finite number"),
    (cli.nonnegative_float, "-1", "-1.0 must be 0 or more"),
    (cli.positive_float, "0", "0.0 must be more than 0"),
])
def test_argparse_types_refuse_numbers_out_of_range(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        kind(text)
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=kind)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", text])
    assert stop.value.code == 2
