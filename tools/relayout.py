#!/usr/bin/env python3
"""Issue 18, part 3: lay framework/ (cifarx) out as packages that show the architecture.

    python tools/relayout.py REPO             # a clean git checkout of cifarx; stages the result
    python tools/relayout.py REPO --dry-run   # print the plan, change nothing

What it does, on whatever the modules contain when it runs:

- moves each module with ``git mv`` (MOVES: old module -> new module);
- splits the big ones by their top-level names (SPLITS: new module -> the names it takes). A name
  the table does not list (one added since) goes to the part whose names use it (of several,
  the one the others import from already, else the split's default), else beside the name
  above it in the file; never where it would make the parts import one another in a circle.
  Each part gets the old module's imports, keeps those it uses, and imports what it uses from
  its sibling parts (a name tests replace with monkeypatch is read through its module);
- rewrites every import and dotted reference to the new paths in framework/, plugins/, tests/,
  bench/, examples/, docs/, tools/ (imports, ``monkeypatch.setattr(module, "name")`` targets,
  ``"cifarx.x.y"`` strings, ``:mod:`` and ``::: cifarx.x`` references; in markdown only what
  would no longer resolve), and pyproject's package list and package data;
- keeps the old module paths importable (``cifarx.trials`` is ``cifarx.studies.trials``, the same
  module) through one alias table, framework/_moved.py, and writes tests/test_layout.py.

It refuses to run on a tree already laid out (or with uncommitted changes to tracked files) and
prints what it did. Standard library only; it never commits.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

# --- the tables -------------------------------------------------------------------------------

KEEP = ("__init__", "__main__", "errors", "figures", "testing")  # stay in framework/

MOVES = {  # old module -> new module (under cifarx), moved whole
    "hookspecs": "plugin_api.hookspecs",
    "plugin_types": "plugin_api.types",
    "options": "plugin_api.options",
    "registry": "plugin_api.registry",
    "config": "training.config",
    "data": "training.data",
    "loop": "training.loop",
    "optim": "training.optim",
    "model": "training.model",
    "validation": "training.validation",
    "inference": "inference.predict",
    "evaluation": "inference.report",
    "adversarial": "inference.adversarial",
    "transfer": "inference.transfer",
    "analysis": "inference.analysis",
    "store": "tracking.store",
    "weights": "tracking.weights",
    "trials": "studies.trials",
    "stats": "studies.stats",
    "compare": "studies.compare",
    "console": "cli.console",
    "cli_report": "cli.report",
    # the reporting layer (issue 20's `cifarx report` / `cifarx reproduce`), where present
    "report": "reports.report",
    "report_data": "reports.data",
    "assignment_report": "reports.assignment",
    "reproduce": "reports.reproduce",
}

# Folders of data files that move with a module (``Path(__file__).parent / "templates"``):
# folder under framework/ -> (its new place, the module that reads it)
DATA_MOVES = {"templates": ("reports/templates", "report")}


@dataclass
class Split:
    parts: dict[str, list[str]]  # new module -> the top-level names it takes, in order
    default: str  # gets every name the table does not place
    docs: dict[str, str]  # new module -> its docstring (absent: the old module's)
    heir: str  # the part `git mv` moves the old file to (history follows the most lines)
    package_doc: bool = False  # the old docstring goes to the package's __init__


SPLITS = {
    "tracking": Split(
        parts={
            "tracking.common": [
                "DEFAULT_TRACKING_URI", "DEFAULT_EXPERIMENT", "EXPERIMENT_KIND", "MODEL_TRAINING",
                "NOTE", "VIEW_TAG", "tracking_uri", "quiet_mlflow", "ui_page", "runs_view",
                "data_digest", "git_commit"],
            "tracking.lifecycle": ["_open", "_create_experiment", "start_run", "ERROR_TAG",
                                   "ERROR_FILE", "record_error"],
            "tracking.models": ["requirements_for", "_distributions", "describe_version",
                                "load_model", "check_run_model", "source_run_id"],
            "tracking.run": ["Point", "MODEL_ARTIFACT", "as_logged", "MetricLog", "Run",
                             "DATASET_ATTEMPTS", "is_duplicate"],
        },
        default="tracking.common",
        heir="tracking.run",
        package_doc=True,
        docs={
            "tracking.common": (
                "What every part of tracking shares: where runs go (:func:`tracking_uri`, the "
                "default\nexperiment), MLflow kept quiet, the tags and links the MLflow UI "
                "reads, and what a run\nrecords about where it came from (data digest, git "
                "commit)."),
            "tracking.lifecycle": (
                "A run's lifecycle: :func:`start_run` opens (or resumes) a run in its "
                "experiment and\nends it FINISHED, FAILED or KILLED."),
            "tracking.models": (
                "Models in and out of MLflow: the requirements logged with a model, its "
                "registered\nversion's description, :func:`load_model` (weights first; a "
                "pickle only when trusted)\nand the checks of a ``runs:/`` model URI."),
            "tracking.run": (
                "A run being logged: :class:`Run` (params, tags, metrics buffered by a\n"
                ":class:`MetricLog`, artifacts, figures, the model)."),
        }),
    "spool": Split(
        parts={
            "tracking.server": ["HTTP_DEFAULTS", "is_server", "bound_waits", "request_timeout",
                                "silence", "require_server", "brief_waits", "is_outage"],
            "tracking.spool": ["SPOOL_ENV", "FORMAT", "MANIFEST", "JOURNAL", "SENT", "FILES",
                               "RECHECK_S", "spool_root", "Record", "Spool", "_store", "_load",
                               "Link", "upload", "_reason", "_say", "_write_json", "_now_iso"],
            "tracking.sync": ["Synced", "spooled", "find", "sync", "_sync_one"],
        },
        default="tracking.spool",
        heir="tracking.spool",
        docs={
            "tracking.server": (
                "Is the tracking server there: :func:`require_server` before a command starts,\n"
                "MLflow's HTTP waits bounded, and which failures are an outage (see\n"
                ":mod:`cifarx.tracking.spool`)."),
            "tracking.sync": (
                "``cifarx sync``: upload the spool of each run that ended with its server away, "
                "into\nthat same run, in order, once."),
        }),
    "runs": Split(
        parts={
            "runs.common": ["Tracking", "run_tags", "third_party", "load_test_data",
                            "model_classes", "model_dataset", "model_run", "linked",
                            "log_test_set"],
            "runs.train": ["PRUNED_TAG", "TrainJob", "TrainRun", "prepare_training", "train_run",
                           "CHECKPOINT", "save_checkpoint", "resume_run", "prepare_resume",
                           "best_metrics", "log_figures", "describe", "model_recipe", "finish",
                           "FINAL_ARTIFACT", "model_note"],
            "runs.evaluate": ["EvaluateConfig", "EvaluateRun", "evaluate_run"],
            "runs.analyze": ["AnalyzeConfig", "AnalyzeRun", "analyze_run"],
            "runs.attack": ["AttackConfig", "AttackRun", "attack_run"],
            "runs.transfer": ["TransferConfig", "TransferRun", "transfer_run"],
        },
        default="runs.common",
        heir="runs.train",
        package_doc=True,
        docs={
            "runs.common": (
                "What every kind of run shares: where it is tracked (:class:`Tracking`), the "
                "tags it\ncarries (:func:`run_tags`, and only there), a model's test data."),
            "runs.train": (
                "Training runs: :func:`train_run`, and :func:`resume_run`, which continues one "
                "from its\nlast checkpoint."),
            "runs.evaluate": "``cifarx evaluate``: a trained model's test-set report.",
            "runs.analyze": "``cifarx analyze``: analysis plugins run on a trained model.",
            "runs.attack": "``cifarx attack``: an attack plugin run on a trained model.",
            "runs.transfer": ("``cifarx transfer``: an attack run's adversarial images scored "
                              "on other models."),
        }),
    "cli": Split(
        parts={
            "cli": ["main"],
            "cli.common": [
                "app", "command", "plugins_catalog", "_version", "main_options", "_threads",
                "_tracking", "_open_hint", "Device", "Precision", "Seed", "DataDir",
                "Experiment", "RunName", "TrackingUri", "DatasetName", "ModelDataset",
                "TrustPickle", "Threads", "Description", "Tag", "SystemMetrics", "opt_flag",
                "ArchOpt", "AugOpt", "ProbeOpt", "AttackOpt", "DatasetOpt", "ExecutorOpt",
                "AnalysisOpt", "PER_ARCH", "MODEL_HELP", "_print_findings", "check_tag"],
            "cli.train": ["train", "RESUME_WITH", "with_pretrained"],
            "cli.evaluate": ["evaluate", "analyze"],
            "cli.catalog": ["plugins", "describe", "describe_architecture"],
            "cli.ui": ["ui", "_served_artifacts", "_server_logged_runs"],
            "cli.attack": ["ATTACK_FLAGS", "attack", "transfer"],
            "cli.sweep": ["sweep"],
            "cli.sync": ["sync"],
        },
        default="cli.common",
        heir="cli.train",
        docs={
            "cli.common": (
                "What the commands share: the app, :func:`command` (a UserError is one line and "
                "status\n2), the options' types, the tracking flags."),
            "cli.train": "``cifarx train``.",
            "cli.evaluate": "``cifarx evaluate`` and ``cifarx analyze``: a trained model's "
                            "report and analyses.",
            "cli.catalog": "``cifarx plugins`` and ``cifarx describe``: what is installed, and "
                           "what a plugin takes.",
            "cli.ui": "``cifarx ui``: the MLflow UI on the tracking store.",
            "cli.attack": "``cifarx attack`` and ``cifarx transfer``.",
            "cli.sweep": "``cifarx sweep``.",
            "cli.sync": "``cifarx sync``: upload the runs spooled while their server was away.",
        }),
    "sweep": Split(
        parts={
            "studies.sweep_plan": ["TPE_STARTUP", "SEARCH_METRICS", "SweepPlan", "Search",
                                   "SweepResult", "SweepFailed", "plan_sweep", "executor_choice",
                                   "parallelism", "plan_search", "remote_workers", "trial_name",
                                   "axis_values", "trial_run_name", "_without_shared",
                                   "param_of", "SHORT_NAMES", "run_namer"],
            "studies.sweep": ["SWEEP_TAG", "DIGEST_TAG", "EXECUTOR_OPTIONS_TAG", "STUDY_ARTIFACT",
                              "find_sweep", "load_resumed", "finished_children",
                              "resumable_children", "sweep_run", "earlier_seconds",
                              "REGISTERED_TAG", "register_model", "run_search", "tell",
                              "search_summary", "importance_figure"],
            "studies.summary": ["FAILED_TAG", "MISSING_NAMED", "summarize", "forget_tag",
                                "trials_view", "best_note"],
        },
        default="studies.sweep",
        heir="studies.sweep",
        docs={
            "studies.sweep_plan": (
                "Planning a sweep: every trial (and a tpe search's random start) planned and "
                "checked\nbefore the sweep's run opens; how many trials its executor runs at "
                "once; what a sweep\nreturns."),
            "studies.summary": (
                "A sweep's summary over seeds: ``sweep.json``, ``sweep.csv``, the ranked table "
                "and the\nfigures, logged to the sweep's run, and how the MLflow UI shows its "
                "trials."),
        }),
    "studies": Split(
        parts={
            "studies.study": [
                "TOP_KEYS", "SEARCHES", "PRUNERS", "PRUNER_STARTUP", "OPTION_KEYS", "MULTI",
                "FIELD_OF", "NOT_IN_STUDY", "DISTRIBUTIONS", "Study", "Configuration", "load",
                "from_dict", "_tables", "flatten", "_leaves", "_check_distribution", "check",
                "_HINTS", "field_name", "coerce", "apply", "pruner_warmup", "overrides",
                "is_list", "raw_of", "axes_of", "with_flags"],
            "studies.configurations": [
                "digest", "config_key", "configurations", "PLUGIN_LISTS", "ALWAYS_USED",
                "in_use", "_names", "_named_anywhere", "corners", "draw"],
        },
        default="studies.study",
        heir="studies.study",
        docs={
            "studies.configurations": (
                "A study expanded into its configurations (the grid's corners first, random "
                "draws\nseeded), each with its key: the digest a sweep finds its trials "
                "by."),
        }),
}

# A package whose __init__ re-exports these names of the old module it replaces: code outside
# framework/ keeps importing them from the package (the public path).
EXPORTED = {"runs": "public", "cli": ("app", "main")}

PACKAGE_DOCS = {
    "plugin_api": (
        "What plugins are written against, and how they are found: the hook specs, the plugin\n"
        "types and their options, and the registry that loads plugins from entry points."),
    "training": (
        "A training run's parts: its config and plan, the data, the model, the optimizer and "
        "its\nschedule, the training loop, validation."),
    "inference": (
        "Using a trained model: predictions, the test-set report, adversarial attacks and their\n"
        "transfer to other models, analyses."),
    "tracking": (
        "MLflow: where runs go (``common``) and whether the server answers (``server``), a "
        "run's\nlifecycle (``lifecycle``) and what it logs (``run``), models in and out "
        "(``models``,\n``weights``), the SQLite store (``store``), and the spool that carries a "
        "run through a\nserver outage (``spool``, ``sync``).\n\nmlflow and torch are imported "
        "inside the functions that need them: they take seconds to\nimport, and ``cifarx "
        "--help`` should not pay for them."),
    "studies": (
        "Studies: a study file (``study``) and its configurations (``configurations``), the "
        "sweep\nthat runs its trials (``sweep_plan``, ``sweep``, ``summary``), one trial "
        "(``trials``),\nstatistics over seeds (``stats``, ``compare``)."),
    "reports": (
        "What results become: ``cifarx report`` (a sweep, runs or an experiment as one HTML "
        "page\nand Markdown) and ``cifarx reproduce`` (the assignment trained, attacked and "
        "reported)."),
}
# every package a table names (one that gets no module is not made)
PACKAGES = tuple(sorted({m.split(".")[0] for m in MOVES.values()} | {
    p.split(".")[0] for split in SPLITS.values() for p in split.parts}))

# Modules over LIMIT lines that stay whole, with why (tests/test_layout.py checks the rest).
LIMIT = 400
LONGER = {
    "training/loop.py": "one job: the training loop (its checkpoints, stops and signals)",
}

# Where the old paths are rewritten; docs (markdown) get only the references that would break.
PY_DIRS = ("framework", "plugins", "tests", "bench", "examples", "docs", "tools")
TEXT_FILES = ("Makefile", "MLproject", ".ci/run")
MD_GLOBS = ("README.md", "docs/**/*.md", "examples/**/*.md")

# --- small helpers ----------------------------------------------------------------------------

WARNINGS: list[str] = []


def warn(text: str):
    WARNINGS.append(text)
    print(f"relayout: warning: {text}")


def parent(module: str) -> str:
    return module.rpartition(".")[0]


def git(repo: Path, *args: str, check=True) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and done.returncode:
        sys.exit(f"relayout: git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


class Edits:
    """Replacements in a text, by ast positions (col offsets are UTF-8 bytes)."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.split("\n")
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line) + 1)
        self.edits: list[tuple[int, int, str]] = []

    def index(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    def span(self, node) -> tuple[int, int]:
        return (self.index(node.lineno, node.col_offset),
                self.index(node.end_lineno, node.end_col_offset))

    def replace(self, node, new: str):
        self.edits.append((*self.span(node), new))

    def replace_at(self, start: int, end: int, new: str):
        self.edits.append((start, end, new))

    def apply(self) -> str:
        text, last = self.text, None
        for start, end, new in sorted(set(self.edits), reverse=True):
            if last is not None and end > last:
                raise RuntimeError(f"overlapping edits at {start}..{end}")
            text = text[:start] + new + text[end:]
            last = start
        return text


def isort_key(alias: str):
    name = alias.split(" as ")[0]
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name


def render_from(spec: str, aliases: list[str], indent: str, comment: str = "") -> str:
    """``from spec import a, b`` wrapped as the project writes it (100 columns, aligned)."""
    aliases = sorted(dict.fromkeys(aliases), key=isort_key)
    line = f"from {spec} import {', '.join(aliases)}"
    tail = f"  {comment}" if comment else ""
    if len(indent) + len(line) + len(tail) <= 99:
        return line + tail
    head = f"from {spec} import ("
    lines, cur = [], head
    for i, alias in enumerate(aliases):
        piece = alias + ("," if i < len(aliases) - 1 else ")")
        if cur == head:
            cur += piece
        elif len(indent) + len(cur) + 1 + len(piece) <= 99:
            cur += " " + piece
        else:
            lines.append(cur)
            cur = " " * len(head) + piece
    lines.append(cur + tail)
    return ("\n" + indent).join(lines)


def free_names(node, bound: frozenset = frozenset()) -> dict[str, list[ast.Name]]:
    """The names ``node`` loads from the module's globals (not bound in a function scope
    inside it), with their Name nodes; names in string annotations count, without nodes."""
    found: dict[str, list] = {}

    def bindings(body) -> set[str]:
        names: set[str] = set()
        declared: set[str] = set()
        stack = list(body)
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
                stack.extend(n.decorator_list)
                continue
            if isinstance(n, ast.Lambda):
                continue
            if isinstance(n, (ast.Global, ast.Nonlocal)):
                declared.update(n.names)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                names.add(n.id)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    names.add((a.asname or a.name).split(".")[0])
            elif isinstance(n, ast.ExceptHandler) and n.name:
                names.add(n.name)
            elif isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                stack.append(n.generators[0].iter)
                continue
            stack.extend(ast.iter_child_nodes(n))
        return names - declared

    def annotation(ann, bound):
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            try:
                tree = ast.parse(ann.value, mode="eval")
            except SyntaxError:
                return
            for n in ast.walk(tree):
                if isinstance(n, ast.Name) and n.id not in bound:
                    found.setdefault(n.id, [])
        elif ann is not None:
            visit(ann, bound)

    def visit(n, bound):
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load) and n.id not in bound:
                found.setdefault(n.id, []).append(n)
            return
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = n.args
            for d in getattr(n, "decorator_list", []):
                visit(d, bound)
            for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
                visit(d, bound)
            every = args.posonlyargs + args.args + args.kwonlyargs + \
                [a for a in (args.vararg, args.kwarg) if a]
            for a in every:
                annotation(a.annotation, bound)
            if not isinstance(n, ast.Lambda):
                annotation(n.returns, bound)
            body = n.body if isinstance(n.body, list) else [n.body]
            inner = bound | {a.arg for a in every} | bindings(body)
            for st in body:
                visit(st, frozenset(inner))
            return
        if isinstance(n, ast.ClassDef):
            for d in n.decorator_list + n.bases + [k.value for k in n.keywords]:
                visit(d, bound)
            for st in n.body:
                visit(st, bound)
            return
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = set(bound)
            for gen in n.generators:
                visit(gen.iter, frozenset(inner))
                inner |= {t.id for t in ast.walk(gen.target) if isinstance(t, ast.Name)}
                for cond in gen.ifs:
                    visit(cond, frozenset(inner))
            for part in ([n.key, n.value] if isinstance(n, ast.DictComp) else [n.elt]):
                visit(part, frozenset(inner))
            return
        if isinstance(n, ast.AnnAssign):
            annotation(n.annotation, bound)
            for part in (n.target, n.value):
                if part is not None:
                    visit(part, bound)
            return
        for child in ast.iter_child_nodes(n):
            visit(child, bound)

    visit(node, frozenset(bound))
    return found


