"""metassl: self-supervised meta-learning on Ray.

The Python API lives in `metassl/api.py`: `metassl.train`, `load`, `evaluate`, `evaluate_shapes`, `export` and
the `Run`, `Learner` and `Predictor` types. They are imported on first use, so
`import metassl` loads neither torch nor Ray. (The training loop is `metassl.trainer`,
held-out evaluation `metassl.evaluation`.)
"""
import importlib

__version__ = "0.1.0"

_API = ("train", "load", "evaluate", "evaluate_shapes", "export", "Run", "Learner", "Predictor")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
