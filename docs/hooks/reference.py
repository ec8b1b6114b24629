"""MkDocs hook: the Reference pages, generated from the code at build time.

Every ``cifarx`` import the documentation needs is in this file (the package layout may move;
only this file then changes). A page asks for generated text with a marker on a line of its
own:

- ``<!-- cifarx:commands -->``  every command of ``cifarx`` and its options (the Typer app,
  read through click, as ``cifarx COMMAND --help`` prints them);
- ``<!-- cifarx:plugins -->``   every built-in plugin by kind, with its options as
  ``cifarx describe KIND NAME`` prints them (the plugin catalog's option schema);
- ``<!-- cifarx:hookspecs -->`` every hook a plugin can implement, with its docstring.

The functions below return Markdown and need no MkDocs: ``tests/test_meta.py`` calls them.
"""

from __future__ import annotations

import inspect
import os
import re
import sys

MARKERS = {
    "<!-- cifarx:commands -->": "commands_markdown",
    "<!-- cifarx:plugins -->": "plugins_markdown",
    "<!-- cifarx:hookspecs -->": "hookspecs_markdown",
}

# A family answers for every name under its prefix; its options are those of a member, so the
# reference shows one member's (any model timm knows takes the same options).
FAMILY_EXAMPLES = {"timm:": "resnet18"}


def cell(text) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, rich's \\[ escapes undone, and
    <...> outside code spans shown as text (``timm:<model>``), not taken for HTML."""
    text = " ".join(str(text).split()).replace("\\[", "[")
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{text}`" if text else ""


# --- commands --------------------------------------------------------------------------------

def _app():
    """The ``cifarx`` command as click sees it (Typer builds a click group)."""
    import typer.main

    from cifarx.cli import app

    return typer.main.get_command(app)


_TAIL = re.compile(r"\s*\[(default: (?P<default>.*)|(?P<required>required))\]$")


def _help_record(param, ctx) -> tuple[str, str, str]:
    """(flags as --help shows them, help, default) from click's own help record."""
    flags, text = param.get_help_record(ctx)
    default, required = "", False
    while (tail := _TAIL.search(text)):
        default = tail["default"] or default
        required = required or bool(tail["required"])
        text = text[:tail.start()]
    if required:
        text = "**Required.** " + text
    return flags, text, default


def command_names() -> list[str]:
    import typer

    group = _app()
    return group.list_commands(typer.Context(group))


def commands_markdown() -> str:
    import typer

    group = _app()
    ctx = typer.Context(group, info_name="cifarx")
    out = [cell(group.help or ""), ""]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sub = typer.Context(command, info_name=name, parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub))
        out += [f"## cifarx {name}", "", f"```text\ncifarx {name} {usage}\n```", "",
                cell(command.help or ""), ""]
        for argument in command.params:
            if argument.param_type_name == "argument" and not argument.hidden:
                out += [f"Argument `{argument.metavar or argument.name.upper()}`: "
                        f"{cell(argument.help or '')}", ""]
        out += ["| option | what | default |", "| --- | --- | --- |"]
        for option in command.params:
            if option.param_type_name != "option" or option.hidden:
                continue
            flags, text, default = _help_record(option, sub)
            out.append(f"| {code(flags)} | {cell(text)} | {code(default)} |")
        out += ["| `--help` | Show the command's options and exit. | |", ""]
    return "\n".join(out)


# --- plugins ---------------------------------------------------------------------------------

KIND_TITLES = {"dataset": "Datasets", "augmentation": "Augmentations",
               "architecture": "Architectures", "probe": "Probes", "attack": "Attacks",
               "executor": "Executors", "analysis": "Analyses"}


def builtin_entries() -> list:
    """The built-in plugins' catalog entries, whatever else is installed."""
    from cifarx.testing import use_plugins

    with use_plugins() as registry:
        found = registry.catalog()
    if found.problems:
        raise RuntimeError(f"the built-in plugins report problems: {found.problems}")
    return [e for e in found.entries if e.builtin]


