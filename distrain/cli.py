"""The `distrain` command: train, eval, predict, bench, runs, models.

User errors (`UserError`) end with one line on stderr and exit code 2, on every rank; anything else is a
bug and keeps its traceback (exit 1). Only results go to stdout: `--json` output, and the table or
CSV of `distrain runs`; messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from distrain import __version__
from distrain.errors import UserError


def _keys_help() -> str:
    from distrain.config import Config, all_keys

    cfg = Config().to_dict()
    lines = ["config keys (KEY=VALUE, dotted; see configs/ for recipes):"]
    for k in all_keys():
        v = cfg
        for part in k.split("."):
            v = v[part]
        lines.append(f"  {k} = {v!r}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrain", description="Train CIFAR-10 image classifiers on a CPU, GPUs or SLURM.")
    p.add_argument("--version", action="version", version=f"distrain {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a model", formatter_class=fmt, epilog=_keys_help(),
                       description="Train. `-c FILE` reads a YAML config; each KEY=VALUE overrides one dotted key after it.")
    t.add_argument("-c", "--config", metavar="FILE", help="YAML config file (e.g. configs/cifar10_quick.yaml)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, later wins")

    e = sub.add_parser("eval", help="accuracy and loss on the test split", formatter_class=fmt,
                       description="Evaluate on the test split. PATH: a run directory, a checkpoint directory or an "
                                   "exported model.safetensors. KEY=VALUE overrides the data keys of the run's config "
                                   "(e.g. data.root=...).")
    e.add_argument("--checkpoint", required=True, metavar="PATH")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--confusion", metavar="DIR", help="also write confusion_matrix.txt/.png and per-class accuracy here")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    pr = sub.add_parser("predict", help="classify image files", formatter_class=fmt,
                        description="Class and probability for each image (PNG/JPEG, any size, RGB/RGBA/grayscale) "
                                    "or each image in a directory.")
    pr.add_argument("--checkpoint", required=True, metavar="PATH")
    pr.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pr.add_argument("--topk", type=int, default=1, metavar="K", help="classes to show per image (default 1)")
    pr.add_argument("--batch-size", type=int, default=64, metavar="N")
    pr.add_argument("images", nargs="+", metavar="IMAGE")

    b = sub.add_parser("bench", help="throughput of the input pipeline and the training step", formatter_class=fmt,
                       epilog=_keys_help(), description="Measure images/s of the input pipeline and of the full training "
                                                       "step for the configured model, data, precision and world size. Writes nothing.")
    b.add_argument("-c", "--config", metavar="FILE")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.add_argument("--steps", type=int, default=30, help="optimizer steps per timed window")
    b.add_argument("--repeats", type=int, default=3,
                   help="timed windows; the training rate is their median")
    b.add_argument("--warmup", type=int, default=5, help="warm-up steps")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    _add_runs_parser(sub, fmt)
    m = sub.add_parser("models", help="list the model names model.name accepts",
                       formatter_class=fmt,
                       description="Model names with parameter counts (1000-class head), native "
                                   "input size and pretrained weights. FILTER: a substring or "
                                   "glob; timm:... lists timm's models.")
    m.add_argument("--pretrained", action="store_true", help="only models with pretrained weights")
    m.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    m.add_argument("filter", nargs="?", metavar="FILTER")
    return p


def _add_runs_parser(sub, fmt) -> None:
    r = sub.add_parser(
        "runs", help="compare run directories: a table, JSON, CSV or a plot", formatter_class=fmt,
        description="One row per run directory: model, data, world size, global batch, lr, epochs, "
                    "status (running/finished/stopped/diverged/failed), best and final accuracy, "
                    "wall time, images/s, and the config keys that differ between the runs. RUN: a "
                    "run directory, a folder of them, or a glob (quote it: 'runs/slurm-123_*').")
    r.add_argument("runs", nargs="+", metavar="RUN")
    r.add_argument("--sort", metavar="KEY", help="sort by a column (a --json key such as "
                   "best_accuracy, or a differing config key); --sort=-KEY for descending")
    r.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    r.add_argument("--csv", action="store_true", help="print the rows as CSV on stdout")
    r.add_argument("--plot", metavar="FILE.png",
                   help="also draw eval accuracy and train loss against the step into FILE.png")


def json_line(obj) -> str:
    """Strict JSON (never a bare NaN or Infinity, which JSON parsers reject): non-finite -> null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False)


