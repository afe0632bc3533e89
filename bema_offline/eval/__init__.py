"""Which average is best? Evaluate model folders or a sweep's outputs on held-out data, rank them, pick the winner.

`evaluate` ranks models (`bema-offline eval`); `select_best` also publishes a sweep's winner as `SWEEP/best`
(`bema-average --select-by`). Needs transformers and datasets (the `eval` extra); torch and transformers are imported
when a model is loaded.

```python
>>> from bema_offline.eval import evaluate, select_best
>>> report = evaluate(["runs/sweep"], "heldout.jsonl", baselines=True)
>>> print(report.table())
>>> selection = select_best("runs/sweep", "heldout.jsonl")
```
"""

from .report import EvalReport, Ranked, Result
from .runner import LmEvalSettings, evaluate
from .select import Selection, select_best

__all__ = ["EvalReport", "LmEvalSettings", "Ranked", "Result", "Selection", "evaluate", "select_best"]
