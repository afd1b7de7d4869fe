"""The results page, ``docs/results.md``, generated from the benchmarks' records in ``docs/results/``.

    python -m benchmarks.results_page --write     # regenerate the page
    python -m benchmarks.results_page --check     # exit 1 if the page is not what the records give

Each benchmark writes its records (``benchmarks.benchdoc.publish``) and this module is the only writer of the
page, so the page shows each benchmark's current figure with its date, machine and command, and nothing that no
record holds. What was tried and not kept is in ``docs/experiments.md``, written by hand. A test holds the page to
the records (``tests/unit/test_results_page.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import results_tables as tables
from benchmarks.benchdoc import RESULTS

PAGE = RESULTS.parent / "results.md"

DRILL_ORDER = [
    "worker-kill",
    "driver-kill",
    "same-run-twice",
    "node-loss",
    "s3-faults",
    "engine-error",
    "engine-dead",
    "engine-hang",
    "engine-dead-for-good",
    "error-budget",
    "store-race",
    "malformed-input",
]

QUALITY_MODES = [
    ("none", "no personalization"),
    ("rag", "retrieval baseline"),
    ("profile+rag", "Step-Back Profiling: profile and retrieved items"),
    ("random-profile", "control: another user's profile and items"),
]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _records(folder: Path) -> list[dict]:
    return [_load(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _by_date(records: list[dict]) -> list[dict]:
    """Newest first (the name breaks ties, so the page does not depend on the file system's order)."""
    return sorted(records, key=lambda r: (r["date"], r.get("name", "")), reverse=True)


# ---------------------------------------------------------------------------------------------- quality


def _mean_ci(per_query: dict) -> str:
    from benchmarks.bench_quality import _mean_ci

    m, lo, hi = _mean_ci([v[0] for v in per_query.values()])
    return f"{m:.4f} [{lo:.4f}, {hi:.4f}]"


def _paired(a: dict, b: dict) -> str:
    from benchmarks.bench_quality import paired

    d = paired({q: v[0] for q, v in a.items()}, {q: v[0] for q, v in b.items()})
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def seeds_table(seeds: dict, runs: list[dict]) -> list[str]:
    """The paper's own LaMP_5 figures beside ours on the same modes, with our intervals and paired differences."""
    cols = [r for r in runs if r["set"] == "lamp5_arxiv"]
    fig = seeds["figures"]
    lines = [
        f"LaMP_5 (paper titles), ROUGE-1. The paper: {seeds['paper']}, {seeds['model']}, {seeds['source']}. Ours: "
        "the mean over the same queries with a 95 % percentile bootstrap interval; differences are paired over "
        "the same queries (2000 resamples).",
        "",
        f"| mode | the paper ({seeds['model']}) | "
        + " | ".join(f"{r['model']} ({r['engine']}, {r['date']})" for r in cols)
        + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for mode, label in QUALITY_MODES:
        paper = f"{fig[mode]:.3f}" if mode in fig else "-"
        ours = [_mean_ci(r["scores"][mode]) if mode in r["scores"] else "-" for r in cols]
        lines.append(f"| `{mode}` ({label}) | {paper} | " + " | ".join(ours) + " |")
    for a, b in [("profile+rag", "rag"), ("profile+rag", "none"), ("profile+rag", "random-profile")]:
        paper = f"{fig[a] - fig[b]:+.3f}" if a in fig and b in fig else "-"
        ours = [_paired(r["scores"][a], r["scores"][b]) if {a, b} <= set(r["scores"]) else "-" for r in cols]
        lines.append(f"| `{a} - {b}` | {paper} | " + " | ".join(ours) + " |")
    return lines + ["", seeds["ablation"], "", seeds["pplug"], ""]


def quality_section(root: Path) -> list[str]:
    from benchmarks.bench_quality import CANDIDATES_NOTE, SETS, candidates_of, set_markdown

    models = sorted(p for p in (root / "quality").iterdir() if p.is_dir()) if (root / "quality").is_dir() else []
    per_model = {m.name: sorted(_records(m), key=lambda r: list(SETS).index(r["set"])) for m in models}
    lines = ["## Quality", ""]
    seeds = root / "seeds" / "step-back-profiling.json"
    if seeds.exists():
        lines += ["### Beside the paper's own figures", ""]
        lines += seeds_table(_load(seeds), [r for runs in per_model.values() for r in runs])
    for name, runs in per_model.items():
        if not runs:
            continue
        note = f" {CANDIDATES_NOTE}" if any(candidates_of(r) > 1 for r in runs) else ""
        lines += [
            f"### `{runs[0]['model']}`",
            "",
            f"Machine: {runs[0]['machine']}. Each set says how its answers were decoded and by which engine. ROUGE "
            "F-measure, the mean over queries with a percentile bootstrap 95 % interval (2000 resamples); "
            f"differences paired over the same queries.{note} Per-query scores: `docs/results/quality/{name}/`.",
            "",
        ]
        for r in runs:
            lines += set_markdown(r)
    return lines


# ---------------------------------------------------------------------------------------------- the page


def engines_section(root: Path) -> list[str]:
    lines = [
        "## Engines",
        "",
        "`python -m benchmarks.bench_engines`: the same prompts through the pipeline's engine stage, the raw engine "
        "and a one-prompt loop. Tokens sent are prompt and generated tokens; tokens computed are tokens sent less "
        "the prompt tokens the engine's prefix cache served. Computed tokens per second are held to the limit of "
        "the machine measured in the same run; a record from before the engines' cached tokens were counted says "
        "so.",
        "",
    ]
    for r in _by_date(
        [{**rec, "name": p.stem} for p in sorted((root / "engines").glob("*.json")) for rec in [_load(p)]]
    ):
        alternated = "rounds" in r
        title = "engines alternated in one process" if alternated else "pipeline, raw engine and loop"
        lines += [f"### {r['name']} ({r['date']}): {title}", ""]
        lines += tables.alternated_table(r) if alternated else tables.engines_table(r)
    return lines


def demo_section(root: Path) -> list[str]:
    series = {}
    for folder in sorted(root.glob("demo*")):
        about = folder / "series.json"
        if folder.is_dir() and about.exists():
            runs = []
            for p in sorted(folder.glob("*-r*.json")):
                variant, _, rnd = p.stem.rpartition("-r")
                runs.append({**_load(p), "variant": variant, "round": int(rnd)})
            series[folder.name] = {"about": _load(about), "runs": runs}
    lines = [
        "## The demo against its compute bound",
        "",
        "`python -m benchmarks.bench_demo`: each run one `stepback run jobs/demo.yaml` (Ray started, 20 users, "
        "profile and generation passes), variants alternated. The bound is the tokens a run computed (sent less "
        "those its prefix cache served) over the machine's limit (fp32 matmul peak / GFLOP per token, measured "
        "before and after every run; every run of a series held to the best); ratio = wall time / bound.",
        "",
        *tables.demo_table(series),
    ]
    profile = root / "demo-profile" / "default.json"
    if profile.exists():
        lines += ["### Where the demo's engine time goes", "", *tables.demo_profile_table(_load(profile))]
    return lines


def one(root: Path, name: str, title: str, render) -> list[str]:
    path = root / f"{name}.json"
    return [f"## {title}", "", *render(_load(path))] if path.exists() else []


def drills_section(root: Path) -> list[str]:
    records = _records(root / "drills")
    if not records:
        return []
    order = {k: i for i, k in enumerate(DRILL_ORDER)}
    records.sort(key=lambda r: order.get(r["drill"], len(order)))
    return [
        "## Fault drills",
        "",
        "`python -m benchmarks.fault_drills --write` (`--drills a,b` reruns some): the dry-run engine, each row one "
        "drill reconciled against its input.",
        "",
        *tables.drills_table(records),
    ]


def pplug_section(root: Path) -> list[str]:
    training, about = root / "pplug-lamp5" / "training.json", root / "pplug-lamp5" / "run.json"
    if not (training.exists() and about.exists()):
        return []
    return ["## Persona-Plug training", "", *tables.pplug_table(_load(training), _load(about))]


def render(root: Path = RESULTS) -> str:
    """The whole page from the records under ``root``."""
    lines = [
        "# Results",
        "",
        "<!-- Generated by `python -m benchmarks.results_page --write` from the records in docs/results/: do not "
        "edit by hand. -->",
        "",
        "The current figure of each benchmark, each with the date, machine and command that produced it. Every "
        "table is generated from the benchmark's records in `docs/results/` (each benchmark writes its own and "
        "regenerates this page). What was tried and not kept, with its numbers, is in the "
        "[experiments log](experiments.md). Timings on the 2-core development VM move by about 10 % from run to "
        "run; comparisons are made only between runs measured side by side.",
        "",
        "Commands are shown as they were run. Those of records made before 2026-12-07 end in `--write "
        "docs/benchmarks.md`: the notebook page that benchmarks then edited in place (`--section` named a part of "
        "it). Today `--write` takes no value: it keeps the record and regenerates this page.",
        "",
        *quality_section(root),
        *pplug_section(root),
        *engines_section(root),
        *one(root, "prefix/default", "Prefix reuse", tables.prefix_table),
        *demo_section(root),
        *one(root, "contention/default", "What a local Ray's own processes cost an engine", tables.contention_table),
        *one(root, "scale/default", "Scale", tables.scale_table),
        *one(root, "nightly/default", "Nightly re-profiling", tables.nightly_table),
        *drills_section(root),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write(root: Path = RESULTS, page: Path = PAGE) -> None:
    page.write_text(render(root))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the page")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page differs from what the records give")
    ap.add_argument("--results", default=str(RESULTS), help="the records' folder")
    ap.add_argument("--page", default=str(PAGE))
    args = ap.parse_args(argv)
    root, page = Path(args.results), Path(args.page)
    if args.write:
        write(root, page)
        return 0
    if not page.exists() or page.read_text() != render(root):
        print(f"{page} is not what the records give: run python -m benchmarks.results_page --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
