"""bnn-probe: diagnose how binarized neural networks are optimized.

Attach a probe to any PyTorch training run, then turn the logs into reports::

    probe = bnn_probe.attach(model, optimizer, "runs/x")
    ...  # train as before
    probe.close()

    run = bnn_probe.load_run("runs/x")   # pandas DataFrames: run.layers, run.steps, run.train
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "attach", "load_run", "Probe", "Run"]


def __getattr__(name: str):  # lazy: `import bnn_probe` stays cheap and the CLI starts fast
    if name in ("attach", "Probe"):
        from . import probe

        return getattr(probe, name)
    if name in ("load_run", "Run"):
        from . import runlog

        return getattr(runlog, name)
    raise AttributeError(f"module 'bnn_probe' has no attribute {name!r}")
