"""Hostile configs through real `distrain` processes (issue 11: items 10, 13, 14, 23, 24): exit 2,
one stderr line naming the culprit, no traceback; and what must work (stdin, pipes, `~`, text)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, distrain_cmd, metrics_events, run_distrain, smoke_args, subprocess_env
from test_config_hostile import bomb
from test_errors import assert_user_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run_with_stdin(args: list[str], text: str) -> subprocess.CompletedProcess:
    return subprocess.run(distrain_cmd(args), input=text, cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_config_from_stdin_dev_stdin_and_a_pipe(tmp_path):
    bad = "train:\n  lr: .nan\n"
    for path in ("-", "/dev/stdin"):
        proc = run_with_stdin(["train", "-c", path], bad)  # read (it knows the lr), then refused
        assert_user_error(proc, "train", "'train.lr' must be a finite number", "line 2")
    # `-c <(...)`: bash hands over a pipe as /dev/fd/N.
    script = f"exec {' '.join(distrain_cmd(['train']))} -c <(printf 'train:\\n  lr: .inf\\n')"
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "train", "'train.lr' must be a finite number")
    # And one that trains: the run's config.yaml holds what came through the pipe.
    run = tmp_path / "run"
    good = yaml.safe_dump({"train": {"lr": 0.02}})
    proc = run_with_stdin(["train", "-c", "-", *smoke_args(run)], good)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.02


@pytest.mark.parametrize("body, needles", [
    ("train:\n  lr: 0.1\ndata:\n  name: synthetic\ntrain:\n  epochs: 3\n",
     ["key 'train' appears twice", "lines 1 and 5"]),
    ("train.lr: 0.1\n", ["YAML nests keys", "'train:'"]),
    (bomb(), ["expands to more than 10000 values", "line 2"]),
])
def test_yaml_mistakes_are_one_line(tmp_path, body, needles):
    f = tmp_path / "c.yaml"
    f.write_text(body)
    proc = run_distrain(["train", "-c", str(f), f"output_dir={tmp_path / 'run'}"], timeout=60)
    assert_user_error(proc, "train", f"'{f}'", *needles)
    assert len(proc.stderr) < 1000 and not (tmp_path / "run").exists()


def test_a_directory_given_to_c(tmp_path):
    proc = run_distrain(["train", "-c", str(tmp_path)])
    assert_user_error(proc, "train", f"'{tmp_path}' is a directory")


def test_string_values_and_home_reach_the_run_as_typed(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = subprocess_env(HOME=home)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["train", *smoke_args("~/0123"), "data.root=~/2024_01"]
    proc = subprocess.run(distrain_cmd(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = home / "0123"
    assert metrics_events(run, "train") and not (cwd / "~").exists() and not (cwd / "83").exists()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["output_dir"] == str(run) and recorded["data"]["root"] == str(home / "2024_01")


def test_eval_refuses_keys_it_does_not_use(tmp_path):
    run = tmp_path / "run"
    run_distrain(["train", *smoke_args(run)], check=True)
    for override, key in (("model.name=vgg16", "model.name"), ("train.lr=5", "train.lr")):
        proc = run_distrain(["eval", "--checkpoint", str(run), "--json", override])
        assert_user_error(proc, "eval", f"distrain eval does not use config key '{key}'", "data.*")
    proc = run_distrain(["eval", "--checkpoint", str(run), "--json", "data.max_test_samples=16",
                         "train.batch_size=8"], check=True)
    assert '"samples": 16' in proc.stdout


@pytest.mark.parametrize("how", ["no compiler on PATH", "CXX names a missing file"])
def test_compile_without_a_compiler(tmp_path, how):
    if how == "no compiler on PATH":
        bin_dir = tmp_path / "bin"  # only python: no g++, c++, cc or clang to find
        bin_dir.mkdir()
        os.symlink(sys.executable, bin_dir / "python")
        env = subprocess_env(PATH=bin_dir)
        env.pop("CXX", None)
    else:
        env = subprocess_env(CXX=tmp_path / "no-such-g++")
    args = ["train", *smoke_args(tmp_path / "run", **{"model.compile": "true"})]
    proc = subprocess.run(distrain_cmd(args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert_user_error(proc, "train", "'model.compile=true' needs a C++ compiler", "apt install g++",
                      "model.compile=false")
    assert not (tmp_path / "run" / "checkpoints").exists()
