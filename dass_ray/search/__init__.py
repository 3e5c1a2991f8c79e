"""The search on Ray: encoder actors -> predictor replicas -> a score-driven Tune searcher -> KD trials.

`prepare` checks the inputs (no Ray), `SearchRun` runs the stages, `cli` is `scripts/search.py`. Names are
imported lazily: an actor process that imports `dass_ray.search.scoring` must not pull in Tune with this package.
"""
import importlib

_EXPORTS = {"SearchConfig": "inputs", "Prepared": "inputs", "prepare": "inputs", "InputError": "inputs",
            "DEFAULT_TEACHER": "inputs", "DEFAULT_PREDICTOR": "inputs", "teacher_range_warning": "inputs",
            "near_chance_teacher_warning": "inputs",
            "DaSSSearcher": "searcher", "SearchRun": "run", "EventLog": "run", "kd_trainable": "trainable"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dass_ray.search' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dass_ray.search.{_EXPORTS[name]}"), name)
