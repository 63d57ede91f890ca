"""cmcl: continual multimodal contrastive learning over frozen modality-binding encoders.

The toolkit has two stages around an offline feature cache: ``cmcl.extract`` writes embeddings of
frozen encoders to HDF5 shards (``cmcl.data.features``), and ``cmcl.train`` fits one linear learner
per modality step after step with a continual-learning strategy, scored by ``cmcl.evaluate``.

The public Python API (``docs/api.md``)::

    import cmcl
    run = cmcl.open_run("runs/imagebind/dns/seed-0")
    z = run.embed("text", x)          # numpy or torch in, same type out
    run.metrics                       # the long results as a DataFrame
    split = cmcl.open_split("features", "imagebind", "esc50", "test")

Names load on first use, so ``import cmcl`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "Run", "open_run", "open_split", "export_run", "build_index", "search_index",
           "import_embeddings", "CMCLError"]

_LAZY = {
    "Run": "cmcl.api", "open_run": "cmcl.api", "export_run": "cmcl.api", "build_index": "cmcl.api",
    "search_index": "cmcl.api", "open_split": "cmcl.data.features", "import_embeddings": "cmcl.data.importer",
    "CMCLError": "cmcl.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cmcl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
