"""What a training run says about itself: the training method and the base model's Hub id.

Two sources, read without any training library installed:

- the run's model card (`README.md` in the run folder or a checkpoint), which TRL writes with tags such as
  `trl` and `dpo`, and sometimes `base_model`;
- `trainer_state.json`, whose logged metrics name the method (checked against TRL 1.16: DPO logs
  `rewards/margins` and `logps/chosen`; KTO adds `kl`; CPO adds `nll_loss`; ORPO logs `log_odds_ratio`; SFT
  logs `mean_token_accuracy` and no rewards).

The card wins when it names a method; the metrics are the fallback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..files import read_json_file, read_small_file
from ..safe_yaml import load_yaml

# Tags that name a training method or library, as TRL's trainers write them (`_tag_names`).
METHOD_TAGS = (
    "trl", "sft", "dpo", "orpo", "kto", "cpo", "bco", "grpo", "rloo", "ppo", "online-dpo", "xpo", "nash-md",
    "gkd", "prm", "reward-trainer",
)  # fmt: skip
CARD_LIMIT = 4 * 2**20  # a run's README.md: its metadata block is at the top
TRAINER_STATE_LIMIT = 64 * 2**20  # a trainer_state.json logs every step; a long run's is a few MiB
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# a model card's metadata block: a first line of ---, YAML, a line of --- (as the Hub reads it)
_FRONT_MATTER = re.compile(r"\A\s*---[\r\n]+(.*?)[\r\n]+---(?:\r?\n|\Z)", re.DOTALL)

@dataclass(frozen=True)
class TrainingInfo:
    """What was learned about a run.

    Args:
        method (`str`, *optional*): the training method, e.g. "dpo" or "sft".
        tags (`list[str]`): method and library tags for the model card, e.g. ["trl", "dpo"].
        evidence (`str`, *optional*): where the method was read, e.g. "the run's model card".
        base_model_id (`str`, *optional*): the base model's Hub id, if the run's card names one.
    """

    method: str | None = None
    tags: list[str] = field(default_factory=list)
    evidence: str | None = None
    base_model_id: str | None = None

    def to_dict(self) -> dict:
        return {"method": self.method, "tags": self.tags, "evidence": self.evidence, "base_model_id": self.base_model_id}


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (ORG/NAME) and is not a local path."""
    return bool(name) and bool(_REPO_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def detect_training(run_dir: Path, checkpoint_folders: Sequence[Path]) -> TrainingInfo:
    """Read the training method and base model from a run's card and `trainer_state.json`.

    Args:
        run_dir (`Path`): the Trainer's output_dir.
        checkpoint_folders (`Sequence[Path]`): checkpoint folders, newest first; the first with a
            `trainer_state.json` is read.

    Returns:
        `TrainingInfo`: empty fields where nothing is known.
    """
    card = _read_card_metadata([run_dir, *checkpoint_folders])
    card_tags = card.get("tags") if isinstance(card.get("tags"), list) else []
    tags = [t for t in METHOD_TAGS if t in card_tags]
    base = card.get("base_model")
    base_id = base if isinstance(base, str) and is_hub_id(base) else None
    method = next((t for t in tags if t != "trl"), None)
    if method:
        return TrainingInfo(method, tags, "the run's model card", base_id)
    keys = _logged_metric_names(checkpoint_folders)
    method = _method_from_metrics(keys)
    if method:
        return TrainingInfo(method, sorted({"trl", method}, key=METHOD_TAGS.index), "trainer_state.json metrics", base_id)
    return TrainingInfo(None, tags, "the run's model card" if tags else None, base_id)


def _read_card_metadata(folders: Sequence[Path]) -> dict:
    """The YAML metadata at the top of the first model card found; {} when there is none."""
    for folder in folders:
        path = folder / "README.md"
        if path.is_file():
            try:
                match = _FRONT_MATTER.match(read_small_file(path, limit=CARD_LIMIT, what="model card").decode("utf-8"))
                metadata = load_yaml(match.group(1), what=str(path)) if match else {}
            except (DataError, ValueError):  # a malformed card says nothing; it must not stop an average
                return {}
            return metadata if isinstance(metadata, dict) else {}
    return {}


def _logged_metric_names(checkpoint_folders: Sequence[Path]) -> set[str]:
    for folder in checkpoint_folders:
        path = folder / "trainer_state.json"
        if not path.exists():
            continue
        try:
            state = read_json_file(path, what="trainer state", hint="ignored", limit=TRAINER_STATE_LIMIT)
        except DataError:
            continue
        history = state.get("log_history") if isinstance(state, dict) else None
        if isinstance(history, list):
            return {key for entry in history if isinstance(entry, dict) for key in entry}
    return set()


def _method_from_metrics(keys: set[str]) -> str | None:
    """TRL's metric names that single out a method; None when they are ambiguous or absent."""
    if "log_odds_ratio" in keys:
        return "orpo"
    if "kl" in keys and "rewards/chosen" in keys:
        return "kto"
    if "nll_loss" in keys and "rewards/margins" in keys:
        return "cpo"
    if "rewards/margins" in keys and "logps/chosen" in keys:
        return "dpo"
    if "mean_token_accuracy" in keys and not any(k.startswith(("rewards", "reward")) for k in keys):
        return "sft"
    return None