def defined_names(st) -> list[str]:
    if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [st.name]
    if isinstance(st, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = st.targets if isinstance(st, ast.Assign) else [st.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def is_type_checking(st) -> bool:
    return isinstance(st, ast.If) and "TYPE_CHECKING" in ast.unparse(st.test) and all(
        isinstance(s, (ast.Import, ast.ImportFrom)) for s in st.body)


def is_header(st) -> bool:
    return isinstance(st, (ast.Import, ast.ImportFrom)) or is_type_checking(st)


def header_of(tree):
    """(docstring, header, body): the header is the imports above the first definition and the
    ``if TYPE_CHECKING`` blocks; an import further down (for its side effect) is body."""
    doc = docstring_node(tree)
    first = next((st for st in tree.body if st is not doc and not is_header(st)), None)
    limit = first.lineno if first else 1 << 30
    header = [st for st in tree.body if is_header(st) and (st.lineno < limit or
                                                           is_type_checking(st))]
    body = [st for st in tree.body if st is not doc and st not in header]
    return doc, header, body


def docstring_node(tree):
    if tree.body and isinstance(tree.body[0], ast.Expr) and \
            isinstance(tree.body[0].value, ast.Constant) and isinstance(tree.body[0].value.value, str):
        return tree.body[0]
    return None


# --- the plan: where every old module and name goes -------------------------------------------

@dataclass
class Unit:
    node: ast.stmt
    names: list[str]
    text: str  # with the comment lines right above it
    gap: int  # blank lines above it in the old file
    part: str | None = None


@dataclass
class Plan:
    repo: Path
    old: dict[str, str] = field(default_factory=dict)  # old module -> its source
    names: dict[str, set[str]] = field(default_factory=dict)  # old module -> top-level names
    imported: dict[str, dict[str, str]] = field(default_factory=dict)  # old -> name -> source
    units: dict[str, list[Unit]] = field(default_factory=dict)  # split module -> units
    part_of: dict[tuple[str, str], str] = field(default_factory=dict)  # (old, name) -> part
    public: dict[str, list[str]] = field(default_factory=dict)  # split -> its public names
    patched: set[tuple[str, str]] = field(default_factory=set)  # (old, name) tests replace
    tags: set[str] = field(default_factory=set)  # "cifarx.sweep": strings that are tags

    # where a module now is ("cifarx.x.y"); a split module: its package, else its heir
    def new_module(self, old: str) -> str:
        if old in MOVES:
            return "cifarx." + MOVES[old]
        split = SPLITS[old]
        return "cifarx." + (old if old in PACKAGES else split.heir)

    def moved(self, old: str) -> bool:
        return old in MOVES or old in SPLITS

    def aliased(self, old: str) -> bool:
        """The old path keeps working (_moved.py), or is the package that took its place."""
        return old not in PACKAGES and (old in MOVES or old in SPLITS)

    def where(self, old: str, name: str, inside: bool = True) -> str:
        """The module that defines ``name`` of the old module ``old`` (``inside``: for code in
        framework/; outside, a name the new package exports stays at the package)."""
        if old in MOVES:
            return "cifarx." + MOVES[old]
        if not inside and old in EXPORTED:
            exported = EXPORTED[old]
            if (exported == "public" and name in self.public.get(old, ())) or \
                    (exported != "public" and name in exported):
                return "cifarx." + old
        part = self.part_of.get((old, name))
        if part:
            return "cifarx." + part
        source = self.imported.get(old, {}).get(name)
        if source:  # a name the old module imported: from where it comes
            top = source.split(".")
            if len(top) == 2 and top[0] == "cifarx" and self.moved(top[1]):
                return self.where(top[1], name, inside)
            return source
        warn(f"cifarx.{old}.{name} is not defined in {old}.py: pointed at "
             f"cifarx.{SPLITS[old].default}")
        return "cifarx." + SPLITS[old].default


def load_plan(repo: Path) -> Plan:
    plan = Plan(repo)
    framework = repo / "framework"
    for path in sorted(framework.glob("*.py")):
        plan.old[path.stem] = path.read_text()
    unknown = set(plan.old) - set(KEEP) - set(MOVES) - set(SPLITS)
    for name in sorted(unknown):
        warn(f"framework/{name}.py is in no table: it stays where it is")
    absent = sorted(name for name in set(MOVES) | set(SPLITS) if name not in plan.old)
    if absent:  # the tables also place modules of branches not merged yet
        print(f"relayout: note: no framework/{{{','.join(absent)}}}.py here: skipped")
    for old, source in plan.old.items():
        tree = ast.parse(source)
        plan.names[old] = {n for st in tree.body for n in defined_names(st)}
        imported = plan.imported.setdefault(old, {})
        for st in tree.body:
            if isinstance(st, ast.ImportFrom):
                src = resolve(st, "cifarx" if old == "__init__" else f"cifarx.{old}",
                              old == "__init__")
                for a in st.names:
                    imported[a.asname or a.name] = src
    for path in sorted(framework.glob("*.py")) + sorted((repo / "plugins").glob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and \
                    re.fullmatch(r"cifarx\.[\w.]+", n.value):
                plan.tags.add(n.value)
    for old in SPLITS:
        if old in plan.old:
            place(plan, old)
    find_patched(plan)
    return plan


def resolve(st: ast.ImportFrom, module: str | None, is_package: bool) -> str:
    """The absolute module an ImportFrom reads from, given the module it is in."""
    if not st.level:
        return st.module or ""
    if module is None:
        return st.module or ""
    base = module if is_package else parent(module)
    for _ in range(st.level - 1):
        base = parent(base)
    return f"{base}.{st.module}" if st.module else base


def place(plan: Plan, old: str):
    """Cut a module into units (top-level statements) and give each unit its part."""
    split = SPLITS[old]
    source = plan.old[old]
    tree = ast.parse(source)
    lines = source.split("\n")
    doc, header, body = header_of(tree)
    units, prev_end = [], 0
    heads = ([doc] if doc else []) + header
    header_end = max((h.end_lineno for h in heads), default=0)
    for st in body:
        first = min([st.lineno] + [d.lineno for d in getattr(st, "decorator_list", [])])
        start = first
        while start - 1 > max(prev_end, 0) and lines[start - 2].lstrip().startswith("#"):
            start -= 1
        # comments further up (after blank lines) that belong to no unit: keep with this one
        above = max(prev_end, header_end if st.lineno > header_end else 0)
        stray = [i for i in range(above + 1, start) if lines[i - 1].strip()]
        if stray and all(lines[i - 1].lstrip().startswith("#") for i in stray):
            start = stray[0]
        gap = 0
        i = start - 1
        while i >= 1 and not lines[i - 1].strip():
            gap, i = gap + 1, i - 1
        units.append(Unit(st, defined_names(st), "\n".join(lines[start - 1:st.end_lineno]), gap))
        prev_end = st.end_lineno
    plan.units[old] = units

    listed = {}
    for part, names in split.parts.items():
        for name in names:
            listed[name] = part
    defined = {n for u in units for n in u.names}
    absent = [name for name in listed if name not in defined]
    if absent:  # the tables also place names of branches not merged yet
        print(f"relayout: note: {old}.py has no {', '.join(absent)} (listed in SPLITS)")
    for unit in units:
        parts = {listed[n] for n in unit.names if n in listed}
        if len(parts) > 1:
            warn(f"{old}.py line {unit.node.lineno} defines names of {sorted(parts)}: "
                 f"all go to {sorted(parts)[0]}")
        if parts:
            unit.part = sorted(parts)[0]

    uses = {id(u): set(free_names(u.node)) for u in units}
    home = {}  # name -> unit

    for unit in units:
        for name in unit.names:
            home[name] = unit

    def graph(extra=()) -> dict[str, set[str]]:
        """part -> the parts it imports from (its units use their names)"""
        edges: dict[str, set[str]] = {}
        for u in units:
            if u.part:
                for name in uses[id(u)]:
                    other = home.get(name)
                    if other is not None and other.part and other.part != u.part:
                        edges.setdefault(u.part, set()).add(other.part)
        for a, b in extra:
            if a != b:
                edges.setdefault(a, set()).add(b)
        return edges

    def reaches(edges, a, b) -> bool:
        seen, todo = set(), [a]
        while todo:
            x = todo.pop()
            if x == b:
                return True
            if x not in seen:
                seen.add(x)
                todo.extend(edges.get(x, ()))
        return False

    def cyclic(edges) -> bool:
        return any(reaches(edges, b, a) for a in edges for b in edges[a])

    def settle(unit, users, candidates) -> bool:
        """Put the unit in the first candidate part that makes no import circle."""
        needs = {home[n].part for n in uses[id(unit)] if n in home and home[n] is not unit
                 and home[n].part}
        for part in dict.fromkeys(candidates):
            extra = [(part, d) for d in needs] + [(u, part) for u in users]
            if not cyclic(graph(extra)):
                unit.part = part
                return True
        return False

    if cyclic(graph()):
        warn(f"the parts of {old}.py import one another in a circle: change SPLITS['{old}']")
    changed = True
    while changed:  # an unlisted name goes where the names that use it went
        changed = False
        for unit in units:
            if unit.part or not unit.names:
                continue
            users = {u.part for u in units if u is not unit and set(unit.names) & uses[id(u)]}
            if not users or None in users:
                continue
            edges = graph()  # a part the other users import from already, else the default
            lowest = [p for p in sorted(users) if all(reaches(edges, q, p) for q in users)]
            changed = settle(unit, users, lowest + [split.default] + sorted(users) +
                             list(split.parts))
            if not changed:
                unit.part = split.default
                warn(f"{old}.{unit.names[0]} (not in the table) makes an import circle "
                     f"wherever it goes: left in {split.default}")
                changed = True
    previous = None
    for unit in units:  # used by nothing placed (or by one another): beside the unit above
        if not unit.part:
            users = {u.part for u in units if u is not unit and u.part
                     and set(unit.names) & uses[id(u)]}
            if not settle(unit, users, [p for p in (previous, split.default) if p] +
                          list(split.parts)):
                unit.part = previous or split.default
        previous = unit.part
    for unit in units:
        for name in unit.names:
            plan.part_of[(old, name)] = unit.part
    unlisted = [n for u in units for n in u.names if n not in listed]
    if unlisted:
        print(f"relayout: {old}.py names not in SPLITS, placed by their users: " + ", ".join(
            f"{n} -> {plan.part_of[(old, n)]}" for n in unlisted))
    plan.public[old] = [n for u in units for n in u.names if not n.startswith("_")]


def find_patched(plan: Plan):
    """Names of split modules that tests replace (monkeypatch.setattr(module, "name", ...)):
    the other parts then read them through their module, so the replacement is seen."""
    for path in sorted((plan.repo / "tests").rglob("*.py")) + sorted(
            (plan.repo / "bench").rglob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError:
            continue
        bound = {}
        for st in ast.walk(tree):
            if isinstance(st, ast.ImportFrom) and st.module == "cifarx":
                for a in st.names:
                    bound[a.asname or a.name] = a.name
            elif isinstance(st, ast.Import):
                for a in st.names:
                    if a.asname and a.name.startswith("cifarx."):
                        bound[a.asname] = a.name.split(".", 1)[1]
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and len(call.args) >= 1):
                continue
            func = call.func.attr if isinstance(call.func, ast.Attribute) else \
                getattr(call.func, "id", "")
            if func not in ("setattr", "delattr", "patch", "object"):
                continue
            first = call.args[0]
            if isinstance(first, ast.Name) and first.id in bound and len(call.args) >= 2 and \
                    isinstance(call.args[1], ast.Constant) and isinstance(call.args[1].value, str):
                plan.patched.add((bound[first.id], call.args[1].value))
            elif isinstance(first, ast.Constant) and isinstance(first.value, str):
                bits = first.value.split(".")
                if len(bits) == 3 and bits[0] == "cifarx":
                    plan.patched.add((bits[1], bits[2]))


# --- rewriting imports and references -----------------------------------------------------------

def relative_spec(target: str, module: str, is_package: bool) -> str:
    """``target`` as a relative import from ``module``."""
    here = (module if is_package else parent(module)).split(".")
    there = target.split(".")
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    return "." * (len(here) - common + 1) + ".".join(there[common:])


class Rewriter:
    """Rewrites one Python file's imports and cifarx references to the new layout.

    ``old``/``new``: the file's module before and after (None outside the package), for
    relative imports; ``inside``: the file is framework code (imports go to where a name is
    defined, not to the package that exports it)."""

    def __init__(self, plan: Plan, text: str, old: str | None, old_pkg: bool,
                 new: str | None, new_pkg: bool, inside: bool):
        self.plan, self.text = plan, text
        self.old, self.old_pkg, self.new, self.new_pkg = old, old_pkg, new, new_pkg
        self.inside = inside
        self.tree = ast.parse(text)
        self.edits = Edits(text)
        self.taken = {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)} | {
            a.arg for a in ast.walk(self.tree) if isinstance(a, ast.arg)} | {
            (a.asname or a.name).split(".")[0] for n in ast.walk(self.tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} | {
            n.name for n in ast.walk(self.tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}

    def old_of(self, module: str) -> str | None:
        """The old module ``cifarx.<x>`` names, if it moved."""
        bits = module.split(".")
        if len(bits) == 2 and bits[0] == "cifarx" and self.plan.moved(bits[1]):
            return bits[1]
        return None

    def spec(self, target: str, relative: bool) -> str:
        if relative and self.new:
            return relative_spec(target, self.new, self.new_pkg)
        return target

    def run(self) -> str:
        scopes = [self.tree] + sorted(
            (n for n in ast.walk(self.tree) if isinstance(n, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef))),
            key=lambda n: n.lineno)
        owner = {}  # each import's scope: the innermost function around it, else the module
        for scope in scopes:
            for st in ast.walk(scope):
                if isinstance(st, (ast.Import, ast.ImportFrom)):
                    owner[st] = scope
        for st, scope in owner.items():
            if isinstance(st, ast.ImportFrom):
                self.import_from(st, scope)
            else:
                self.import_(st, scope)
        self.cifarx_attributes()
        self.strings()
        return self.edits.apply()

    # from X import a, b
    def import_from(self, st: ast.ImportFrom, scope):
        src = resolve(st, self.old, self.old_pkg)
        relative = st.level > 0
        if not (src == "cifarx" or src.startswith("cifarx.")):
            return
        groups: dict[str, list[str]] = {}
        changed = False
        for a in st.names:
            alias = a.asname or a.name
            if src == "cifarx" and self.plan.moved(a.name):
                bindings = self.bind_module(a.name, alias, scope)
                for target, leaf, as_name in bindings:
                    groups.setdefault(target, []).append(
                        leaf if leaf == as_name else f"{leaf} as {as_name}")
                changed = True
                continue
            old = self.old_of(src)
            target = self.plan.where(old, a.name, self.inside) if old else src
            changed |= target != src
            groups.setdefault(target, []).append(
                a.name if not a.asname else f"{a.name} as {a.asname}")
        relocated = relative and self.new and self.spec(src, True) != "." * st.level + (
            st.module or "")
        if not changed and not relocated:
            return
        self.replace_import(st, groups, relative)

    def bind_module(self, old: str, alias: str, scope) -> list[tuple[str, str, str]]:
        """``from cifarx import <old> as alias``: (package, leaf, name) bindings for it now; for
        a split module, one per part its uses need, and those uses rewritten."""
        if old not in SPLITS or old in EXPORTED:
            target = self.plan.new_module(old)
            return [(parent(target), target.rpartition(".")[2], alias)]
        parts: dict[str, list] = {}
        bare = False
        for n in ast.walk(scope):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and \
                    n.value.id == alias:
                parts.setdefault(self.plan.where(old, n.attr), []).append(n.value)
            elif isinstance(n, ast.Call) and len(n.args) >= 2 and \
                    isinstance(n.args[0], ast.Name) and n.args[0].id == alias and \
                    isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str):
                parts.setdefault(self.plan.where(old, n.args[1].value), []).append(n.args[0])
        used = {id(node) for nodes in parts.values() for node in nodes}
        for n in ast.walk(scope):
            if isinstance(n, ast.Name) and n.id == alias and id(n) not in used and \
                    isinstance(n.ctx, ast.Load):
                bare = True
        if bare:
            warn(f"{self.new or '?'}: `{alias}` ({old}) is used as a module object: bound to "
                 f"cifarx.{SPLITS[old].default}")
            parts.setdefault("cifarx." + SPLITS[old].default, [])
        if not parts:
            parts["cifarx." + SPLITS[old].default] = []
        bindings = []
        if len(parts) == 1:
            (target, nodes), = parts.items()
            return [(parent(target), target.rpartition(".")[2], alias)]
        for target, nodes in sorted(parts.items()):
            leaf = target.rpartition(".")[2]
            if leaf == old or leaf == alias:
                name = alias
            else:
                pkg = parent(target).rpartition(".")[2]
                name = next(c for c in (leaf, f"{pkg}_{leaf}", f"{alias}_{leaf}",
                                        f"_{alias}_{leaf}") if c not in self.taken)
                self.taken.add(name)
            for node in nodes:
                if name != alias:
                    self.edits.replace(node, name)
            bindings.append((parent(target), leaf, name))
        return bindings

    def replace_import(self, st, groups: dict[str, list[str]], relative: bool):
        line = self.edits.lines[st.lineno - 1]
        before = line.encode()[:st.col_offset].decode(errors="ignore")
        indent = before if not before.strip() else None
        end_line = self.edits.lines[st.end_lineno - 1]
        after = end_line.encode()[st.end_col_offset:].decode(errors="ignore")
        comment = after.strip() if after.strip().startswith("#") else ""
        rendered = []
        noqa = re.match(r"#\s*noqa(:\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*)?", comment)
        for target, aliases in sorted(groups.items(), key=lambda kv: import_key(
                self.spec(kv[0], relative))):
            rendered.append(render_from(self.spec(target, relative), aliases, indent or "",
                                        (comment if not rendered else noqa.group(0))
                                        if noqa else ""))
        if comment and not noqa:
            rendered[0] += f"  {comment}"
        start, end = self.edits.span(st)
        if comment:  # the comment moves with the statement(s)
            end = self.edits.starts[st.end_lineno - 1] + len(end_line)
        self.edits.replace_at(start, end, ("\n" + indent if indent is not None else "; ").join(
            rendered))

    # import cifarx.x [as y]
    def import_(self, st: ast.Import, scope):
        out, changed = [], False
        for a in st.names:
            old = self.old_of(a.name)
            if not old:
                out.append(a.name + (f" as {a.asname}" if a.asname else ""))
                continue
            changed = True
            if a.asname:
                for pkg, leaf, name in self.bind_module(old, a.asname, scope):
                    out.append(f"{pkg}.{leaf}" + (f" as {name}" if name else ""))
            else:  # `import cifarx.x`: its uses cifarx.x.name are rewritten on their own
                targets = sorted({self.plan.where(old, n, self.inside) for n in
                                  self.attrs_of(old)} or {self.plan.new_module(old)})
                out.extend(targets)
        if changed:
            line = self.edits.lines[st.lineno - 1]
            before = line.encode()[:st.col_offset].decode(errors="ignore")
            indent = before if not before.strip() else None
            self.edits.replace(st, ("\n" + indent if indent is not None else "; ").join(
                f"import {x}" for x in dict.fromkeys(out)))

    def attrs_of(self, old: str) -> set[str]:
        return {n.attr for n in ast.walk(self.tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Attribute) and n.value.attr == old
                and isinstance(n.value.value, ast.Name) and n.value.value.id == "cifarx"}

    def cifarx_attributes(self):
        """cifarx.x.name (after ``import cifarx.x``) -> cifarx.<where>.name"""
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and \
                    isinstance(n.value.value, ast.Name) and n.value.value.id == "cifarx" and \
                    self.plan.moved(n.value.attr):
                self.edits.replace(n.value, self.plan.where(n.value.attr, n.attr, self.inside))

    def strings(self):
        """References in strings and comments: "cifarx.x.name", ``cifarx.x``, import lines."""
        calls = {}
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) and \
                    isinstance(n.args[0].value, str):
                func = n.func.attr if isinstance(n.func, ast.Attribute) else \
                    getattr(n.func, "id", "")
                if func in ("import_module", "__import__", "find_spec", "patch", "setattr",
                            "delattr", "reload", "run_module"):
                    calls[(n.args[0].lineno, n.args[0].col_offset)] = True
        tokens = tokenize.generate_tokens(io.StringIO(self.text).readline)
        for tok in tokens:
            if tok.type not in (tokenize.STRING, tokenize.COMMENT):
                continue
            whole = (tok.start[0], self.edits.lines[tok.start[0] - 1][:tok.start[1]]
                     .encode().__len__()) in calls
            new = rewrite_text(self.plan, tok.string, "py", whole=whole, inside=self.inside)
            if new != tok.string:
                start = self.edits.starts[tok.start[0] - 1] + tok.start[1]
                end = self.edits.starts[tok.end[0] - 1] + tok.end[1]
                self.edits.replace_at(start, end, new)


def import_key(spec: str):
    level = len(spec) - len(spec.lstrip("."))
    return -level, spec.lstrip(".")


REF = re.compile(r"(?<![\w.])cifarx\.([a-z_]\w*)(?:\.([A-Za-z_]\w*))?(?![\w-])")
IMPORT_LINE = re.compile(r"\bfrom cifarx\.([a-z_]\w*) import ([\w, ]+)")
PATH = re.compile(r"(?<![\w/])framework/(\w+)\.py\b")


def rewrite_text(plan: Plan, text: str, mode: str, whole=False, inside=True) -> str:
    """Dotted references in prose, strings or comments. ``mode``: "py" (the repo's code: all of
    them), "md" (docs: ``::: cifarx.x`` and the references that would no longer resolve)."""

    def import_line(m):
        old = m.group(1)
        if not plan.moved(old) or (mode == "md" and plan.aliased(old)):
            return m.group(0)
        names = [n.strip() for n in m.group(2).split(",") if n.strip()]
        targets = {plan.where(old, n.split(" as ")[0], inside) for n in names}
        if len(targets) != 1:
            warn(f"a string imports {names} from cifarx.{old}, now in several modules: kept")
            return m.group(0)
        return f"from {targets.pop()} import {m.group(2)}"

    def ref(m):
        old, name = m.group(1), m.group(2)
        if not plan.moved(old):
            return m.group(0)
        start, end = m.span()
        before, after = text[max(0, start - 1):start], text[end:end + 1]
        directive = text[max(0, start - 4):start] == "::: "
        if name and name in plan.names.get(old, ()):
            if mode == "md" and not directive and plan.aliased(old) and old not in SPLITS:
                return m.group(0)
            if mode == "md" and not directive and old in EXPORTED and \
                    plan.where(old, name, False) == "cifarx." + old:
                return m.group(0)
            return f"{plan.where(old, name, inside and mode == 'py')}.{name}"
        if name and name != "py":
            return m.group(0)  # cifarx.sweep.digest, a tag: not a module's name
        bare = plan.new_module(old)
        suffix = m.group(0)[len(f"cifarx.{old}"):]
        role = text[max(0, start - 6):start] == ":mod:`"
        tag = m.group(0) in plan.tags  # "cifarx.sweep" is also the tag on a sweep's run
        if whole or directive or role or (mode == "py" and before == "`" and after == "`"
                                          and not tag):
            return bare + suffix
        return m.group(0)

    def path(m):
        old = m.group(1)
        if not plan.moved(old):
            return m.group(0)
        module = plan.new_module(old)
        if old in SPLITS:
            module = "cifarx." + SPLITS[old].heir
        return f"framework/{module.split('.', 1)[1].replace('.', '/')}.py"

    text = IMPORT_LINE.sub(import_line, text)
    text = REF.sub(ref, text)
    for folder, (dest, reader) in DATA_MOVES.items():
        if reader in plan.old and (plan.repo / "framework" / folder).is_dir():
            text = re.sub(rf"(?<![\w/])framework/{folder}\b", f"framework/{dest}", text)
    return PATH.sub(path, text)


# --- building the split modules ------------------------------------------------------------------

def build_parts(plan: Plan, old: str) -> dict[str, str]:
    """Each part of a split module, as the old module's code (old-style imports: the Rewriter
    maps them afterwards) without sibling imports (added after)."""
    split = SPLITS[old]
    source = plan.old[old]
    tree = ast.parse(source)
    lines = source.split("\n")
    doc, headers, _ = header_of(tree)
    header_text = []
    for st in headers:
        start = st.lineno
        while start - 1 >= 1 and lines[start - 2].lstrip().startswith("#") and \
                (doc is None or start - 1 > doc.end_lineno):
            start -= 1
        header_text.append((st, "\n".join(lines[start - 1:st.end_lineno])))
    old_doc = ast.get_docstring(tree, clean=False) if doc else None
    parts = {}
    order = list(split.parts) + [split.default]
    for part in dict.fromkeys(order):
        units = [u for u in plan.units[old] if u.part == part and
                 not (old == "cli" and registers(plan, u))]
        if not units and part != split.default and part not in PACKAGES:
            warn(f"{part}: no names left for it")
            continue
        text = []
        if part in split.docs:
            text.append(f'"""{split.docs[part]}\n"""' if "\n" in split.docs[part]
                        else f'"""{split.docs[part]}"""')
        elif old_doc is not None and not (split.package_doc and part == split.heir):
            text.append("\n".join(lines[doc.lineno - 1:doc.end_lineno]))
        imports = []
        previous_end = None
        for st, chunk in header_text:
            if previous_end is not None and st.lineno - previous_end > 1 and \
                    not lines[previous_end].strip():
                imports.append("")
            imports.append(chunk)
            previous_end = st.end_lineno
        text.append("\n".join(imports))
        body, last = [], None
        for unit in units:
            if last is not None:
                adjacent = plan.units[old].index(unit) == plan.units[old].index(last) + 1
                compound = isinstance(unit.node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.ClassDef)) or isinstance(
                    last.node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                gap = unit.gap if adjacent else (2 if compound else max(1, min(unit.gap, 2)))
                body.append("\n" * gap)
            body.append(unit.text + "\n")
            last = unit
        first_gap = 2 if units and isinstance(units[0].node, (
            ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else 1
        if units:
            text.append("\n" * (first_gap - 1) + "".join(body).rstrip("\n"))
        parts[part] = "\n\n".join(t for t in text if t) + "\n"
    return parts


def add_sibling_imports(plan: Plan, old: str, part: str, text: str) -> str:
    """Import what ``part`` uses from the other parts of ``old``; a name tests replace is read
    through its module (``server.silence``) so that the replacement is seen."""
    split_names = {n: p for (o, n), p in plan.part_of.items() if o == old}
    tree = ast.parse(text)
    own = {n for st in tree.body for n in defined_names(st)}
    header = [st for st in tree.body if is_header(st)]
    local_imports = {(a.asname or a.name).split(".")[0] for st in header
                     for s in ([st] if not isinstance(st, ast.If) else st.body)
                     for a in s.names}
    needed: dict[str, list[str]] = {}
    via_module: dict[str, list[ast.Name]] = {}
    taken = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | own | local_imports
    for st in tree.body:
        if is_header(st) or st is docstring_node(tree):
            continue
        for name, nodes in free_names(st).items():
            if name in own or name in local_imports or name not in split_names:
                continue
            home = split_names[name]
            if home == part:
                continue
            if (old, name) in plan.patched and nodes:
                via_module.setdefault(home, []).extend(nodes)
            else:
                needed.setdefault(home, []).append(name)
    edits = Edits(text)
    module = "cifarx." + part
    is_pkg = part in PACKAGES
    new_lines = []
    for home, names in sorted(needed.items()):
        new_lines.append(render_from(relative_spec("cifarx." + home, module, is_pkg),
                                     list(dict.fromkeys(names)), ""))
    for home, nodes in sorted(via_module.items()):
        leaf = home.rpartition(".")[2]
        alias = leaf if leaf not in taken else "_" + leaf
        spec = relative_spec("cifarx." + parent(home) if "." in home else "cifarx", module,
                             is_pkg)
        new_lines.append(f"from {spec} import {leaf}" + (f" as {alias}" if alias != leaf else ""))
        for node in nodes:
            edits.replace(node, f"{alias}.{node.id}")
        print(f"relayout: cifarx.{part} reads {', '.join(sorted({n.id for n in nodes}))} "
              f"through cifarx.{home} (tests replace it there)")
    if not new_lines:
        return edits.apply()
    anchor = [st for st in tree.body if isinstance(st, (ast.Import, ast.ImportFrom))]
    if anchor:
        end = edits.starts[anchor[-1].end_lineno - 1] + len(edits.lines[anchor[-1].end_lineno - 1])
        edits.replace_at(end, end, "\n" + "\n".join(new_lines))
    else:
        doc = docstring_node(tree)
        at = edits.starts[doc.end_lineno] if doc else 0
        edits.replace_at(at, at, "\n" + "\n".join(new_lines) + "\n")
    return edits.apply()


def prune_imports(text: str) -> str:
    """Drop module-level imports the module does not use (a split part got all of them); keep
    ``from __future__``, ``# noqa`` lines and names in ``__all__``."""
    while True:
        tree = ast.parse(text)
        lines = text.split("\n")
        used = set(free_names(tree))
        for n in ast.walk(tree):
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                 for t in n.targets):
                used |= {e.value for e in ast.walk(n.value) if isinstance(e, ast.Constant)}
        edits = Edits(text)
        changed = False
        statements = []
        for st in tree.body:
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                statements.append((st, False))
            elif is_type_checking(st):
                statements.extend((s, True) for s in st.body)
                if all(isinstance(s, (ast.Import, ast.ImportFrom)) and not [
                        a for a in s.names if (a.asname or a.name).split(".")[0] in used]
                        and "noqa" not in lines[s.end_lineno - 1] for s in st.body):
                    start = edits.starts[st.lineno - 1]
                    end = edits.starts[st.end_lineno]
                    if st.end_lineno < len(lines) and not lines[st.end_lineno].strip() and \
                            st.lineno >= 2 and not lines[st.lineno - 2].strip():
                        end = edits.starts[st.end_lineno + 1]
                    edits.replace_at(start, end, "")
                    changed = True
                    statements = [s for s in statements if not s[1] or s[0] not in st.body]
        if changed:
            text = edits.apply()
            continue
        for st, _ in statements:
            if isinstance(st, ast.ImportFrom) and st.module == "__future__":
                continue
            if any("noqa" in line for line in lines[st.lineno - 1:st.end_lineno]):
                continue
            keep = [a for a in st.names if (a.asname or a.name).split(".")[0] in used]
            if len(keep) == len(st.names):
                continue
            changed = True
            indent = lines[st.lineno - 1][:len(lines[st.lineno - 1]) - len(
                lines[st.lineno - 1].lstrip())]
            start = edits.starts[st.lineno - 1]
            end = edits.starts[st.end_lineno]
            if not keep:
                edits.replace_at(start, end, "")
                continue
            names = [a.name + (f" as {a.asname}" if a.asname else "") for a in keep]
            if isinstance(st, ast.ImportFrom):
                spec = "." * st.level + (st.module or "")
                new = render_from(spec, names, indent)
            else:
                new = f"import {', '.join(names)}"
            edits.replace_at(start, end, indent + new + "\n")
        if not changed:
            return tidy_blank_lines(text)
        text = edits.apply()


def tidy_blank_lines(text: str) -> str:
    """At most one blank line between the import groups, two before the code."""
    tree = ast.parse(text)
    lines = text.split("\n")
    heads = [st for st in tree.body if is_header(st) or st is docstring_node(tree)]
    if not heads:
        return text
    code = [st for st in tree.body if st not in heads]
    last = heads[-1].end_lineno
    doc = docstring_node(tree)
    out = lines[:doc.end_lineno] if doc else []
    for line in lines[len(out):last]:
        if not line.strip() and (not out or not out[-1].strip()):
            continue
        out.append(line)
    rest = lines[last:]
    while rest and not rest[0].strip():
        rest.pop(0)
    if code:
        first = code[0]
        compound = isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        out.extend([""] * (2 if compound else 1))
    return "\n".join(out + rest)


def sort_local_imports(text: str) -> str:
    """Sort each run of adjacent cifarx imports (relative ones: furthest first), as isort
    would: a rewritten path may sort elsewhere."""
    tree = ast.parse(text)
    lines = text.split("\n")

    def local(st):
        if isinstance(st, ast.ImportFrom):
            return st.level > 0 or (st.module or "").split(".")[0] == "cifarx"
        return isinstance(st, ast.Import) and all(a.name.split(".")[0] == "cifarx"
                                                  for a in st.names)

    def key(st):
        if isinstance(st, ast.Import):
            return 0, 0, st.names[0].name
        return 1, -st.level, st.module or ""

    runs = []
    blocks = [n.body for n in ast.walk(tree) if isinstance(getattr(n, "body", None), list)]
    for body in blocks:
        current = []
        for st in body + [None]:
            if st is not None and local(st) and (
                    not current or st.lineno == current[-1].end_lineno + 1):
                current.append(st)
                continue
            if len(current) > 1:
                runs.append(current)
            current = [st] if st is not None and local(st) else []
    for run in sorted(runs, key=lambda r: r[0].lineno, reverse=True):
        chunks = ["\n".join(lines[st.lineno - 1:st.end_lineno]) for st in run]
        ordered = [c for _, c in sorted(zip(run, chunks), key=lambda sc: key(sc[0]))]
        lines[run[0].lineno - 1:run[-1].end_lineno] = "\n".join(ordered).split("\n")
    return "\n".join(lines)


# --- the whole run ---------------------------------------------------------------------------------

def module_file(module: str) -> str:
    """cifarx.a.b -> framework/a/b.py (a package: its __init__.py)"""
    rel = module.split(".", 1)[1] if "." in module else ""
    if rel in PACKAGES or rel == "":
        return f"framework/{rel}/__init__.py".replace("//", "/")
    return f"framework/{rel.replace('.', '/')}.py"


def python_files(repo: Path) -> list[Path]:
    files = []
    for top in PY_DIRS:
        root = repo / top
        if root.is_dir():
            files += [p for p in root.rglob("*.py")
                      if ".venv" not in p.parts and "__pycache__" not in p.parts
                      and not p.is_relative_to(repo / "tools" / "relayout.py")]
    return sorted(set(files) - {repo / "tools" / "relayout.py"})


def refuse(repo: Path):
    framework = repo / "framework"
    if not framework.is_dir():
        sys.exit(f"relayout: {framework} is not there: not a cifarx checkout")
    laid_out = [p for p in ["_moved.py"] + [f"{pkg}/__init__.py" for pkg in PACKAGES]
                if (framework / p).exists()]
    if laid_out:
        sys.exit(f"relayout: already laid out (framework/{laid_out[0]} exists): nothing done")
    dirty = git(repo, "status", "--porcelain", "--untracked-files=no").strip()
    if dirty:
        sys.exit("relayout: the checkout has uncommitted changes to tracked files; commit or "
                 "stash them first:\n" + dirty)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    args = parser.parse_args()
    repo = args.repo.resolve()
    refuse(repo)
    plan = load_plan(repo)

    print("relayout: moves")
    for old, new in MOVES.items():
        if old in plan.old:
            print(f"  framework/{old}.py -> {module_file('cifarx.' + new)}")
    print("relayout: splits")
    for old in SPLITS:
        if old not in plan.old:
            continue
        by_part: dict[str, list[str]] = {}
        for unit in plan.units[old]:
            by_part.setdefault(unit.part, []).extend(unit.names)
        for part, names in by_part.items():
            print(f"  framework/{old}.py -> {module_file('cifarx.' + part)}: {', '.join(names)}")
    if args.dry_run:
        return

    # 1. every file's new text, computed from the old tree
    results: dict[str, str] = {}  # repo-relative path -> text
    origin: dict[str, str] = {}  # repo-relative path -> the file its text came from
    moves: list[tuple[str, str]] = []
    for old, source in plan.old.items():
        if old in SPLITS:
            continue
        new = plan.new_module(old) if old in MOVES else f"cifarx.{old}" if old != "__init__" \
            else "cifarx"
        text = sort_local_imports(Rewriter(
            plan, source, f"cifarx.{old}" if old != "__init__" else "cifarx", old == "__init__",
            new, old == "__init__", True).run())
        path = module_file(new) if old in MOVES else f"framework/{old}.py"
        if old in MOVES:
            moves.append((f"framework/{old}.py", path))
        results[path] = text
        origin[path] = f"framework/{old}.py"
    for old in SPLITS:
        if old not in plan.old:
            continue
        split = SPLITS[old]
        for part, text in build_parts(plan, old).items():
            module = "cifarx." + part
            text = Rewriter(plan, text, f"cifarx.{old}", False, module, part in PACKAGES,
                            True).run()
            text = add_sibling_imports(plan, old, part, text)
            if part == "cli":
                text = cli_registration(plan, old, text)
            text = prune_imports(sort_local_imports(text))
            results[module_file(module)] = text
            origin[module_file(module)] = f"framework/{old}.py"
        moves.append((f"framework/{old}.py", module_file("cifarx." + split.heir)))
    check_command_order(results)
    for path in python_files(repo):
        rel = str(path.relative_to(repo))
        if rel.startswith("framework/") and path.parent == repo / "framework":
            continue  # done above
        inside_pkg = rel.startswith("plugins/")
        module = "cifarx.plugins" + ("" if path.stem == "__init__" else f".{path.stem}") \
            if inside_pkg else None
        text = path.read_text()
        try:
            new = Rewriter(plan, text, module, path.stem == "__init__", module,
                           path.stem == "__init__", rel.startswith(("framework/", "plugins/"))
                           ).run()
        except SyntaxError:
            warn(f"{rel} does not parse: left alone")
            continue
        if new != text:
            results[rel] = sort_local_imports(new)

    # 2. the packages, the alias table, its test
    made = sorted({rel.split("/")[1] for rel in results
                   if rel.startswith("framework/") and rel.count("/") == 2})
    for pkg in made:
        init = f"framework/{pkg}/__init__.py"
        if init in results:
            continue
        if pkg in SPLITS and SPLITS[pkg].package_doc:
            results[init] = package_init(plan, pkg)
        else:
            results[init] = f'"""{PACKAGE_DOCS[pkg]}\n"""\n'
    results["framework/__init__.py"] = with_aliases(results.get("framework/__init__.py") or
                                                   plan.old["__init__"])
    results["framework/_moved.py"] = moved_module(plan)
    results["tests/test_layout.py"] = LAYOUT_TEST.replace("@LIMIT@", str(LIMIT)).replace(
        "@LONGER@", "\n".join(f'    "{k}": "{v}",' for k, v in LONGER.items()))

    for old in SPLITS:  # every name of a split module is in exactly one of its parts
        if old not in plan.old:
            continue
        seen: dict[str, str] = {}
        for rel, text in results.items():
            if origin.get(rel) == f"framework/{old}.py":
                for st in ast.parse(text).body:
                    for name in defined_names(st):
                        if name in seen:
                            sys.exit(f"relayout: {old}.{name} landed in {seen[name]} and {rel}")
                        seen[name] = rel
        lost = plan.names[old] - set(seen)
        if lost:
            sys.exit(f"relayout: {old}.py's {sorted(lost)} landed nowhere: nothing done")
    for rel, text in results.items():
        try:
            ast.parse(text)
        except SyntaxError as exc:
            sys.exit(f"relayout: the new {rel} does not parse ({exc}): nothing done")
    for rel, text in sorted(results.items()):  # references rewritten in place can get long
        source = repo / origin.get(rel, rel)
        before = source.read_text() if source.exists() else ""
        known = set(before.split("\n"))
        results[rel] = text = reflow(text, known)
        for number, line in enumerate(text.split("\n"), 1):
            if len(line) > 100 and line not in known:
                warn(f"{rel}:{number} is {len(line)} characters now (wrap it)")

    # 3. write: git mv first (history follows), then the texts
    for folder, (dest, reader) in DATA_MOVES.items():
        if (repo / "framework" / folder).is_dir() and reader in plan.old:
            moves.append((f"framework/{folder}", f"framework/{dest}"))
    touched: list[str] = []
    for src, dst in moves:
        (repo / dst).parent.mkdir(parents=True, exist_ok=True)
        git(repo, "mv", src, dst)
        print(f"relayout: git mv {src} {dst}")
    for rel, text in sorted(results.items()):
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        before = path.read_text() if path.exists() else None
        if before != text:
            path.write_text(text)
            print(f"relayout: {'wrote' if before is None else 'rewrote'} {rel}")
            touched.append(rel)
    for rel in markdown_and_text(repo):
        path = repo / rel
        text = path.read_text()
        mode = "md" if rel.endswith(".md") else "text"
        new = rewrite_text(plan, text, "md", inside=False) if mode == "md" else \
            rewrite_text(plan, text, "md", inside=False)
        if new != text:
            path.write_text(new)
            print(f"relayout: rewrote references in {rel}")
            touched.append(rel)
    packages_in_pyproject(repo, made, [(src, dst) for src, dst in moves
                                       if not src.endswith(".py")])
    git(repo, "add", "--", "pyproject.toml", *touched)  # only what it wrote; git mv staged the rest
    print(f"relayout: done, {len(WARNINGS)} warning(s); staged, not committed. Check: "
          "git status; .venv/bin/python -m pytest -q tests/test_layout.py; "
          "time .venv/bin/cifarx --help")


def registers(plan: Plan, unit: Unit) -> str | None:
    """``from . import cli_report`` in cli.py (it registers commands): the cli module it is
    now, which cli/__init__.py imports with the others."""
    node = unit.node
    if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module and \
            len(node.names) == 1 and node.names[0].name in MOVES and \
            MOVES[node.names[0].name].startswith("cli."):
        return MOVES[node.names[0].name].split(".")[1]
    return None


def command_modules(text: str) -> list[str]:
    """The command modules cli/__init__.py imports, in order."""
    for st in ast.parse(text).body:
        if isinstance(st, ast.ImportFrom) and st.level == 1 and not st.module:
            return [a.name for a in st.names]
    return []


def check_command_order(results: dict[str, str]):
    """A command module that imports a later one at module level registers that one's commands
    first, and ``cifarx --help`` lists them out of order: say so."""
    init = results.get("framework/cli/__init__.py")
    if not init:
        return
    order = command_modules(init)
    for i, leaf in enumerate(order):
        tree = ast.parse(results[f"framework/cli/{leaf}.py"])
        for st in tree.body:
            if isinstance(st, ast.ImportFrom) and st.level == 1 and st.module in order[i + 1:]:
                warn(f"cli/{leaf}.py imports cli/{st.module}.py: `cifarx --help` lists "
                     f"{st.module}'s commands before {leaf}'s (move what they share to "
                     f"cli/common.py)")


def reflow(text: str, known: set[str], width: int = 100) -> str:
    """Rewrap the rest of a docstring or comment paragraph whose line a longer path made too
    long (a line that was there before, long or not, is left as it was)."""
    lines = text.split("\n")

    def multiline_strings() -> set[int]:
        found = set()  # numbers of the lines inside a multi-line string
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline):
            if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
                found.update(range(tok.start[0], tok.end[0] + 1))
        return found

    try:
        strings = multiline_strings()
    except (tokenize.TokenError, SyntaxError):
        return text
    i = 0
    while i < len(lines):
        line = lines[i]
        if len(line) <= width or line in known:
            i += 1
            continue
        indent = line[:len(line) - len(line.lstrip())]
        comment = line.lstrip().startswith("#")
        one_line = re.fullmatch(r'\s*[rbuRBU]*("""|\'\'\').*\1', line) is not None
        if not comment and i + 1 not in strings and not one_line:
            i += 1
            continue
        lead = indent + ("# " if comment else "")
        first = re.match(r"\s*(# |#|[rbuRBU]*\"\"\"|[rbuRBU]*\'\'\')?", line).group(0)
        if not comment and first.strip() and i + 1 in strings and i > 0 and i in strings:
            first = indent  # a quote inside the docstring's text, not its start
        paragraph = [line[len(first):]]
        j = i + 1
        while j < len(lines) and not one_line and not lines[j].rstrip().endswith("::") and \
                not ('"""' in paragraph[-1] or "\'\'\'" in paragraph[-1]):
            nxt = lines[j]
            body = nxt[len(lead):]
            if not nxt.startswith(lead) or not body.strip() or body[:1].isspace() or \
                    body.strip() in ('"""', "\'\'\'") or \
                    re.match(r"[-*] |>>>|\.\. |:\w+:", body.strip()) or \
                    (not comment and j + 1 not in strings) or \
                    (comment and not nxt.lstrip().startswith("#")):
                break
            paragraph.append(body)
            j += 1
        if paragraph[0].rstrip().endswith("::"):
            i += 1
            continue
        words = " ".join(p.strip() for p in paragraph).split(" ")
        out, cur = [], first
        for word in words:
            candidate = cur + ("" if cur in (first, lead) else " ") + word
            if len(candidate) > width and cur not in (first, lead):
                out.append(cur)
                cur = lead + word
            else:
                cur = candidate
        out.append(cur)
        lines[i:j] = out
        i += len(out)
        strings = multiline_strings()  # the lines below moved
    return "\n".join(lines)


def cli_registration(plan: Plan, old: str, text: str) -> str:
    """cli/__init__.py imports the command modules, in the order the old file had the
    commands (``cifarx --help`` lists them in that order)."""
    order = []
    for unit in plan.units[old]:
        node = unit.node
        decorated = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
            ast.unparse(d).split("(")[0] in ("command", "app.command") for d in node.decorator_list)
        if decorated and unit.part not in order and unit.part != "cli":
            order.append(unit.part)
        elif registers(plan, unit):
            order.append("cli." + registers(plan, unit))
    leaves = [p.rpartition(".")[2] for p in order]
    line = f"from . import {', '.join(leaves)}  # noqa: F401  registers the commands, in order"
    if len(line) > 99:
        line = (f"from . import (  # noqa: F401  registers the commands, in --help's order\n    "
                + ", ".join(leaves) + ")")
    tree = ast.parse(text)
    imports = [st for st in tree.body if isinstance(st, (ast.Import, ast.ImportFrom))]
    lines = text.split("\n")
    at = imports[-1].end_lineno if imports else (docstring_node(tree).end_lineno + 1)
    lines[at:at] = [line]
    text = "\n".join(lines)
    # `app` is the package's: `from cifarx.cli import app`
    if "app" not in {a.asname or a.name for st in imports for a in st.names}:
        lines = text.split("\n")
        lines[at:at] = ["from .common import app"]
        text = "\n".join(lines)
    tree = ast.parse(text)
    if not any(isinstance(st, ast.Assign) and getattr(st.targets[0], "id", "") == "__all__"
               for st in tree.body):
        text = text.rstrip("\n") + '\n\n\n__all__ = ["app", "main"]\n'
    return text


