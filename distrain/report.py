"""Confusion matrices and per-class accuracy for people: a text table, a PNG (Pillow only) and JSON.

`write_confusion(dir, cm, classes)` is what `distrain eval --confusion DIR` writes::

    confusion_matrix.txt      aligned table, rows = true class, columns = predicted class, with per-class accuracy
    confusion_matrix.csv      the same counts for spreadsheets and scripts
    confusion_matrix.png      a heat map (each row coloured by its share of the row), counts in the cells
    per_class_accuracy.json   {"accuracy", "samples", "classes", "per_class_accuracy": {class: fraction or null},
                               "per_class": [{"class", "index", "accuracy", "correct", "total"}, ...],
                               "confusion_matrix": [[...]]}

`render_confusion(cm, classes)` returns the PIL image; TensorBoard shows the same picture at every evaluation.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from distrain.errors import UserError

_CORNER = "true \\ predicted"
FILES = ("confusion_matrix.txt", "confusion_matrix.csv", "confusion_matrix.png", "per_class_accuracy.json")


def _as_array(cm) -> np.ndarray:
    if hasattr(cm, "detach"):
        cm = cm.detach().cpu().numpy()
    a = np.asarray(cm).astype(np.int64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {a.shape}")
    return a


def _class_names(classes: Optional[Sequence[str]], n: int) -> list[str]:
    names = [str(c) for c in (classes or [])]
    if len(names) != n:
        names = [str(i) for i in range(n)]
    return names


def per_class(cm, classes: Optional[Sequence[str]] = None) -> list[dict]:
    """One record per class: name, index, accuracy (None when the class has no images), correct, total."""
    a = _as_array(cm)
    names = _class_names(classes, a.shape[0])
    out = []
    for i, name in enumerate(names):
        total, correct = int(a[i].sum()), int(a[i, i])
        out.append({"class": name, "index": i, "accuracy": correct / total if total else None,
                    "correct": correct, "total": total})
    return out


def confusion_text(cm, classes: Optional[Sequence[str]] = None) -> str:
    """An aligned table: rows are true classes, columns predicted classes, then each row's accuracy.

    Columns are headed by class names when they are short, else by class index (rows show both).
    """
    a = _as_array(cm)
    names = _class_names(classes, a.shape[0])
    n_total = int(a.sum())
    acc = a.trace() / n_total if n_total else float("nan")
    digits = max([len(str(int(v))) for v in a.flat] + [3])
    by_name = max(len(c) for c in names) <= max(digits, 5)
    heads = names if by_name else [str(i) for i in range(len(names))]
    rows = names if by_name else [f"{i:>{len(str(len(names) - 1))}} {c}" for i, c in enumerate(names)]
    cell_w = max([digits] + [len(h) for h in heads])
    label_w = max([len(_CORNER)] + [len(r) for r in rows])
    head = f"{_CORNER:<{label_w}}  " + "  ".join(f"{h:>{cell_w}}" for h in heads) + "   accuracy   images"
    lines = [f"confusion matrix: {n_total} images, accuracy {acc:.4f} (rows: true class, columns: predicted class)",
             "", head, "-" * len(head)]
    for label, rec, row in zip(rows, per_class(a, names), a):
        acc_s = f"{rec['accuracy']:.4f}" if rec["accuracy"] is not None else "n/a"
        lines.append(f"{label:<{label_w}}  " + "  ".join(f"{int(v):>{cell_w}}" for v in row)
                     + f"   {acc_s:>8}   {rec['total']:>6}")
    return "\n".join(lines) + "\n"


# -- the picture --------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
    except TypeError:  # pragma: no cover - very old Pillow
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _shorten(name: str, limit: int = 14) -> str:
    """Long names keep their start and end (class_with_long_name_12 -> class_~name_12)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "~" + name[-(limit - 1 - head):]


def _colour(frac: float) -> tuple[int, int, int]:
    """White to dark blue."""
    frac = min(max(frac, 0.0), 1.0)
    lo, hi = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(v) for v in lo + (hi - lo) * frac)


