"""lakd: Local Attention Knowledge Distillation and the baselines it is compared with.

The Python API (imported on first use, so ``import lakd`` stays light)::

    import lakd
    cfg = lakd.load_config("configs/cifar10/lakd/resnet56_resnet20_149.yaml", ["solver.epochs=1"])
    parts = lakd.build(cfg)              # data, student, teacher, distiller, optimizer, scaler
    summary = lakd.Trainer(cfg).fit()    # or train: the run folder, metrics, checkpoints

For one's own models and training loop (docs/api.md): ``lakd.distiller(student, teacher, method)`` builds a
distiller from ``nn.Module`` objects or names; ``lakd.adapt`` puts any ``nn.Module`` behind the feature
interface; ``lakd.create_model`` builds a model by name (``torchvision:``/``timm:``/``module:`` included).

The library reports through ``logging.getLogger("lakd")``; the ``lakd`` command shows those messages.
"""



def _find_version() -> str:
    """The version pyproject.toml declares (its one source): read from the clone's pyproject.toml when lakd runs
    from a source tree, else from the installed distribution's metadata (a wheel install)."""
    import os
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    pyproject = os.path.join(os.path.dirname(here), "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as f:
            text = f.read()
        if re.search(r'^name\s*=\s*"lakd"', text, re.M):
            m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
            if m:
                return m.group(1)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        return version("lakd")
    except Exception:  # not installed and no pyproject beside it (a copied folder)
        return "0+unknown"


__version__ = _find_version()

_API = {
    "load_config": "lakd.config",
    "build": "lakd.engine.build",
    "Trainer": "lakd.engine.trainer",
    "create_model": "lakd.models",
    "build_data": "lakd.data",
    "load_models_and_data": "lakd.engine.loading",
    "distiller": "lakd.api",
    "adapt": "lakd.models",
    "cut_candidates": "lakd.models",
    "Distiller": "lakd.distillers",
    "FeatureNet": "lakd.models",
    "LakdError": "lakd.errors",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lakd' has no attribute {name!r}")


__all__ = ["__version__", *_API]
