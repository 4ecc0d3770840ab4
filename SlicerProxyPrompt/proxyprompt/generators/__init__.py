"""Auto-prompt generators (plug-ins with one interface and a registry)."""

import importlib

from .base import (  # noqa: F401
    Corrections,
    Generator,
    GeneratorContext,
    ObjectPrompt,
    PromptPlan,
    ReferenceCase,
    SupportSlice,
    get_generator,
    list_generators,
    register_generator,
)

_BUILTIN = ("registration", "support_memory", "warp", "proxy_prompt")


def load_builtin_generators() -> None:
    for module in _BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module}":
                raise
