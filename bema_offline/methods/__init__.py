"""Averaging methods as scalars: each output's effective weights, and TRL's replay schedule.

`registry.make_method` builds any method by name; `sweep.method_configs` turns a command line, a grid or a sweep file
into named configs. Each method's `weights(steps, base=...)` gives its float64 weights from the checkpoints' steps
alone; `docs/methods.md` has the formulas.
"""