def render_confusion(cm, classes: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """A PIL RGB image of the matrix: cells coloured by their share of the true class's images."""
    from PIL import Image, ImageDraw

    a = _as_array(cm)
    n = a.shape[0]
    names = [_shorten(c) for c in _class_names(classes, n)]
    cell = int(min(48, max(12, 720 // max(n, 1))))
    font = _font(max(8, min(14, cell // 3 + 2)))
    label_font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, c, label_font)[0] for c in names) + 10
    text_h = _text_size(probe, "Ag", label_font)[1]
    n_total = int(a.sum())
    if title is None:
        acc = a.trace() / n_total if n_total else float("nan")
        title = f"accuracy {acc:.4f} on {n_total} images"
    title_h = text_h + 12
    top = title_h + label_w + text_h + 8  # title, rotated column labels, "predicted"
    left = text_h + 8 + label_w  # "true" rotated, row labels
    width = max(left + n * cell + 10, _text_size(probe, title, label_font)[0] + 20)
    height = top + n * cell + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 6), title, fill="black", font=label_font)

    # Column labels (predicted class), rotated to read upwards.
    cols = Image.new("RGB", (label_w, n * cell), "white")
    cd = ImageDraw.Draw(cols)
    for j, c in enumerate(names):
        th = _text_size(cd, c, label_font)[1]
        cd.text((6, j * cell + (cell - th) // 2 - 1), c, fill="black", font=label_font)
    img.paste(cols.rotate(90, expand=True), (left, top - label_w))
    w, _ = _text_size(draw, "predicted", label_font)
    draw.text((left + (n * cell - w) // 2, title_h), "predicted", fill="black", font=label_font)
    # Row labels (true class) and the rotated axis name.
    for i, c in enumerate(names):
        tw, th = _text_size(draw, c, label_font)
        draw.text((left - tw - 6, top + i * cell + (cell - th) // 2 - 1), c, fill="black", font=label_font)
    tw, th = _text_size(draw, "true", label_font)
    axis = Image.new("RGB", (tw + 4, th + 6), "white")
    ImageDraw.Draw(axis).text((2, 0), "true", fill="black", font=label_font)
    axis = axis.rotate(90, expand=True)
    img.paste(axis, (4, top + (n * cell - axis.height) // 2))

    totals = a.sum(1)
    for i in range(n):
        for j in range(n):
            frac = a[i, j] / totals[i] if totals[i] else 0.0
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(frac), outline=(220, 220, 220))
            if cell >= 22 and a[i, j]:
                s = str(int(a[i, j]))
                tw, th = _text_size(draw, s, font)
                if tw < cell - 2:
                    ink = "white" if frac > 0.5 else "black"
                    draw.text((x0 + (cell - tw) // 2, y0 + (cell - th) // 2 - 1), s, fill=ink, font=font)
            if i == j:
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(200, 60, 40))
    return img


def confusion_png(cm, classes: Optional[Sequence[str]] = None, title: Optional[str] = None) -> bytes:
    buf = io.BytesIO()
    render_confusion(cm, classes, title).save(buf, format="PNG")
    return buf.getvalue()


# -- files ----------------------------------------------------------------------------------------------

def prepare_dir(directory: Path, what: str = "--confusion") -> Path:
    """Create ``directory`` (and parents) and check it is writable; UserError naming it otherwise."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".distrain-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} '{d}': cannot create or write this directory ({e.strerror or e}); "
                        f"give a writable directory path") from None
    return d


def write_confusion(directory: Path, cm, classes: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Write the confusion matrix and per-class accuracy into ``directory``; returns the paths written."""
    a = _as_array(cm)
    names = _class_names(classes, a.shape[0])
    d = prepare_dir(directory)
    n_total = int(a.sum())
    records = per_class(a, names)
    summary = {
        "accuracy": a.trace() / n_total if n_total else None,
        "samples": n_total,
        "classes": names,
        "per_class_accuracy": {r["class"]: r["accuracy"] for r in records},
        "per_class": records,
        "confusion_matrix": a.tolist(),
        "layout": "confusion_matrix[true][predicted]",
    }
    paths = {name: d / name for name in FILES}
    try:
        paths["confusion_matrix.txt"].write_text(confusion_text(a, names))
        with open(paths["confusion_matrix.csv"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([_CORNER, *names])
            for name, row in zip(names, a):
                w.writerow([name, *[int(v) for v in row]])
        paths["confusion_matrix.png"].write_bytes(confusion_png(a, names))
        paths["per_class_accuracy.json"].write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"--confusion '{d}': cannot write {e.filename or 'the report'} ({e.strerror or e})") from None
    return paths