def _options_table(kind: str, name: str, options) -> list[str]:
    from cifarx.plugin_api.options import describe
    from cifarx.training.config import OPTION_FLAGS

    if not options:
        return ["Takes no options.", ""]
    flag = OPTION_FLAGS[kind][0]
    shape = "NAME=VALUE" if kind in ("architecture", "attack", "dataset", "executor") else \
        f"{name}.NAME=VALUE"
    rows = [f"Set with `{flag} {shape}`:", "", "| option | default | accepted | help |",
            "| --- | --- | --- | --- |"]
    for option, default, accepted, help_text in describe(options):
        rows.append(f"| `{option}` | {cell(default)} | {cell(accepted)} | {cell(help_text)} |")
    return rows + [""]


def _facts(kind: str, item) -> list[str]:
    """What else ``cifarx describe`` or the plugin type says about one plugin."""
    facts = []
    if kind == "augmentation":
        facts.append(f"stage `{item.stage}`")
    if kind == "dataset":
        c, h, w = item.image_shape
        facts.append(f"splits {', '.join(code(s) for s in item.splits)} (the first is the "
                     f"default); {c}x{h}x{w} images, {item.num_classes} classes by default")
    if kind == "architecture" and item.defaults:
        facts.append("trains by default with " + ", ".join(
            f"`{k}={v}`" for k, v in item.defaults.items()))
    if kind == "analysis" and item.adversarial:
        facts.append("also looks at adversarial images (`--adversarial`)")
    return facts


def plugin_names() -> dict[str, list[str]]:
    """The built-in names by kind (a family as ``prefix*``)."""
    names: dict[str, list[str]] = {}
    for entry in builtin_entries():
        names.setdefault(entry.kind, []).append(entry.name)
    return {kind: sorted(found) for kind, found in names.items()}


def plugins_markdown() -> str:
    from cifarx import Family

    entries = builtin_entries()
    out = []
    for kind, title in KIND_TITLES.items():
        found = sorted((e for e in entries if e.kind == kind), key=lambda e: e.name)
        out += [f"## {title}", "",
                ", ".join(f"[`{e.name}`](#{anchor(kind, e.name)})" for e in found), ""]
        for entry in found:
            item = entry.item
            out += [f'### {kind} `{entry.name}` {{ #{anchor(kind, entry.name)} }}', "",
                    cell(entry.summary), ""]
            if isinstance(item, Family):
                example = FAMILY_EXAMPLES.get(item.prefix)
                out += [f"A family: every name `{item.prefix}<name>` (`cifarx describe "
                        f"{kind} {item.prefix}<name>`)."
                        + (f" The options of `{item.prefix}{example}`, as of every member:"
                           if example else ""), ""]
                if not example:
                    continue
                item = item.resolve(example)
            facts = _facts(kind, item)
            if facts:
                out += ["; ".join(facts).capitalize() + ".", ""]
            out += _options_table(kind, item.name if not isinstance(entry.item, Family)
                                  else entry.name.rstrip("*") + "<name>", item.options)
    return "\n".join(out)


def anchor(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- hookspecs -------------------------------------------------------------------------------

def hook_names() -> list[str]:
    from cifarx.plugin_api import hookspecs

    return sorted(name for name, f in vars(hookspecs).items() if hasattr(f, "cifarx_spec"))


def hookspecs_markdown() -> str:
    from cifarx.plugin_api import hookspecs
    from cifarx.plugin_api.types import KINDS

    registers = {hook: cls.__name__ for hook, cls in KINDS.values()}
    out = []
    for name in hook_names():
        doc = inspect.cleandoc(getattr(hookspecs, name).__doc__ or "")
        out += [f"### `{name}(register)`", "", doc, "",
                f"`register` takes a `cifarx.{registers[name]}` or a `cifarx.Family`.", ""]
    return "\n".join(out)


# --- the MkDocs hook -------------------------------------------------------------------------

_cache: dict[str, str] = {}


def on_startup(command, dirty):
    # `mkdocs` started as a script puts its bin/ folder first on sys.path, and mkdocstrings
    # (griffe) would take the `cifarx` console script there for the package: leave it out.
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "cifarx"))]


_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc):(?=<code>)")


def on_page_content(html: str, page, config, files) -> str:
    # The docstrings cross-reference in Sphinx's roles (:class:`cifarx.UserError`); mkdocstrings
    # shows the name as code and the role as text: drop the role.
    return _SPHINX_ROLE.sub("", html)


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, function in MARKERS.items():
        if marker in markdown:
            if function not in _cache:
                _cache[function] = globals()[function]()
            markdown = markdown.replace(marker, _cache[function])
    return markdown