def package_init(plan: Plan, old: str) -> str:
    """A split module's package: the old docstring, and (EXPORTED) its names re-exported."""
    split = SPLITS[old]
    tree = ast.parse(plan.old[old])
    doc = docstring_node(tree)
    lines = plan.old[old].split("\n")
    text = "\n".join(lines[doc.lineno - 1:doc.end_lineno]) + "\n" if doc else ""
    if old in PACKAGE_DOCS:
        text = f'"""{PACKAGE_DOCS[old]}\n"""\n'
    if old in EXPORTED and EXPORTED[old] == "public":
        by_part: dict[str, list[str]] = {}
        for name in plan.public[old]:
            by_part.setdefault(plan.part_of[(old, name)], []).append(name)
        text += "\n"
        for part in sorted(by_part, key=lambda p: list(split.parts).index(p)
                           if p in split.parts else 99):
            text += render_from(relative_spec("cifarx." + part, "cifarx." + old, True),
                                by_part[part], "") + "\n"
        names = [n for p in by_part.values() for n in p]
        text += "\n__all__ = [" + ", ".join(f'"{n}"' for n in names) + "]\n"
        text = wrap_all(text)
    return text


def wrap_all(text: str) -> str:
    out = []
    for line in text.split("\n"):
        if line.startswith("__all__ = [") and len(line) > 99:
            items = line[len("__all__ = ["):-1].split(", ")
            cur = "__all__ = ["
            for i, item in enumerate(items):
                piece = item + ("," if i < len(items) - 1 else "]")
                if cur.endswith("[") or len(cur) + 1 + len(piece) <= 99:
                    cur += ("" if cur.endswith("[") else " ") + piece
                else:
                    out.append(cur)
                    cur = " " * len("__all__ = [") + piece
            out.append(cur)
        else:
            out.append(line)
    return "\n".join(out)


