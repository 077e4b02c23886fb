"""Downstream tasks of every edit through lm-evaluation-harness (the weight-pruning paper's Table 4).

``memctl downstream`` loads the model once and, for each edit of its job in turn, applies the edit's
delta to the loaded model (:func:`memctl.edits.applied`: masks, replaced weights or a soft prompt;
restored afterwards, no edited copy on disk), wraps the patched model in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` on the configured tasks. One row per (edit, task, metric) goes to the
job's parquet. ``memctl downstream-report`` pivots the chosen metric into the paper's table: one row
per edit, one column per task, and their mean (``Avg``).

Tasks are lm-eval task names (``arc_easy``, ``boolq`` ...; lm-eval fetches their data from the hub
the first time) or local tasks: YAML files in ``downstream.include_path`` whose data are local
files (``dataset_path: json`` with ``data_files``), which run without network.

``lm-eval`` is an optional dependency (``pip install 'memctl[downstream]'``); the stage's jobs
exist only when ``downstream.tasks`` lists a task.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memctl.runner import count_tokens, load, model_args, model_name, stage

log = logging.getLogger("memctl.downstream")

#: (column, header) of Table 4's lead columns; task columns and ``Avg`` follow.
LEAD = [("method", "Method"), ("edit", "Edit")]


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # an optional extra
        raise FileNotFoundError(
            "downstream tasks need the lm-eval package: pip install 'memctl[downstream]' (or pip install lm-eval)"
        ) from err
    _env_info_once()
    return lm_eval, HFLM, TaskManager


def _env_info_once() -> None:
    """lm-eval's ``simple_evaluate`` adds the environment to every result it returns, through
    torch's ``collect_env``, which runs ``pip list``, ``nvidia-smi`` and others as subprocesses: ~1 s
    on a CPU for each (edit, task list) evaluated. The environment does not change within a job, so
    it is collected for the first evaluation and copied into the later ones."""
    from lm_eval import evaluator

    if getattr(evaluator.add_env_info, "memctl_once", False):
        return
    collect, collected = evaluator.add_env_info, {}

    def add_env_info(storage: dict) -> None:
        if not collected:
            collect(collected)
        storage.update(collected)

    add_env_info.memctl_once = True
    evaluator.add_env_info = add_env_info


def task_manager(include_path: str | None, tasks: Sequence[str] = ()):
    """lm-eval's task index, with the local task directory when one is given (checked first).

    When every task in ``tasks`` is in the local directory, the index of lm-eval's own ~15,000
    task files is not built: it takes ~30 s per job on a CPU and a local task shadows a
    built-in one of the same name either way."""
    _, _, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"downstream.include_path: {include_path} is not a directory of task YAML files")
    if include_path and tasks:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Every task name known to lm-eval (or the local directory), before any model is loaded."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise FileNotFoundError(f"downstream.tasks: unknown lm-eval task(s) {unknown}; local tasks need "
                                f"downstream.include_path (a directory of task YAML files)")


def evaluate_tasks(model, tokenizer, manager, settings: Mapping[str, Any], prompt_length: int = 0) -> list[dict]:
    """Run the tasks on ``model`` as it is now (edited or not): one dict per (task, metric)."""
    lm_eval, HFLM, _ = _lm_eval()
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(settings["batch_size"]), device=device)
    if prompt_length:  # a soft prompt takes positions: leave them room in the context window
        lm._max_length = lm.max_length - int(prompt_length)
    result = lm_eval.simple_evaluate(
        model=lm, tasks=list(settings["tasks"]), task_manager=manager, num_fewshot=settings["num_fewshot"],
        limit=settings["limit"], log_samples=False, bootstrap_iters=int(settings["bootstrap_iters"]),
        random_seed=int(settings["seed"]), numpy_random_seed=int(settings["seed"]),
        torch_random_seed=int(settings["seed"]), fewshot_random_seed=int(settings["seed"]),
    )
    rows = []
    for task, values in result["results"].items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                         "n_samples": int((result.get("n-samples") or {}).get(task, {}).get("effective", 0)),
                         "num_fewshot": (result.get("n-shot") or {}).get(task)})
    return rows


def table4(results, metric: str, tasks: Sequence[str]):
    """The paper's Table 4: one row per edit (the masks table's row order, then ``results`` order),
    ``metric`` per task, ``Avg``.

    A task without ``metric`` fails naming the metrics it has."""
    import pandas as pd

    missing = [t for t in tasks if not ((results["task"] == t) & (results["metric"] == metric)).any()]
    if missing:
        have = sorted(set(results.loc[results["task"] == missing[0], "metric"]))
        raise ValueError(f"downstream.metric: task {missing[0]!r} has no {metric!r} (it has {have})")
    from memctl.masks.report import row_order

    rows = []
    for edit, group in results.groupby("edit", sort=False):
        row = {"method": group["method"].iloc[0], "edit": edit}
        for task in tasks:
            row[task] = float(group.loc[(group["task"] == task) & (group["metric"] == metric), "value"].iloc[0])
        row["Avg"] = float(sum(row[t] for t in tasks) / len(tasks))
        rows.append(row)
    rank = {label: i for i, label in enumerate(row_order())}  # the masks table's row order, then the rest
    rows.sort(key=lambda r: rank.get(r["method"], len(rank)))
    return pd.DataFrame(rows)


def markdown(df, tasks: Sequence[str], metric: str, settings: Mapping[str, Any]) -> str:
    from memctl.report import md_cell

    cols = [*LEAD, *((t, t) for t in tasks), ("Avg", "Avg")]
    lines = [f"## Downstream tasks ({metric}; lm-evaluation-harness, {settings['num_fewshot']}-shot"
             + (f", first {settings['limit']} documents per task" if settings.get("limit") else "") + ")", "",
             "| " + " | ".join(md_cell(h) for _, h in cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for rec in df.to_dict("records"):
        cells = [md_cell(rec["method"]), md_cell(rec["edit"]), *(f"{rec[c]:.3f}" for c, _ in cols[2:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ commands


def cmd_downstream(args) -> None:
    import pandas as pd

    from memctl.config import parse_settings, validate_section
    from memctl.edits import applied, load_delta
    from memctl.store import write_parquet

    settings = validate_section("downstream", parse_settings(args.settings))
    if not settings["tasks"]:
        raise FileNotFoundError("downstream.tasks is empty: name at least one lm-eval task")
    try:
        edits = json.loads(args.edits)
    except json.JSONDecodeError as err:
        raise FileNotFoundError(f"--edits: not JSON ({err})") from err
    edits = edits if isinstance(edits, list) else []
    if not edits or any(not isinstance(e, Mapping) or "edit" not in e for e in edits):
        raise FileNotFoundError("--edits: expected a JSON list of {edit, label, delta} objects")
    deltas = {e["edit"]: e.get("delta") for e in edits}
    for edit, path in deltas.items():
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"edit {edit}: delta not found: {path}")
    manager = task_manager(settings.get("include_path"), settings.get("tasks") or ())
    check_tasks(manager, settings["tasks"])
    with stage("downstream", {"downstream": settings, "model": parse_settings(args.model_settings), "edits": edits},
               {"model": args.model, **{f"delta[{e}]": p for e, p in deltas.items() if p}},
               outputs=[args.out]) as prov:
        model, tokenizer = load(args, prov)
        rows, costs = [], {}
        for entry in edits:
            delta = load_delta(entry["delta"]) if entry.get("delta") else None
            prompt = 0 if delta is None or delta.prompt is None else int(delta.prompt.shape[0])
            with applied(model, delta) as edited, count_tokens(edited) as cost:
                found = evaluate_tasks(edited, tokenizer, manager, settings, prompt)
            costs[entry["edit"]] = cost["tokens"]
            log.info("%s: %s", entry["edit"], {f"{r['task']}/{r['metric']}": round(r["value"], 4) for r in found})
            rows += [{"model": model_name(args), "edit": entry["edit"], "method": entry.get("label") or entry["edit"],
                      **r} for r in found]
        prov.extra["cost"] = {"tokens_processed": costs}
        write_parquet(pd.DataFrame(rows), args.out, provenance=prov)


def cmd_downstream_report(args) -> None:
    import pandas as pd

    from memctl.config import parse_settings, validate_section
    from memctl.report import markdown_html
    from memctl.store import write_parquet, write_text

    settings = validate_section("downstream", parse_settings(args.settings))
    out = Path(args.out_dir)
    with stage("downstream_report", {"downstream": settings},
               {f"results[{i}]": r for i, r in enumerate(args.results)}, outputs=[out]) as prov:
        results = pd.concat([pd.read_parquet(r) for r in args.results], ignore_index=True)
        if results.empty:
            raise ValueError(f"{args.results[0]}: no downstream results")
        df = table4(results, settings["metric"], settings["tasks"])
        text = markdown(df, settings["tasks"], settings["metric"], settings)
        write_text(out / "downstream.md", text, provenance=prov)
        write_parquet(df, out / "downstream.parquet", provenance=prov)
        write_text(out / "downstream.html", markdown_html(text, "Downstream tasks"), provenance=prov)
    print(text)


def register(subparsers) -> None:
    # imported here, not at the top: register() shapes no output, so it stays out of the stages' code hash
    # (memctl.stages.code_hash hashes the entry module's top-level imports and assignments)
    from memctl.arguments import OUT_DIR, arg, command, out_arg, settings_arg

    command(subparsers, "downstream", cmd_downstream, "lm-evaluation-harness tasks of one or more edits of one model",
            model_args, arg("--edits", required=True, help="JSON list of {edit, label, delta} (delta null = unedited)"),
            settings_arg("the config's `downstream` section (JSON)"),
            out_arg("results parquet: one row per (edit, task, metric)"))

    command(subparsers, "downstream-report", cmd_downstream_report, "the downstream table (weight-pruning paper Table 4)",
            arg("--results", nargs="+", required=True, help="results parquet of every downstream job"),
            settings_arg("the config's `downstream` section (JSON)"), OUT_DIR)
