"""``cifarx plugins`` and ``cifarx describe``: what is installed, and what a plugin takes."""

from __future__ import annotations

import functools
import json
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .common import ArchOpt, command, plugins_catalog


@command
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """List the installed plugins: name, kind, package, version, summary."""
    from rich.markup import escape
    from rich.table import Table

    from .console import out

    found = plugins_catalog()
    clashes = set(found.clashes())
    rows = [dict(name=e.name, kind=e.kind, package=e.package, version=e.version,
                 summary=e.summary, clash=(e.kind, e.name) in clashes)
            for e in sorted(found.entries, key=lambda e: (e.kind, e.name, e.package))]
    if as_json:
        typer.echo(json.dumps({"plugins": rows, "problems": found.problems}, indent=2))
        return
    table = Table("name", "kind", "package", "version", "summary", title="cifarx plugins")
    for row in rows:
        name = f"[red]{row['name']} (clash)[/]" if row["clash"] else row["name"]
        table.add_row(name, row["kind"], row["package"], row["version"], row["summary"])
    out.print(table)
    if clashes:
        out.print("[red]names in red are registered by more than one package; using them is "
                  "an error:[/]")
        for kind, name in sorted(clashes):
            out.print(f"[red]  {escape(found.clash_advice(kind, name))}[/]", highlight=False,
                      soft_wrap=True)


@command
def describe(
    first: Annotated[str, typer.Argument(
        metavar="[KIND] NAME", help="A plugin: KIND NAME (architecture, augmentation, dataset, "
        "probe, attack, executor, analysis), or an architecture's NAME alone.")],
    name: Annotated[Optional[str], typer.Argument(hidden=True)] = None,
    dataset: Annotated[str, typer.Option(
        help="Architectures: the dataset whose image shape and classes to build for.")] = "cifar10",
    image_size: Annotated[Optional[int], typer.Option(
        help="Architectures: input height and width (default: the dataset's).",
        show_default=False)] = None,
    channels: Annotated[Optional[int], typer.Option(
        help="Architectures: input channels (default: the dataset's).", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option(
        help="Architectures: output classes (default: the dataset's).", show_default=False)] = None,
    arch_opt: ArchOpt = None,
):
    """A plugin's summary and options; for an architecture, its layers, output shapes and
    parameters too."""
    from rich.table import Table

    from ..plugin_api.options import describe as option_rows
    from ..plugin_api.types import KINDS
    from ..training.config import resolve_plugin_options
    from .console import out

    kind, plugin_name = ("architecture", first) if name is None else (first, name)
    if kind not in KINDS:
        raise UserError(f"unknown plugin kind {kind!r}; accepted: {', '.join(KINDS)}")
    found = plugins_catalog()
    plugin = found.get(kind, plugin_name)
    if kind == "architecture":
        describe_architecture(found, plugin, dataset, image_size, channels, num_classes,
                              resolve_plugin_options(kind, plugin, arch_opt or []))
    else:
        stage = f" (stage {plugin.stage})" if kind == "augmentation" else ""
        out.print(f"[bold]{kind} {plugin.name}[/]{stage}: {plugin.summary}", soft_wrap=True)
    if plugin.options:
        from ..training.config import OPTION_FLAGS

        flag = OPTION_FLAGS[kind][0]
        shape = "NAME=VALUE" if kind in ("architecture", "attack", "dataset", "executor") else \
            f"{plugin.name}.NAME=VALUE"
        table = Table("option", "default", "accepted", "help", title=f"{flag} {shape}")
        for row in option_rows(plugin.options):
            table.add_row(*row)
        out.print(table)
    else:
        out.print(f"{plugin.name} takes no options")


def describe_architecture(found, arch, dataset, image_size, channels, num_classes, values):
    from rich.table import Table

    from ..training.loop import plugin_call
    from ..training.model import describe as layer_rows
    from .console import out

    data = found.get("dataset", dataset)
    channels = channels or data.image_shape[0]
    size = image_size or data.image_shape[1]
    classes = num_classes or data.num_classes
    net = plugin_call("architecture", None, values, functools.partial(
        arch.build, num_classes=classes, in_channels=channels, image_size=size))
    table = Table("layer", "type", "output shape", "params",
                  title=f"{arch.name}: {arch.summary}", caption=f"input {channels}x{size}x{size}; "
                  f"total parameters {sum(p.numel() for p in net.parameters()):,}")
    for row in layer_rows(net, (channels, size, size)):
        table.add_row(row.name, row.kind, " x ".join(map(str, row.output_shape)), f"{row.params:,}")
    out.print(table)
    if arch.defaults:  # what `cifarx train --arch NAME` uses unless the flags say otherwise
        from ..plugin_api.options import brief

        out.print("trains by default with " + ", ".join(
            f"--{key.replace('_', '-')} {brief(value)}" for key, value in arch.defaults.items()),
            soft_wrap=True)
