"""What a careless or hostile config does (issue 11: items 10-14, 17, 23, 24, the policy of 3-4).

In-process and fast: the config, YAML, eval-override, toolchain and resume-policy functions on real
files, real pipes and real optimizers. The same cases through real `distrain` processes are in
test_config_cli.py and test_resume_policy.py.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch

from distrain import resume_policy, yamlio
from distrain.config import (EVAL_KEYS, Config, all_keys, check_eval_overrides, config_from_dict,
                             expand_paths, load_config, read_run_config)
from distrain.errors import UserError, shorten, shorten_text

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
STRING_KEYS = ["output_dir", "data.root", "resume", "model.weights_path"]
FLOAT_KEYS = ["train.lr", "train.momentum", "train.weight_decay", "train.label_smoothing",
              "train.grad_clip", "train.step_gamma", "model.backbone_lr_mult"]


def get(cfg: Config, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# -- item 10: values are read by the key's declared type ------------------------------------------

@pytest.mark.parametrize("key", STRING_KEYS)
@pytest.mark.parametrize("text", ["0123", "2024_01", "1:30", "1.10", "1e3", "true", "0x1F", "07.5"])
def test_string_keys_keep_the_text_of_an_override(key, text):
    extra = ["model.name=vgg16"] if key == "model.weights_path" else []
    assert get(load_config(None, extra + [f"{key}={text}"]), key) == text


@pytest.mark.parametrize("key", STRING_KEYS)
@pytest.mark.parametrize("text", ["0123", "2024_01", "1:30", "1.10", "2024-01-31", "yes"])
def test_string_keys_keep_the_text_in_a_yaml_file(tmp_path, key, text):
    section, _, name = key.rpartition(".")
    body = f"{section}:\n  {name}: {text}\n" if section else f"{key}: {text}\n"
    if key == "model.weights_path":
        body = f"model:\n  name: vgg16\n  weights_path: {text}\n"
    cfg = load_config(write(tmp_path, body))
    assert get(cfg, key) == text
    again = config_from_dict(yamlio.plain(yamlio.parse(cfg.to_yaml())))  # as config.yaml is read
    assert get(again, key) == text


def test_null_and_home_in_string_keys():
    assert load_config(None, ["model.weights_path=null"]).model.weights_path is None
    assert load_config(None, ["output_dir=~"]).output_dir == "~"  # a path key: home, not null
    assert "'output_dir' must be a string" in error_of(load_config, None, ["output_dir=null"])


@pytest.mark.parametrize("override, needle", [
    ("output_dir=a\nb", "must not contain control characters"),
    ("data.root=a\tb", "must not contain control characters"),
    ("train.lr.x=1", "unknown config key 'train.lr.x'; did you mean 'train.lr'?"),
    ("train.lr=0.1 # a comment", "must be a number, got '0.1 # a comment'"),
])
def test_odd_overrides(override, needle):
    assert needle in error_of(load_config, None, [override])


@pytest.mark.parametrize("text, value", [("010", 10), ("1_000", 1000), ("+5", 5), (" 7 ", 7),
                                         ("0x10", 16)])
def test_integers_are_read_as_python_reads_them(text, value):
    assert load_config(None, [f"train.epochs={text}"]).train.epochs == value


@pytest.mark.parametrize("text", ["1:30", "5.0", "1e3", "ten", "true"])
def test_integer_keys_refuse_what_is_not_an_integer(text):
    msg = error_of(load_config, None, [f"train.epochs={text}"])
    assert "'train.epochs' must be an integer" in msg


def test_numbers_in_yaml_are_read_by_type(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 010\n  lr: 1e-3\n  weight_decay: '5e-4'"))
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay) == (10, 0.001, 0.0005)
    msg = error_of(load_config, write(tmp_path, "train:\n  lr: 1:30\n"))
    assert "must be a number, got '1:30'" in msg


# -- item 11: non-finite numbers ------------------------------------------------------------------

@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e400", "nan", "NaN", "inf",
                                  "-Infinity", "1" + "0" * 400])
def test_non_finite_floats_are_refused_in_overrides(key, text):
    msg = error_of(load_config, None, [f"{key}={text}"])
    assert f"config key '{key}' must be a finite number" in msg


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", [".nan", ".Inf", "1e400", "'nan'", '"-inf"'])
def test_non_finite_floats_are_refused_in_yaml(tmp_path, key, text):
    section, name = key.split(".")
    msg = error_of(load_config, write(tmp_path, f"{section}:\n  {name}: {text}\n"))
    assert f"config key '{key}' must be a finite number" in msg and "line 2" in msg


def test_non_finite_floats_are_refused_from_a_dict():
    assert "finite" in error_of(config_from_dict, {"train": {"lr": math.inf}})


# -- item 12: train.seed has a range ---------------------------------------------------------------

def test_seed_range_is_checked_up_front():
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    for bad in (2**32, 2**64 - 1, 2**64, -1):
        msg = error_of(load_config, None, [f"train.seed={bad}"])
        assert "train.seed" in msg and ("<= 4294967295" in msg or ">= 0" in msg)


def test_every_integer_key_fits_an_int64():
    assert "<= 9223372036854775807" in error_of(load_config, None, [f"train.max_steps={2**63}"])


def test_seeded_code_takes_the_largest_seed():
    """Every user of train.seed, at the top of its range and in late epochs (2**64-1 overflowed)."""
    from distrain.data.augment import CropFlipParams
    from distrain.data.sampling import EpochPlan, derived_seed
    from distrain.data.synthetic import make_synthetic
    from distrain.seeding import seed_everything

    seed = 2**32 - 1
    for epoch in (0, 1, 999):
        plan = EpochPlan(100, 8, 2, 1, 1, seed, epoch)
        assert sorted(plan.order.tolist()) == list(range(100))
        CropFlipParams.draw(10, seed, epoch)
        seed_everything(derived_seed(seed, 1, epoch))
    make_synthetic(train=True, seed=seed, max_samples=10)


# -- item 13: bounded messages, alias bombs --------------------------------------------------------

def bomb(levels: int = 9) -> str:
    items = ["&a [x,x,x,x,x,x,x,x,x]"]
    for i in range(levels - 1):  # each level: nine aliases of the one before
        items.append(f"&{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]")
    return "train:\n  lr: [" + ", ".join(items) + "]\n"


def test_an_alias_bomb_is_refused_while_it_is_read(tmp_path):
    text = bomb()
    assert len(text) < 340
    tracemalloc.start()
    try:
        msg = error_of(load_config, write(tmp_path, text))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "expands to more than" in msg and "line 2" in msg and len(msg) < 300
    assert peak < 5 * 2**20, peak  # the 9**9-element list it stands for is never built


def test_aliases_that_stay_small_still_work(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  max_train_samples: &n 100\n  max_test_samples: *n\n"
                                      "train:\n  <<: {lr: 0.3, epochs: 4}\n  epochs: 5\n"))
    assert (cfg.data.max_test_samples, cfg.train.lr, cfg.train.epochs) == (100, 0.3, 5)


@pytest.mark.parametrize("text, needle", [
    ("a: &a [*a]\n", "refers to the collection that contains it"),
    ("train:\n  lr: " + "[" * 100 + "]" * 100 + "\n", "levels deep"),
    ("a: 1\n---\nb: 2\n", "line 2"),
])
def test_recursive_deep_and_multi_document_yaml(tmp_path, text, needle):
    assert needle in error_of(load_config, write(tmp_path, text))


@pytest.mark.parametrize("override", [
    "train.lr=" + "x" * 100_000, "train.epochs=" + "9" * 5000, "x" * 100_000 + "=1", "y" * 100_000,
    "train.lr=" + "[" * 50 + "]" * 50,
    "train.lr={" + ", ".join(f"k{i}: {i}" for i in range(500)) + "}",
])
def test_messages_stay_short_whatever_the_value(override):
    assert len(error_of(load_config, None, [override])) < 400


def test_shorten():
    assert shorten(-0.1) == "-0.1" and shorten("many") == "'many'"
    assert len(shorten("x" * 10**6, 80)) == 80 and len(shorten(10**5000)) <= 80
    nested = [1]
    for _ in range(40):
        nested = [nested] * 9
    assert len(shorten(nested)) <= 80
    cut = shorten_text("abc" * 100, 20)
    assert cut.count("...") == 1 and len(cut) == 20


def test_a_huge_file_is_refused_unread(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_bytes(b"# " + b"x" * (yamlio.MAX_BYTES + 10))
    assert "larger than" in error_of(load_config, str(p))


# -- item 14: YAML details and where -c reads from -------------------------------------------------

def test_duplicate_keys_name_the_key_and_lines(tmp_path):
    text = "train:\n  lr: 0.1\ndata:\n  name: synthetic\ntrain:\n  epochs: 3\n"
    msg = error_of(load_config, write(tmp_path, text))
    assert "key 'train' appears twice (lines 1 and 5)" in msg
    msg = error_of(load_config, write(tmp_path, "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n"))
    assert "key 'lr' appears twice (lines 2 and 4)" in msg


def test_a_dotted_key_in_yaml_says_yaml_nests_keys(tmp_path):
    msg = error_of(load_config, write(tmp_path, "train.lr: 0.1\n"))
    assert "YAML nests keys" in msg and "'train:'" in msg and "'  lr: 0.1'" in msg
    assert "did you mean" not in msg
    msg = error_of(load_config, write(tmp_path, "trian.lr: 0.1\n"))
    assert "unknown config key 'trian.lr'" in msg and "YAML nests keys" in msg


def test_config_path_kinds(tmp_path, monkeypatch):
    assert "is a directory" in error_of(load_config, str(tmp_path))
    assert "does not exist" in error_of(load_config, str(tmp_path / "nope.yaml"))
    assert "does not exist" in error_of(load_config, str(tmp_path / "c.yaml" / "x"))
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"train:\n  lr: 0.1 \xff\n")
    assert "not UTF-8" in error_of(load_config, str(p))
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "train:\n  lr: 0.125\n", "home.yaml")
    assert load_config("~/home.yaml").train.lr == 0.125


def test_a_pipe_and_stdin_are_read(monkeypatch):
    def pipe(text: str) -> int:
        r, w = os.pipe()
        os.write(w, text.encode())
        os.close(w)
        return r

    r = pipe("train:\n  lr: 0.5\n")
    try:
        assert load_config(f"/dev/fd/{r}").train.lr == 0.5  # what `-c <(...)` gives
    finally:
        os.close(r)
    with os.fdopen(pipe("train:\n  lr: 0.25\n"), "r") as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        assert load_config("-").train.lr == 0.25
    monkeypatch.setenv("WORLD_SIZE", "2")  # every rank would read it: refused, not raced
    assert "is a stream" in error_of(load_config, "-")


def test_tilde_is_expanded_in_path_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = expand_paths(load_config(None, ["output_dir=~/runs/a", "data.root=~/data", "resume=~/ck",
                                          "model.name=vgg16", "model.weights_path=~/w.pth"]))
    home = str(tmp_path)
    assert (cfg.output_dir, cfg.data.root, cfg.resume, cfg.model.weights_path) == (
        f"{home}/runs/a", f"{home}/data", f"{home}/ck", f"{home}/w.pth")
    assert expand_paths(load_config(None, ["resume=auto"])).resume == "auto"
    assert expand_paths(load_config(None, ["resume=none"])).resume == "none"


# -- item 17: a run directory's config.yaml --------------------------------------------------------

def test_read_run_config(tmp_path):
    good = tmp_path / "config.yaml"
    good.write_text(Config().to_yaml())
    assert config_from_dict(read_run_config(good)) == Config()
    for body, needle in [("- 1\n- 2\n", "must hold a mapping"), ("train: [1\n", "not valid YAML"),
                         ("train: 3\n", "'train' must be a mapping"),
                         ("data: x\ndata: y\n", "appears twice"),
                         (bomb(), "expands to more than")]:
        good.write_text(body)
        msg = error_of(read_run_config, good)
        assert f"run config '{good}'" in msg and needle in msg, msg
    good.write_bytes(b"data:\n  root: \xfe\n")
    assert "not UTF-8" in error_of(read_run_config, good)
    assert "does not exist" in error_of(read_run_config, tmp_path / "missing.yaml")


# -- item 23: distrain eval takes data-ish keys only -----------------------------------------------

def test_eval_overrides():
    check_eval_overrides(["data.root=/x", "data.max_test_samples=5", "train.batch_size=8",
                          "train.device=cpu", "train.mixed_precision=no",
                          "model.channels_last=true", "data={name: synthetic}"])
    for key in ("model.name", "train.lr", "train.epochs", "output_dir", "model.num_classes",
                "train"):
        msg = error_of(check_eval_overrides, [f"{key}=1"])
        assert f"distrain eval does not use config key '{key}'" in msg and "data.*" in msg
    msg = error_of(check_eval_overrides, ["train.bach_size=3"])
    assert "did you mean 'train.batch_size'" in msg


def test_eval_keys_are_what_eval_reads_from_the_run():
    from distrain.evaluate import _eval_config

    info = {"architecture": "cifar10_quick", "num_classes": 10, "input_size": [3, 32, 32]}
    cfg = _eval_config(Config().to_dict(), info, ["data.root=/x", "train.batch_size=7"])
    assert cfg.data.root == "/x" and cfg.train.batch_size == 7 and len(EVAL_KEYS) >= 2


# -- item 24: a compiler for torch.compile -------------------------------------------------------

@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler here")
def test_compile_toolchain_finds_the_compiler_inductor_uses():
    from distrain.toolchain import check_compile_toolchain

    assert check_compile_toolchain("cpu") == os.environ.get("CXX", "g++")


def test_compile_toolchain_messages(monkeypatch, tmp_path):
    from distrain.toolchain import check_compile_toolchain

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    msg = error_of(check_compile_toolchain, "cuda")
    assert "model.compile=true" in msg and "C compiler" in msg and "apt install gcc" in msg
    assert "point CC at it" in msg
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "tried 'gcc'" in error_of(check_compile_toolchain, "cuda")


# -- items 3 and 4: the resume policy --------------------------------------------------------------

def test_every_key_has_a_documented_rule():
    doc = resume_policy.__doc__
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Changing the config of a run you resume", 1)[1].split("\n## ", 1)[0]
    for key in all_keys():
        rule = resume_policy.rule_of(key)
        wildcard = key.split(".")[0] + ".*"
        rows = [l for l in section.splitlines() if l.startswith(f"| {rule} |")]
        items = [i for i in doc.split("\n- ") if i.startswith(f"{rule}: ")]
        for where, found in (("README", rows), ("docstring", items)):
            assert len(found) == 1, (where, rule)
            text = found[0].replace("`", "")
            named = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text) or wildcard in text
            assert named, (where, key)


def test_policy_decisions():
    old = Config().to_dict()

    def new(**over):
        cfg = load_config(None, [f"{k.replace('__', '.')}={v}" for k, v in over.items()])
        return cfg.to_dict()

    d = resume_policy.decide(old, new(train__lr=0.5, train__momentum=0.5, log__every_steps=7), True)
    assert d.reapply == ("lr", "momentum")
    assert set(d.changed) == {"train.lr", "train.momentum", "log.every_steps"}
    assert any("'train.lr' changes from 0.01 to 0.5" in w for w in d.warnings)
    assert resume_policy.decide(old, new(model__backbone_lr_mult=0.1), False).reapply == ("lr",)
    assert resume_policy.decide(old, old, True) == resume_policy.ResumeDecision()
    assert resume_policy.decide(old, new(resume="/elsewhere"), True).warnings == ()
    for key, value in [("train.optimizer", "adamw"), ("train.scheduler", "step"),
                       ("model.num_classes", 5)]:
        over = new(**{key.replace(".", "__"): value})
        assert f"'{key}'" in error_of(resume_policy.decide, old, over, False)
    for key, value in [("train.seed", 5), ("data.max_train_samples", 100),
                       ("data.augment", "false"), ("data.name", "synthetic")]:
        over = new(**{key.replace(".", "__"): value})
        msg = error_of(resume_policy.decide, old, over, True, "checkpoint 'X'")
        assert f"cannot resume checkpoint 'X': config key '{key}'" in msg
        assert "middle of an epoch" in msg
        assert "resume=none" in msg and "output_dir" in msg
        assert resume_policy.decide(old, over, False).changed == (key,)  # at an epoch boundary
    frozen = new(model__name="vgg16", model__freeze_features="true", model__unfreeze_after_epochs=3)
    later = dict(frozen, model=dict(frozen["model"], unfreeze_after_epochs=5))
    assert resume_policy.decide(frozen, later, True).changed == ("model.unfreeze_after_epochs",)
    never = dict(frozen, model=dict(frozen["model"], unfreeze_after_epochs=None))
    assert "model.unfreeze_after_epochs" in error_of(resume_policy.decide, frozen, never, False)
    missing = {k: v for k, v in old.items() if k != "log"}  # another version's: not compared
    assert resume_policy.decide(missing, new(log__every_steps=3), True).changed == ()


def test_the_first_refused_key_is_named_and_the_others_listed():
    old = Config().to_dict()
    cfg = load_config(None, ["train.optimizer=adamw", "train.scheduler=step"]).to_dict()
    msg = error_of(resume_policy.decide, old, cfg, False)
    assert "'train.optimizer'" in msg and "also refused: train.scheduler" in msg


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_apply_optimizer_hparams_after_loading_a_state(optimizer):
    """A real optimizer and schedule: the loaded state's values are replaced by this config's."""
    from distrain.models import build_model
    from distrain.optim import apply_optimizer_hparams, build_optimizer, build_scheduler, lr_factor

    def make(*over):
        cfg = load_config(None, ["train.scheduler=cosine", f"train.optimizer={optimizer}", *over])
        model = build_model("cifar10_quick", num_classes=10)
        opt = build_optimizer(model, cfg.train, cfg.model, "cpu")
        return cfg, model, opt, build_scheduler(opt, cfg.train, steps_per_epoch=10, total_steps=100)

    _, model, opt, sched = make("train.lr=0.1", "train.momentum=0.9", "train.weight_decay=0.01")
    for _ in range(7):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    cfg, _, opt2, sched2 = make("train.lr=0.02", "train.momentum=0.5", "train.weight_decay=0.001",
                                "train.nesterov=false", "model.backbone_lr_mult=0.5")
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    loaded = opt2.param_groups[0]["lr"]  # the saving run's
    assert loaded != pytest.approx(0.02 * lr_factor(7, cfg.train, 10, 100))
    apply_optimizer_hparams(opt2, sched2, cfg.train, cfg.model)
    factor = lr_factor(7, cfg.train, 10, 100)
    for g in opt2.param_groups:
        base = 0.02 * (0.5 if g["name"].startswith("backbone") else 1.0)
        assert g["lr"] == pytest.approx(base * factor) and g["initial_lr"] == pytest.approx(base)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.001)
        if optimizer == "sgd":
            assert (g["momentum"], g["nesterov"]) == (0.5, False)
    assert sched2.get_last_lr() == [g["lr"] for g in opt2.param_groups]
    sched2.step()  # and the schedule goes on from the new base
    head = [g for g in opt2.param_groups if g["name"] == "head"][0]
    assert head["lr"] == pytest.approx(0.02 * lr_factor(8, cfg.train, 10, 100))