def with_aliases(text: str) -> str:
    tree = ast.parse(text)
    imports = [st for st in tree.body if isinstance(st, (ast.Import, ast.ImportFrom))]
    lines = text.split("\n")
    at = imports[-1].end_lineno
    lines[at:at] = ["from . import _moved  # noqa: F401  keeps the old module paths working"]
    return sort_local_imports("\n".join(lines))


def moved_module(plan: Plan) -> str:
    table = {f"cifarx.{old}": plan.new_module(old) for old in sorted(plan.old)
             if plan.aliased(old)}
    rows = "\n".join(f'    "{k}": "{v}",' for k, v in table.items())
    return MOVED_MODULE.replace("@TABLE@", rows)


def markdown_and_text(repo: Path) -> list[str]:
    found = []
    for pattern in MD_GLOBS:
        found += [str(p.relative_to(repo)) for p in repo.glob(pattern)
                  if ".venv" not in p.parts]
    found += [f for f in TEXT_FILES if (repo / f).is_file()]
    return sorted(set(found))


def packages_in_pyproject(repo: Path, made: list[str], data: list[tuple[str, str]]):
    """The new packages in ``packages = [...]``; package data that moved, under its package."""
    path = repo / "pyproject.toml"
    text = path.read_text()
    for src, dst in data:
        folder = src.split("/", 1)[1]
        package = "cifarx." + ".".join(dst.split("/")[1:-1])
        entry = re.compile(r'"cifarx"(\s*=\s*)\[([^\]]*)\]')
        m = entry.search(text)
        patterns = [x.strip().strip('"\'') for x in m.group(2).split(",") if x.strip()] \
            if m else []
        if patterns and all(x.startswith(folder + "/") for x in patterns):
            text = text[:m.start()] + f'"{package}"{m.group(1)}[{m.group(2)}]' + text[m.end():]
            print(f"relayout: pyproject.toml package data of {folder}/ now under {package}")
        else:
            warn(f"pyproject.toml: move the package data of framework/{folder} to {package}")
    pattern = re.compile(r'^(packages\s*=\s*)\[([^\]]*)\]', re.M)
    m = pattern.search(text)
    if not m:
        warn("pyproject.toml has no `packages = [...]`: add " +
             ", ".join(f"cifarx.{p}" for p in made))
        path.write_text(text)
        return
    have = [s.strip().strip('"\'') for s in m.group(2).split(",") if s.strip()]
    want = list(dict.fromkeys(have[:1] + [f"cifarx.{p}" for p in made] + have[1:]))
    listed = ", ".join(f'"{p}"' for p in want)
    new = f"{m.group(1)}[{listed}]"
    if len(new) > 99:
        new = m.group(1) + "[\n" + "".join(f'    "{p}",\n' for p in want) + "]"
    text = text[:m.start()] + new + text[m.end():]
    path.write_text(text)
    print("relayout: pyproject.toml packages: " + ", ".join(want))


