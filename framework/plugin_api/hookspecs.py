"""One hook per plugin kind.

Each hook receives a ``register`` callback; a plugin calls it once per thing it adds::

    from cifarx import hookimpl, Architecture

    @hookimpl
    def register_architectures(register):
        register(Architecture(name="tiny", build=build_tiny, summary="two convs and a linear head"))

``register`` also accepts a :class:`cifarx.Family`, which answers for every name that starts with
its prefix (``timm:resnet18``, ``timm:vit_tiny_patch16_224``, ...).
"""

import pluggy

hookspec = pluggy.HookspecMarker("cifarx")
hookimpl = pluggy.HookimplMarker("cifarx")


@hookspec
def register_datasets(register):
    """Register datasets with ``register(Dataset(...))``."""


@hookspec
def register_augmentations(register):
    """Register augmentations with ``register(Augmentation(...))``."""


@hookspec
def register_architectures(register):
    """Register model factories with ``register(Architecture(...))``."""


@hookspec
def register_probes(register):
    """Register training probes (gradient statistics, ...) with ``register(Probe(...))``."""


@hookspec
def register_attacks(register):
    """Register adversarial attacks with ``register(Attack(...))``."""


@hookspec
def register_executors(register):
    """Register sweep executors (where a sweep's trials run) with ``register(Executor(...))``."""


@hookspec
def register_analyses(register):
    """Register analyses of trained models (attributions, embeddings, ...) with
    ``register(Analysis(...))``."""
