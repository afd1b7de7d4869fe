"""``stepback score``: the official LaMP metrics of a predictions file against a golds file.

Both files use the official outputs format ``{"task": "LaMP_N", "golds": [{"id", "output"}]}`` (a run writes its
predictions in that format under ``predictions/<mode>.json``). As in the official script, the two files must hold
the same ids, and predictions are taken as they are (stripped): a classification answer must be exactly a label.
The official files name both LaMP_2 variants "LaMP_2"; the label set is then chosen from the golds (movie tags or
news categories) unless ``--task`` says which. The task is checked before anything is scored: a file that names
another task than ``--task`` (or than the other file), or a gold that is not an answer of the task (a title given
to a rating task, a word that is not one of its labels), is a one-line error, not a metric of the wrong task.
"""

from __future__ import annotations

import json
from typing import Any

from stepback_ray.errors import InputError
from stepback_ray.evaluation.metrics import aggregate
from stepback_ray.storage import read_bytes
from stepback_ray.tasks import MOVIE_TAGS, NEWS_CATEGORIES, TaskSpec, get_task, same_task


def _load_outputs(uri: str) -> tuple[str | None, dict[str, str]]:
    raw = read_bytes(uri)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(uri, f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise InputError(
            uri, 'expected the LaMP outputs format {"task": ..., "golds": [{"id", "output"}]}', field="golds"
        )
    out: dict[str, str] = {}
    for n, g in enumerate(data["golds"]):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise InputError(uri, "expected an object with 'id' and 'output'", record=f"golds[{n}]")
        gid = str(g["id"])
        if gid in out:
            raise InputError(uri, "duplicate id", record=repr(gid), field="id")
        out[gid] = str(g["output"])
    task = data.get("task")
    return (str(task) if task is not None else None), out


def _resolve_task(name: str | None, golds: dict[str, str], source: str) -> str:
    if name is None:
        raise InputError(source, "the file names no task; pass --task", field="task")
    name = name.replace("-", "_")
    if name == "LaMP_2":
        values = {v.strip() for v in golds.values()}
        if values <= set(NEWS_CATEGORIES) and not values <= set(MOVIE_TAGS):
            return "LaMP_2_news"
    return get_task(name).name


def _check_task(spec: TaskSpec, uri: str, file_task: str | None) -> None:
    """A file that names a task must name ``spec``'s (LaMP_2 stands for both label sets)."""
    if file_task is not None and not same_task(file_task, spec.name):
        raise InputError(uri, f"the file is for task {file_task!r}, not {spec.name!r}", field="task")


def _check_golds(spec: TaskSpec, uri: str, golds: dict[str, str]) -> None:
    """Every gold must be an answer of the task, or its metric would score the wrong thing (a title as a label
    is never right, a title as a rating does not convert)."""
    for gid, gold in golds.items():
        g = gold.strip()
        problem = spec.gold_problem(g)
        if problem is None and spec.metric == "accuracy_f1" and g not in spec.labels:
            problem = f"not a {spec.name} label: {g[:40]!r}"
        if problem:
            raise InputError(uri, f"{problem}; are these {spec.name} golds?", record=repr(gid), field="output")


def score_files(pred_uri: str, gold_uri: str, task: str | None = None) -> dict[str, Any]:
    pred_task, preds = _load_outputs(pred_uri)
    gold_task, golds = _load_outputs(gold_uri)
    spec = get_task(task) if task else get_task(_resolve_task(gold_task or pred_task, golds, gold_uri))
    _check_task(spec, gold_uri, gold_task)
    _check_task(spec, pred_uri, pred_task)
    _check_golds(spec, gold_uri, golds)
    missing, extra = set(golds) - set(preds), set(preds) - set(golds)
    if missing or extra:
        example = sorted(missing or extra)[0]
        raise InputError(
            pred_uri,
            f"prediction ids do not match the golds ({len(missing)} missing, {len(extra)} extra, e.g. {example!r})",
            field="id",
        )
    ids = sorted(golds)
    return aggregate(spec, [preds[i].strip() for i in ids], [golds[i].strip() for i in ids])