def cmd_train(args) -> int:
    from distrain.config import expand_paths, load_config

    # Validated before any process group or file work.
    cfg = expand_paths(load_config(args.config, args.overrides))
    if cfg.log.experiment is None:  # MLflow experiment / W&B project: named after the recipe
        cfg.log.experiment = Path(args.config).stem if args.config else "distrain"
    from distrain import signals
    from distrain.train import run_training

    stop = signals.StopSignals().install()
    try:
        return run_training(cfg, signals=stop)
    finally:
        stop.uninstall()


def cmd_eval(args) -> int:
    from distrain.evaluate import run_eval

    result = run_eval(args.checkpoint, args.overrides, confusion_dir=args.confusion)
    if result is None:  # not the main process
        return 0
    if not math.isfinite(result["loss"]):
        raise UserError(f"the model '{result['checkpoint']}' gives non-finite outputs (loss "
                        f"{result['loss']}): its weights overflow; pick an earlier checkpoint")
    if args.json:
        print(json_line({k: v for k, v in result.items() if k != "confusion"}))
    else:
        print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  on {result['samples']} images "
              f"({result['dataset']})", file=sys.stderr)
    if args.confusion:
        print(f"confusion matrix (confusion_matrix.txt, .csv, .png) and per_class_accuracy.json written to "
              f"{args.confusion}", file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    from distrain.predict import predict

    if args.topk < 1:
        raise UserError("--topk must be >= 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    results = predict(args.checkpoint, args.images, topk=args.topk, batch_size=args.batch_size)
    if args.json:
        print(json_line({"predictions": results}))
    else:
        for r in results:
            tops = ", ".join(f"{c['class']} {c['probability']:.3f}" for c in r["topk"])
            print(f"{r['path']}: {tops}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from distrain.bench import run_bench

    return run_bench(args)


def cmd_runs(args) -> int:
    from distrain.runs import main as runs_main

    return runs_main(args.runs, sort=args.sort, as_json=args.json, as_csv=args.csv,
                     plot_path=args.plot)
def cmd_models(args) -> int:
    from distrain.model_catalog import catalog, format_table, row

    specs = catalog(args.filter, pretrained_only=args.pretrained)
    if not specs:
        import difflib

        from distrain.model_specs import model_names

        close = difflib.get_close_matches(args.filter or "", model_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"no model matches '{args.filter}'{hint} "
                        f"(`distrain models` lists them all)")
    if args.json:
        print(json.dumps({"models": [row(s) for s in specs]}))
    else:
        print(format_table(specs), file=sys.stderr)
    return 0


def _rank_prefix() -> str:
    rank = os.environ.get("RANK")
    world = os.environ.get("WORLD_SIZE")
    return f"[rank {rank}] " if rank is not None and world not in (None, "1") else ""


def _report_to_launcher(msg: str) -> None:
    """Under torchrun / `accelerate launch`, after this rank printed its error: put the message in the
    launcher's failure report, wait (bounded) until every rank has printed its own, then exit 2 at once.

    The launcher terminates the remaining workers as soon as one exits; waiting keeps it from cutting off
    a rank's message, and exiting together (SIGTERM while waiting also means "exit 2") keeps every
    worker's exit code 2 in its report instead of -15.
    """
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return
    import signal
    import time

    def _exit_2(*_):
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(2)

    signal.signal(signal.SIGTERM, _exit_2)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:  # the format torch.distributed.elastic's @record writes; its report shows "traceback : <msg>"
            with open(error_file, "w") as f:
                json.dump({"message": {"message": msg, "extraInfo": {"py_callstack": msg,
                                                                     "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    from distrain.distributed import wait_for_ranks_to_report

    wait_for_ranks_to_report()
    _exit_2()


def main(argv: Optional[list[str]] = None) -> int:
    from distrain.allocator import configure_allocator

    configure_allocator()  # every rank, before anything large is allocated (see distrain/allocator.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "bench": cmd_bench,
                "runs": cmd_runs, "models": cmd_models}
    try:
        code = handlers[args.command](args)
    except UserError as e:
        msg = f"distrain {args.command}: error: {e}"
        sys.stdout.flush()
        # One write of the whole line: ranks share the launcher's stderr, and print() writes the text and its
        # newline separately (unbuffered under PYTHONUNBUFFERED), so lines of two ranks could interleave.
        sys.stderr.write(_rank_prefix() + msg + "\n")
        sys.stderr.flush()
        _report_to_launcher(msg)
        return 2
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}distrain {args.command}: interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and argv is None:
        # A finished multi-process run leaves now, skipping interpreter teardown: gloo's worker threads can
        # abort the process while Python finalises (SIGABRT, "terminate called without an active exception";
        # pytorch#190489), which would turn a completed run into a failed one. Everything is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