MOVED_MODULE = '''"""The module paths cifarx had before its packages (issue 18), kept working.

``import cifarx.trials`` gives the module that is now ``cifarx.studies.trials``: the same module
object (so ``cifarx.trials.Trial is cifarx.studies.trials.Trial``). Plugins, scripts and
pickles (a model saved with ``torch.save`` names its classes' modules) written against the old
paths keep working. A finder at the end of ``sys.meta_path`` answers for these names only, and
imports nothing until one of them is imported. The code in this repository uses the new paths
(tests/test_layout.py checks it).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

MOVED = {  # old path -> where the module is now
@TABLE@
}


class _Aliases:
    """Finder and loader: the old name's module is replaced by the new one in sys.modules (the
    import system returns what sys.modules holds once the loader is done)."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None  # a placeholder, replaced in exec_module

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


if not any(isinstance(finder, _Aliases) for finder in sys.meta_path):
    sys.meta_path.append(_Aliases())
'''


LAYOUT_TEST = '''"""framework/ as packages (issue 18): no import circle, no module over @LIMIT@ lines but the
listed ones, the old module paths give the same modules, and the code here uses the new ones."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cifarx._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = ROOT / "framework"
LIMIT = @LIMIT@
LONGER = {  # path under framework/ -> why it stays whole
@LONGER@
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(FRAMEWORK.rglob("*.py")):
        rel = path.relative_to(FRAMEWORK).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(("cifarx",) + parts)] = path
    return found


def module_level_imports(name: str, path: Path, known) -> set[str]:
    """The cifarx modules ``name`` imports when it is imported (not those its functions import,
    nor those under ``if TYPE_CHECKING``), with the packages they are in."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    own = set()
    up = name
    while up:
        own.add(up)
        up = up.rpartition(".")[0]

    def add(module):  # importing a module imports its packages (those not around this one)
        while module and module not in own:
            if module in known:
                found.add(module)
            module = module.rpartition(".")[0]

    def visit(statements):
        for st in statements:
            if isinstance(st, ast.Import):
                for a in st.names:
                    add(a.name)
            elif isinstance(st, ast.ImportFrom):
                base = st.module or ""
                if st.level:
                    base = package
                    for _ in range(st.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{st.module}" if st.module else base
                add(base)
                for a in st.names:
                    add(f"{base}.{a.name}") if f"{base}.{a.name}" in known else None
            elif isinstance(st, ast.If) and "TYPE_CHECKING" in ast.unparse(st.test):
                continue
            elif isinstance(st, (ast.If, ast.Try, ast.With)):
                visit(st.body)
                visit(getattr(st, "orelse", []))
                for handler in getattr(st, "handlers", []):
                    visit(handler.body)
                visit(getattr(st, "finalbody", []))

    visit(tree.body)
    found.discard(name)
    return found


def test_no_import_circle():
    known = modules()
    graph = {name: module_level_imports(name, path, known) for name, path in known.items()}
    circles = []
    state = {}

    def walk(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_every_module_imports():
    names = sorted(name for name in modules() if not name.endswith("__main__"))
    code = "import importlib, sys\\nfor name in sys.argv[1:]:\\n    importlib.import_module(name)"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_module_is_too_long():
    long = {str(path.relative_to(FRAMEWORK)): len(path.read_text().splitlines())
            for path in modules().values()}
    over = {path: n for path, n in long.items() if n > LIMIT and path not in LONGER}
    assert not over, f"over {LIMIT} lines (split them, or list them in LONGER with why): {over}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == MOVED[old] and sys.modules[old] is module


def test_the_documented_paths():
    """What the README, examples/ and plugins/ import by the old paths is what the new paths
    hold."""
    import cifarx.studies.trials as trials
    import cifarx.training.data as data
    from cifarx.cli import app, main
    from cifarx.config import TrainConfig
    from cifarx.data import download, extract, gunzip, md5sum
    from cifarx.runs import Tracking, train_run
    from cifarx.trials import Outcome, Trial, run_trial

    assert (Outcome, Trial, run_trial) == (trials.Outcome, trials.Trial, trials.run_trial)
    assert (download, extract, gunzip, md5sum) == (data.download, data.extract, data.gunzip,
                                                   data.md5sum)
    assert TrainConfig.__module__ == "cifarx.training.config"
    assert (Tracking.__module__, train_run.__module__) == ("cifarx.runs.common",
                                                           "cifarx.runs.train")
    assert callable(app) and callable(main)
    for old in ("adversarial", "evaluation", "figures", "hookspecs", "options", "plugin_types",
                "registry", "testing"):
        importlib.import_module(f"cifarx.{old}")


def test_the_code_here_uses_the_new_paths():
    old = {path.split(".")[1] for path in MOVED}
    found = []
    for top in ("framework", "plugins", "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "test_layout.py" or path.name == "_moved.py":
                continue
            tree = ast.parse(path.read_text())
            for st in ast.walk(tree):
                if isinstance(st, ast.ImportFrom) and st.module and not st.level:
                    bits = st.module.split(".")
                    if bits[0] == "cifarx" and len(bits) == 2 and bits[1] in old:
                        found.append(f"{path.relative_to(ROOT)}:{st.lineno}")
                    if st.module == "cifarx" and {a.name for a in st.names} & old:
                        found.append(f"{path.relative_to(ROOT)}:{st.lineno}")
                elif isinstance(st, ast.Import):
                    for a in st.names:
                        bits = a.name.split(".")
                        if bits[0] == "cifarx" and len(bits) == 2 and bits[1] in old:
                            found.append(f"{path.relative_to(ROOT)}:{st.lineno}")
    assert not found, f"old module paths (see framework/_moved.py): {found}"
'''


if __name__ == "__main__":
    main()
