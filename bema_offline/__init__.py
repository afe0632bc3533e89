"""bema-offline: offline BEMA/EMA averaging of Hugging Face Trainer checkpoints.

```python
>>> from bema_offline import BEMASchedule, average
>>> result = average("runs/dpo", "runs/dpo-bema", schedule=BEMASchedule(update_freq=100), base_model="Qwen/Qwen2.5-0.5B")
```
"""

from ._version import __version__
from .api import AveragedModel, AverageResult, average  # noqa: E402
from .errors import BemaError, DataError, UsageError  # noqa: E402
from .methods.schedule import BEMASchedule, effective_weights  # noqa: E402
from .output.hub import push_to_hub  # noqa: E402

__all__ = [
    "AverageResult",
    "AveragedModel",
    "BEMASchedule",
    "BemaError",
    "DataError",
    "UsageError",
    "__version__",
    "average",
    "effective_weights",
    "push_to_hub",
]
