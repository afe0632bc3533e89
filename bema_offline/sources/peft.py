"""The PEFT adapter reader: a LoRA checkpoint's `adapter_config.json` and factors, mapped onto the base model's tensors.

A LoRA run's `checkpoint-N/` holds no model weights, only `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin` from older runs). Its weights are θ_N = W0 + s·B_N·A_N for every module the adapter targets,
where W0 is the base model. This module reads and validates the configs, checks that the checkpoints of a run agree,
and maps every adapter key onto the base tensor it changes, with each module's rank and scaling exactly as peft
derives them. It knows bytes and names, never schedules: the arithmetic lives in `engine/lora.py`.

Adapter keys, as peft 0.21 saves them (`base_model.model.` + the module's name in the base model):

| key | what |
|---|---|
| `<m>.lora_A.weight`, `<m>.lora_B.weight` | the factors of a linear (or Conv1D) module: A `[r, in]`, B `[out, r]` |
| `<m>.lora_embedding_A`, `<m>.lora_embedding_B` | the factors of an embedding: A `[r, num]`, B `[dim, r]` |
| `<m>.lora_B.bias` | `lora_bias`: added, scaled, to the base module's bias |
| `<m>.lora_magnitude_vector` | DoRA's magnitude, one value per output feature |
| `<m>.base_layer.weight` | a frozen copy of a targeted embedding or head (peft's `save_embedding_layers`) |
| `<m>.base_layer.bias`, `<m>.bias` | a bias trained in full (`bias="all"` or `"lora_only"`) |
| `<m>.weight`, ... | a `modules_to_save` module, trained in full |
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, dtype_name
from ..errors import DataError, first_line
from ..files import FileIdentity, OpenFiles, file_identity, read_json_file
from .safetensors_io import read_header
from .tensors import TensorInfo, WeightSource

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # what peft puts before the base model's own names

# init_lora_weights values after which the adapter model is not the base model (the base is not θ0): these inits
# move part of the base weights into the factors (PiSSA, OLoRA, CorDA, LoRA-GA), quantize them (LoftQ), or start
# from random, non-zero products (False). The others start with B = 0 (True, "gaussian", "eva"), A = 0 ("mica") or
# B·A = 0 ("orthogonal"), so that θ0 is the base.
_IDENTITY_INITS = (True, "gaussian", "eva", "orthogonal", "mica")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# options that change what a module computes (LoRA variants, other layouts) and that this tool does not average
_UNSUPPORTED_OPTIONS = {
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron layers",
}
BIAS_OPTIONS = ("none", "all", "lora_only")
_EXPECTED = {
    (int,): "an integer",
    (int, float): "a number",
    (bool,): "true or false",
    (bool, str): "true, false or a name",
    (str,): "a string",
    (list,): "a list",
    (list, str): "a list or a string",
    (dict,): "an object",
}
# names of the input embedding that a tied `lm_head.weight` shares (transformers drops the head from the file)
TIED_HEAD = "lm_head.weight"
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
# the input and output embedding layers, which peft saves whole with save_embedding_layers
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings", "shared")
TORCH_NAMES = {dtype.torch_name for dtype in DTYPES.values()}  # the torch dtypes an adapter .bin may hold


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` is a PEFT adapter checkpoint: it has an `adapter_config.json` (whatever else it holds)."""
    return os.path.lexists(folder / ADAPTER_CONFIG)


def check_one_kind(checkpoints: Mapping[int, Path]) -> bool:
    """Whether a run's checkpoints are PEFT adapters (True) or full weights (False).

    Raises:
        `DataError`: some checkpoints are adapters and others are not.
    """
    adapters = {step: is_adapter_folder(folder) for step, folder in checkpoints.items()}
    if len(set(adapters.values())) > 1:
        adapter = next(step for step, is_adapter in adapters.items() if is_adapter)
        full = next(step for step, is_adapter in adapters.items() if not is_adapter)
        raise DataError(
            f"{checkpoints[adapter]} is a PEFT adapter checkpoint ({ADAPTER_CONFIG}) but {checkpoints[full]} is not; "
            "a run is one or the other: narrow the steps with --min-step/--max-step or move the odd folders away"
        )
    return next(iter(adapters.values()), False)


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a LoRA `adapter_config.json` that decide the weights, with peft's defaults.

    Args:
        path (`Path`): the file read.
        raw (`dict`): the whole JSON object (the adapter output starts from it).
        r (`int`), lora_alpha (`float`), use_rslora (`bool`): the default rank and scaling; the scaling is
            `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.
        rank_pattern, alpha_pattern (`dict`): per-module ranks and alphas, keys matched as peft matches them.
        target_modules (`tuple[str, ...] | str | None`): module names (a tuple, sorted) or a regular expression.
        modules_to_save (`tuple[str, ...]`): modules trained in full.
        use_dora, fan_in_fan_out, lora_bias (`bool`), bias (`str`), init_lora_weights (`bool | str`),
        base_model_name_or_path (`str | None`): as in peft's `LoraConfig`.
    """

    path: Path
    raw: dict
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None

    def rank(self, module: str) -> int:
        """The rank peft gives `module` (its name in the base model): `rank_pattern`'s first matching key, else `r`."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)

    def alpha(self, module: str) -> float:
        """The `lora_alpha` peft gives `module`: `alpha_pattern`'s first matching key, else `lora_alpha`."""
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)

    def scaling(self, module: str) -> float:
        """`lora_alpha / r` (or `/ sqrt(r)` with rslora) for `module`, computed as peft computes it."""
        rank, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def names_target(self, module: str) -> bool:
        """Whether `target_modules` names `module` (peft's rule: an exact name, a `.name` suffix, or a full regex
        match); always True for `all-linear` and when no targets are given."""
        targets = self.target_modules
        if targets is None or targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return any(module == t or module.endswith("." + t) for t in targets)

    def saves_module(self, module: str) -> bool:
        """Whether `modules_to_save` names `module`: peft's rule, a plain suffix (`head` names `lm_head`)."""
        return any(module.endswith(m) for m in self.modules_to_save)

    def compared(self) -> dict[str, object]:
        """The fields two checkpoints of one run must agree on."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "use_dora": self.use_dora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "lora_bias": self.lora_bias,
        }


def pattern_key(patterns: Mapping[str, object], module: str) -> str:
    """The first key of `rank_pattern` or `alpha_pattern` that matches `module`, as peft's `get_pattern_key` finds it:
    the key is a regular expression that must match the whole name or a suffix after a dot. `module` itself when
    none matches."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def read_adapter_config(path: Path) -> AdapterConfig:
    """Read and validate a LoRA `adapter_config.json`.

    Raises:
        `DataError`: malformed JSON, not a LoRA adapter, a field of the wrong type, an option this tool cannot
            average, or an `init_lora_weights` after which the base model is not θ0.
    """
    raw = read_json_file(path, what="adapter config", hint="re-save the adapter with peft")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a JSON object; re-save the adapter with peft")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise DataError(f"{path}: a {peft_type} adapter; only LoRA adapters (peft_type LORA) can be averaged")

    def get(name: str, kinds: tuple[type, ...], default: object) -> object:
        value = raw.get(name, default)
        if value is None:
            value = default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise DataError(f"{path}: {name} is {value!r}, expected {_EXPECTED[kinds]}; re-save the adapter with peft")
        return value

    r = get("r", (int,), 8)
    if r < 1:
        raise DataError(f"{path}: r is {r}; a LoRA rank is a positive integer")
    lora_alpha = get("lora_alpha", (int, float), 8)
    if not math.isfinite(lora_alpha):
        raise DataError(f"{path}: lora_alpha is {lora_alpha}; it must be a finite number")
    rank_pattern = get("rank_pattern", (dict,), {})
    alpha_pattern = get("alpha_pattern", (dict,), {})
    for name, pattern, kinds in (("rank_pattern", rank_pattern, (int,)), ("alpha_pattern", alpha_pattern, (int, float))):
        for key, value in pattern.items():
            if not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value) or (name == "rank_pattern" and value < 1):
                raise DataError(f"{path}: {name}[{key!r}] is {value!r}; re-save the adapter with peft")
            try:
                re.compile(key)
            except re.error as e:
                raise DataError(f"{path}: {name} key {key!r} is not a regular expression ({e})") from None
    target_modules = get("target_modules", (list, str), [])
    if isinstance(target_modules, list):
        if not all(isinstance(t, str) for t in target_modules):
            raise DataError(f"{path}: target_modules holds a non-string; re-save the adapter with peft")
        target_modules = tuple(sorted(set(target_modules))) or None
    modules_to_save = get("modules_to_save", (list,), [])
    if not all(isinstance(m, str) for m in modules_to_save):
        raise DataError(f"{path}: modules_to_save holds a non-string; re-save the adapter with peft")
    bias = get("bias", (str,), "none")
    if bias not in BIAS_OPTIONS:
        raise DataError(f"{path}: bias is {bias!r}; peft knows {', '.join(BIAS_OPTIONS)}")
    for name, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(name) not in (None, False, [], {}):
            raise DataError(f"{path}: the adapter uses {what} ({name}), which bema-offline cannot average; merge it with peft first")
    init = get("init_lora_weights", (bool, str), True)
    _check_init(path, init)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        path=path,
        raw=raw,
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=get("use_rslora", (bool,), False),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        target_modules=target_modules,
        modules_to_save=tuple(sorted(set(modules_to_save))),
        use_dora=get("use_dora", (bool,), False),
        fan_in_fan_out=get("fan_in_fan_out", (bool,), False),
        bias=bias,
        lora_bias=get("lora_bias", (bool,), False),
        init_lora_weights=init,
        base_model_name_or_path=base if isinstance(base, str) and base else None,
    )


def _check_init(path: Path, init: bool | str) -> None:
    if isinstance(init, str) and not init.lower().startswith(_BASE_CHANGING_INITS) and init.lower() not in _IDENTITY_INITS:
        raise DataError(f"{path}: unknown init_lora_weights {init!r}; cannot tell whether the base model is θ0")


def check_init(config: AdapterConfig, *, base_is_theta0: bool) -> str | None:
    """Whether the checkpoints' weights can be rebuilt from the base model, given how the adapter started.

    Most inits start with B·A = 0, so that the base model is θ0 (the weights before training). After a random init
    (`init_lora_weights` false) the base is still W0 in θ_t = W0 + s·B_t·A_t, but not θ0: fine as long as no output
    gives the base a weight (`--update-after` a saved step). PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ also change the
    base at init: θ_t = W_res + s·B_t·A_t on the residual model peft made then, which must be the base given.

    Args:
        config (`AdapterConfig`): the run's config.
        base_is_theta0 (`bool`): some output gives the base model (step 0) a weight.

    Returns:
        `str | None`: a note for the user when the base must be the residual model, else None.

    Raises:
        `DataError`: the base model would be θ0 but is not.
    """
    init = config.init_lora_weights
    fix = "pass --update-after with a saved step (θ0 = that checkpoint)"
    changes_base = isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS)
    if base_is_theta0 and init is False:
        raise DataError(
            f"{config.path}: init_lora_weights is false (random A and B), so the adapter changed the model before training "
            f"and the base model is not θ0; {fix}"
        )
    if base_is_theta0 and changes_base:
        raise DataError(
            f"{config.path}: init_lora_weights {init!r} changes the base weights at init, so the base model is not θ0; {fix}, "
            "and as --base-model the residual model peft made at init"
        )
    if changes_base:
        return (
            f"init_lora_weights {init!r}: the checkpoints are W + s·B·A on the residual model peft made at init, so the "
            "base model given must be that residual model (and an adapter output loads onto it)"
        )
    return None


@dataclass(frozen=True)
class AdapterCheckpoint:
    """One adapter checkpoint: its config, and its tensors by adapter key (dtype name and shape).

    Read tensors with `read_tensor`. A safetensors adapter is read with positioned reads, as every weight file; an
    `adapter_model.bin` is loaded with `torch.load(weights_only=True, mmap=True)` (adapters are small).
    """

    step: int
    folder: Path
    config: AdapterConfig
    shapes: dict[str, tuple[str, tuple[int, ...]]]
    source: WeightSource | None = None  # safetensors: where each tensor's bytes lie
    loaded: dict[str, torch.Tensor] | None = None  # adapter_model.bin, memory-mapped
    identities: dict[Path, FileIdentity] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        return self.folder / (ADAPTER_SAFETENSORS if self.source is not None else ADAPTER_BIN)

    def read_tensor(
        self, key: str, files: OpenFiles, dtype: torch.dtype | None = None, *, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tensor `key` (rows `[start, stop)` of it with `rows`), as a new CPU tensor, cast to `dtype` if given."""
        if self.loaded is not None:
            tensor = self.loaded[key]
            if rows is not None:
                tensor = tensor[rows[0] : rows[1]]
            return tensor.to(dtype) if dtype is not None and dtype != tensor.dtype else tensor.clone()
        tensor = read_tensor(self.source.tensors[key], files, *(rows or ()))
        return tensor if dtype is None else tensor.to(dtype)


def read_tensor(
    info: TensorInfo, files: OpenFiles, first_row: int = 0, stop_row: int | None = None, *, into: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows `[first_row, stop_row)` of a tensor (all of them by default), read into a new CPU tensor, or into the
    first bytes of `into` (a flat uint8 tensor, e.g. a worker's buffer reused from block to block).

    Example:

    ```python
    >>> with OpenFiles(identities=source.identities) as files:
    ...     w0 = read_tensor(source.tensors["model.layers.0.mlp.up_proj.weight"], files, 0, 256)
    ```
    """
    import torch

    shape = info.shape
    rows = shape[0] if shape else 1
    stop_row = rows if stop_row is None else stop_row
    per_row = math.prod(shape[1:]) if shape else 1
    out_shape = (stop_row - first_row, *shape[1:]) if shape else ()
    nbytes = math.prod(out_shape) * info.itemsize
    if into is not None and into.numel() < nbytes:
        raise ValueError(f"{info.name}: {nbytes} bytes do not fit a buffer of {into.numel()}")
    buffer = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    for path, offset, nbytes in info.ranges(first_row * per_row, stop_row * per_row):
        files.read_into(path, offset, view[done : done + nbytes])
        done += nbytes
    return buffer.view(info.torch_dtype).reshape(out_shape)


def load_adapter_checkpoint(folder: Path, step: int) -> AdapterCheckpoint:
    """Read one adapter checkpoint's config and tensor list (no tensor data).

    Raises:
        `DataError`: a missing or malformed config or weights file, a non-float tensor.
    """
    config = read_adapter_config(folder / ADAPTER_CONFIG)
    identities: dict[Path, FileIdentity] = {}
    safetensors, binary = folder / ADAPTER_SAFETENSORS, folder / ADAPTER_BIN
    if os.path.lexists(safetensors):
        if not safetensors.is_file():
            raise DataError(f"{safetensors}: not a regular file (a broken link?); replace it with the saved adapter")
        tensors, _ = read_header(safetensors, identities)
        source = WeightSource(step, folder, tensors, identities, layout="peft adapter")
        shapes = {name: (t.dtype, t.shape) for name, t in tensors.items()}
        checkpoint = AdapterCheckpoint(step, folder, config, shapes, source=source, identities=identities)
    elif os.path.lexists(binary):
        if not binary.is_file():  # (a FIFO would block torch.load)
            raise DataError(f"{binary}: not a regular file (a broken link?); replace it with the saved adapter")
        before = file_identity(binary)
        loaded = _load_bin(binary)
        identities[binary] = file_identity(binary)
        if identities[binary] != before:
            raise DataError(f"{binary}: changed while it was read; rerun when nothing writes to the run")
        unknown = next((name for name, t in loaded.items() if str(t.dtype).removeprefix("torch.") not in TORCH_NAMES), None)
        if unknown is not None:
            raise DataError(f"{binary}: tensor {unknown!r} is {loaded[unknown].dtype}, a dtype this tool does not read; this is not a LoRA adapter")
        shapes = {name: (dtype_name(t.dtype), tuple(t.shape)) for name, t in loaded.items()}
        checkpoint = AdapterCheckpoint(step, folder, config, shapes, loaded=loaded, identities=identities)
    else:
        raise DataError(f"{folder}: has {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}; the checkpoint is incomplete")
    if not shapes:
        raise DataError(f"{checkpoint.weights_file}: holds no tensors; the checkpoint is empty or was not saved completely")
    for name, (dtype, _) in shapes.items():
        if not DTYPES[dtype].is_float:
            raise DataError(f"{checkpoint.weights_file}: tensor {name!r} is {dtype}, not floating point; this is not a LoRA adapter")
    return checkpoint


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: cannot read the adapter ({first_line(e)[:200]}); re-save it (peft saves safetensors by default)") from e
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise DataError(f"{path}: not a state dict of named tensors; re-save the adapter with peft")
    for name, tensor in loaded.items():
        if any(s for s in tensor.shape) and not tensor.is_contiguous():
            loaded[name] = tensor.contiguous()
    return loaded


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter targets, and the base tensor its factors change.

    The module's weight as a checkpoint sees it is `W0 + scaling·ΔW`, with `ΔW = B·A` stored as the base stores
    the weight: `[out, in]` for a linear module, transposed (`transposed`, `ΔW = Aᵀ·Bᵀ`) for a GPT-2 style Conv1D
    (`fan_in_fan_out`) and for an embedding (whose A is `[r, num_embeddings]`).

    Args:
        module (`str`): the module's name in the base model, e.g. `model.layers.0.self_attn.q_proj`.
        weight (`str`): the output tensor the factors change (`<module>.weight`).
        theta0 (`str`): the base tensor holding W0 (`weight`, or the input embedding for a tied `lm_head`).
        shape (`tuple[int, int]`): the weight's shape as stored.
        rank (`int`), lora_alpha (`float`), scaling (`float`): as peft derives them for this module.
        transposed (`bool`): the stored weight is `ΔW`'s transpose of `B·A` (rows follow A's columns).
        embedding (`bool`): an embedding (`lora_embedding_A/B` keys).
        lora_A, lora_B (`str`): the adapter keys of the factors.
        magnitude (`str | None`): DoRA's magnitude key.
        lora_bias (`str | None`): the `lora_B.bias` key (added, scaled, to the base bias `bias`).
        bias (`str | None`): the base bias tensor that `lora_bias` changes.
    """

    module: str
    weight: str
    theta0: str
    shape: tuple[int, int]
    rank: int
    lora_alpha: float
    scaling: float
    transposed: bool
    embedding: bool
    lora_A: str
    lora_B: str
    magnitude: str | None = None
    lora_bias: str | None = None
    bias: str | None = None

    @property
    def rows_independent(self) -> bool:
        """Whether each row of the output can be computed from the same row of W0 alone. False only for DoRA on a
        transposed weight, whose norms run down columns: the whole tensor must then be one block."""
        return self.magnitude is None or not self.transposed

    @property
    def factor_keys(self) -> tuple[str, ...]:
        """Every adapter key this module reads from each checkpoint."""
        return tuple(k for k in (self.lora_A, self.lora_B, self.magnitude, self.lora_bias) if k is not None)


@dataclass(frozen=True)
class FullTensor:
    """A tensor trained in full (a `modules_to_save` module, or a bias with `bias="all"`/`"lora_only"`).

    Args:
        name (`str`): the output tensor.
        key (`str`): its adapter key.
        theta0 (`str`): the base tensor holding its θ0 (`name`, or the input embedding for a tied `lm_head`).
    """

    name: str
    key: str
    theta0: str


@dataclass(frozen=True)
class AdapterLayout:
    """How a run's adapters map onto the base model's tensors.

    Every output tensor is one of: a LoRA-targeted weight (`modules`), a base bias changed by `lora_bias`
    (`lora_biases`), a tensor trained in full (`full_tensors`), or the base tensor unchanged (any other base tensor).
    `untied` lists tensors the output must hold although the base file has none (a tied `lm_head.weight` whose
    module the adapter changes, or whose input embedding it changes): the output folder's `config.json` must then
    say `"tie_word_embeddings": false`.
    """

    config: AdapterConfig
    modules: dict[str, LoraModule]  # by output weight name
    lora_biases: dict[str, LoraModule]  # by output bias name
    full_tensors: dict[str, FullTensor]  # by output name
    untied: dict[str, str]  # output name -> base tensor holding its θ0
    saved_base_layers: tuple[str, ...] = ()  # adapter keys of frozen base-layer copies (not averaged)

    def output_tensors(self, base: WeightSource) -> dict[str, str]:
        """Every tensor of the merged output, in the base's order (untied ones last), with the base tensor that
        holds its θ0."""
        names = {name: name for name in base.tensors}
        names.update(self.untied)
        return names

    @property
    def ranks(self) -> dict[str, int]:
        return {name: module.rank for name, module in self.modules.items()}

    def describe(self) -> list[str]:
        """Lines for `--dry-run`: targets, ranks and scalings, full tensors, untied tensors."""
        config = self.config
        scalings = sorted({(m.rank, m.lora_alpha, m.scaling) for m in self.modules.values()})
        rule = "lora_alpha/sqrt(r) (rslora)" if config.use_rslora else "lora_alpha/r"
        kinds = sorted({m.module.rpartition(".")[2] for m in self.modules.values()})
        lines = [
            f"LoRA adapter: {len(self.modules)} modules ({', '.join(kinds)})"
            + (", DoRA" if config.use_dora else "")
            + f", scaling {rule}: "
            + "; ".join(f"r={r} alpha={a:g} s={s:g}" for r, a, s in scalings)
        ]
        if self.full_tensors:
            lines.append(f"trained in full: {', '.join(self.full_tensors)}")
        if self.lora_biases:
            lines.append(f"biases changed by lora_bias: {len(self.lora_biases)}")
        if self.untied:
            lines.append(f"untied from the input embedding: {', '.join(self.untied)} (the output sets tie_word_embeddings false)")
        return lines


def tied_weights(base: WeightSource, base_config: Mapping[str, object] | None = None) -> dict[str, str]:
    """`{"lm_head.weight": <input embedding>}` when the base shares its head with its input embedding: the file has
    no `lm_head.weight` (transformers drops a tied head) and `config.json` does not say `tie_word_embeddings` false."""
    if TIED_HEAD in base.tensors or (base_config is not None and base_config.get("tie_word_embeddings") is False):
        return {}
    embeddings = [name for name in base.tensors if name.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return {TIED_HEAD: embeddings[0]} if len(embeddings) == 1 else {}


_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_B.bias": "lora_bias",
    ".lora_magnitude_vector": "magnitude",
}


def map_adapter(
    checkpoint: AdapterCheckpoint, base: WeightSource, *, base_config: Mapping[str, object] | None = None
) -> AdapterLayout:
    """Map every key of an adapter checkpoint onto the base tensor it changes, and check every shape.

    Args:
        checkpoint (`AdapterCheckpoint`): any checkpoint of the run (all agree, see `load_adapter_run`).
        base (`WeightSource`): the base model (W0).
        base_config (`Mapping`, *optional*): the base's `config.json`, to tell a tied head from a missing one.

    Returns:
        `AdapterLayout`

    Raises:
        `DataError`: a key that is not peft's, a target missing from the base, a factor whose shape disagrees with
            the base or with the config's rank.
    """
    config = checkpoint.config
    where = checkpoint.weights_file
    tied = tied_weights(base, base_config)
    partners = {**tied, **{embedding: head for head, embedding in tied.items()}}
    parts: dict[str, dict[str, str]] = {}  # module -> {"A", "B", "magnitude", "lora_bias"} -> key
    full: dict[str, FullTensor] = {}
    saved_base_layers = []
    for key in checkpoint.shapes:
        if not key.startswith(KEY_PREFIX):
            raise DataError(f"{where}: key {key!r} does not start with {KEY_PREFIX!r}; this is not a peft LoRA adapter of a transformers model")
        name = key[len(KEY_PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            module = name[: -len(suffix)]
            role = _LORA_SUFFIXES[suffix]
            if role in parts.setdefault(module, {}):
                raise DataError(f"{where}: module {module!r} has two {role} tensors; the adapter is corrupt")
            parts[module][role] = key
            if suffix.startswith(".lora_embedding"):
                parts[module]["embedding"] = key
        elif ".base_layer." in name:
            module, _, param = name.rpartition(".base_layer.")
            target = f"{module}.{param}"
            if param == "bias" and config.bias != "none":
                full[target] = FullTensor(target, key, tied.get(target, target))
            else:  # a frozen copy of a targeted embedding or head, saved by peft beside the factors
                _check_base_copy(where, key, checkpoint.shapes[key][1], target, base, tied)
                saved_base_layers.append(key)
        else:
            module, _, param = name.rpartition(".")
            partner = _module_of(partners.get(name))  # a tied head saved beside its saved embedding
            if not (config.saves_module(module) or (partner and config.saves_module(partner)) or (param == "bias" and config.bias != "none")):
                if module.rpartition(".")[2] in EMBEDDING_NAMES:
                    raise DataError(
                        f"{where}: tensor {key!r} is a whole embedding layer that peft saved beside the adapter "
                        "(save_embedding_layers: the vocabulary was resized?); bema-offline averages adapters on an "
                        "unchanged base: merge each checkpoint with peft (merge_and_unload) and average the merged folders"
                    )
                raise DataError(
                    f"{where}: tensor {key!r} is neither a LoRA factor nor in modules_to_save "
                    f"({', '.join(config.modules_to_save) or 'none'}); the adapter and its config disagree"
                )
            full[name] = FullTensor(name, key, tied.get(name, name))
    modules: dict[str, LoraModule] = {}
    lora_biases: dict[str, LoraModule] = {}
    for module, roles in parts.items():
        lora = _lora_module(checkpoint, module, roles, base, tied, partners)
        if lora.weight in full:
            raise DataError(f"{where}: {lora.weight!r} is both LoRA-targeted and trained in full; the adapter is corrupt")
        modules[lora.weight] = lora
        if lora.bias is not None:
            if lora.bias in full:
                raise DataError(f"{where}: bias {lora.bias!r} is trained both in full and through lora_bias; average such a run with peft's merge")
            lora_biases[lora.bias] = lora
    for tensor in full.values():
        _check_full(where, checkpoint, tensor, base)
    changed = set(modules) | set(full) | set(lora_biases)
    untied = {head: embedding for head, embedding in tied.items() if head in changed or embedding in changed}
    if not modules:
        raise DataError(f"{where}: holds no LoRA factors (lora_A/lora_B); nothing to average")
    return AdapterLayout(config, modules, lora_biases, full, untied, tuple(saved_base_layers))


def _module_of(tensor: str | None) -> str | None:
    return None if tensor is None else tensor.rpartition(".")[0]


def _lora_module(
    checkpoint: AdapterCheckpoint,
    module: str,
    roles: dict[str, str],
    base: WeightSource,
    tied: Mapping[str, str],
    partners: Mapping[str, str],
) -> LoraModule:
    config = checkpoint.config
    where = checkpoint.weights_file
    for role in ("A", "B"):
        if role not in roles:
            raise DataError(f"{where}: module {module!r} has no lora_{role} tensor; the adapter is incomplete")
    if ("magnitude" in roles) != config.use_dora:
        state = "has a DoRA magnitude but" if "magnitude" in roles else "has no DoRA magnitude although"
        raise DataError(f"{where}: module {module!r} {state} use_dora is {str(config.use_dora).lower()}; the adapter and its config disagree")
    weight = f"{module}.weight"
    partner = _module_of(partners.get(weight))  # peft's ensure_weight_tying targets the head with its embedding
    if not (config.names_target(module) or (partner and config.names_target(partner))):
        raise DataError(f"{where}: module {module!r} has LoRA factors but target_modules does not name it; the adapter and its config disagree")
    theta0 = tied.get(weight, weight)
    if theta0 not in base.tensors:
        raise DataError(
            f"{where}: the adapter targets {module!r} but the base model {base.folder} has no tensor {weight!r}; "
            "pass the base model this adapter was trained on (--base-model)"
        )
    base_shape = base.tensors[theta0].shape
    a_shape, b_shape = checkpoint.shapes[roles["A"]][1], checkpoint.shapes[roles["B"]][1]
    embedding = "embedding" in roles
    mismatch = DataError(
        f"{where}: module {module!r} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, which do not fit the base "
        f"tensor {theta0!r} {list(base_shape)}; pass the base model this adapter was trained on (--base-model)"
    )
    if len(base_shape) != 2:
        raise DataError(f"{where}: module {module!r} targets a {len(base_shape)}-d weight {list(base_shape)}; only linear and embedding layers are supported")
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise mismatch
    rank, cols_a, out = a_shape[0], a_shape[1], b_shape[0]
    if embedding:  # A [r, num_embeddings], B [dim, r]; the base stores [num_embeddings, dim]
        if base_shape != (cols_a, out):
            raise mismatch
        transposed = True
    else:  # A [r, in], B [out, r]; the base stores [out, in], or [in, out] for a Conv1D (fan_in_fan_out)
        normal, flipped = base_shape == (out, cols_a), base_shape == (cols_a, out)
        if not (normal or flipped):
            raise mismatch
        transposed = flipped and (not normal or config.fan_in_fan_out)
    expected_rank = config.rank(module)
    if rank != expected_rank:
        raise DataError(f"{where}: module {module!r} has rank {rank} but the config gives it {expected_rank}; the adapter and its config disagree")
    out_features = base_shape[1] if transposed else base_shape[0]
    for role, expected in (("magnitude", out_features), ("lora_bias", out)):
        if role in roles and checkpoint.shapes[roles[role]][1] != (expected,):
            raise DataError(f"{where}: {roles[role]!r} has shape {list(checkpoint.shapes[roles[role]][1])}, expected [{expected}]; the adapter is corrupt")
    bias = None
    if "lora_bias" in roles:
        bias = f"{module}.bias"
        if bias not in base.tensors or base.tensors[bias].shape != (out,):
            raise DataError(
                f"{where}: module {module!r} has a lora_bias but the base has no bias {bias!r} of shape [{out}] to add it to; "
                "peft cannot merge such an adapter either"
            )
    return LoraModule(
        module=module,
        weight=weight,
        theta0=theta0,
        shape=tuple(base_shape),
        rank=rank,
        lora_alpha=config.alpha(module),
        scaling=config.scaling(module),
        transposed=transposed,
        embedding=embedding,
        lora_A=roles["A"],
        lora_B=roles["B"],
        magnitude=roles.get("magnitude"),
        lora_bias=roles.get("lora_bias"),
        bias=bias,
    )


def _check_full(where: Path, checkpoint: AdapterCheckpoint, tensor: FullTensor, base: WeightSource) -> None:
    if tensor.theta0 not in base.tensors:
        raise DataError(
            f"{where}: {tensor.key!r} is trained in full but the base model {base.folder} has no tensor {tensor.name!r}; "
            "pass the base model this adapter was trained on (--base-model)"
        )
    shape, base_shape = checkpoint.shapes[tensor.key][1], base.tensors[tensor.theta0].shape
    if shape != base_shape:
        raise DataError(
            f"{where}: {tensor.key!r} has shape {list(shape)} but the base tensor {tensor.theta0!r} has {list(base_shape)}; "
            "was the vocabulary resized? pass the base model this adapter was trained on (--base-model)"
        )


def _check_base_copy(where: Path, key: str, shape: tuple[int, ...], target: str, base: WeightSource, tied: Mapping[str, str]) -> None:
    theta0 = tied.get(target, target)
    if theta0 in base.tensors and base.tensors[theta0].shape != shape:
        raise DataError(
            f"{where}: {key!r} has shape {list(shape)} but the base tensor {theta0!r} has {list(base.tensors[theta0].shape)}; "
            "was the vocabulary resized? pass the base model this adapter was trained on (--base-model)"
        )


@dataclass(frozen=True)
class AdapterRun:
    """The adapter checkpoints of a run, checked to agree, and their layout on the base model."""

    checkpoints: dict[int, AdapterCheckpoint]
    layout: AdapterLayout

    @property
    def identities(self) -> dict[Path, FileIdentity]:
        return {path: identity for checkpoint in self.checkpoints.values() for path, identity in checkpoint.identities.items()}


def load_adapter_run(
    checkpoints: Mapping[int, Path], base: WeightSource, *, base_config: Mapping[str, object] | None = None
) -> AdapterRun:
    """Read every adapter checkpoint of a run, check that they agree, and map them onto the base.

    Args:
        checkpoints (`Mapping[int, Path]`): `checkpoint-N` folders by step.
        base (`WeightSource`): the base model's tensors.
        base_config (`Mapping`, *optional*): the base's `config.json`.

    Raises:
        `DataError`: a checkpoint that is not an adapter, configs or tensors that disagree across checkpoints, or
            any error of `read_adapter_config` and `map_adapter`.

    Example:

    ```python
    >>> run = load_adapter_run(find_checkpoints("runs/dpo-lora"), load_source(Path("base"), 0))
    >>> module = run.layout.modules["model.layers.0.self_attn.q_proj.weight"]
    >>> module.rank, module.scaling
    (16, 2.0)
    ```
    """
    check_one_kind(checkpoints)
    loaded = {}
    for step, folder in sorted(checkpoints.items()):
        if not is_adapter_folder(folder):
            raise DataError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter checkpoint")
        loaded[step] = load_adapter_checkpoint(folder, step)
    first = loaded[min(loaded)]
    reference = first.config.compared()
    for checkpoint in loaded.values():
        for name, value in checkpoint.config.compared().items():
            if value != reference[name]:
                raise DataError(
                    f"{checkpoint.config.path}: {name} is {_shown(value)} but {first.config.path} has {_shown(reference[name])}; "
                    "the checkpoints come from different adapters: average each run on its own"
                )
        if checkpoint.shapes != first.shapes:
            key = next(k for k in sorted(set(checkpoint.shapes) | set(first.shapes)) if checkpoint.shapes.get(k) != first.shapes.get(k))
            here, there = checkpoint.shapes.get(key), first.shapes.get(key)
            raise DataError(
                f"{checkpoint.weights_file}: tensor {key!r} is {_shape_text(here)} but in {first.weights_file} it is "
                f"{_shape_text(there)}; the checkpoints come from different adapters: average each run on its own"
            )
    return AdapterRun(loaded, map_adapter(first, base, base_config=base_config))


def _shown(value: object) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _shape_text(entry: tuple[str, tuple[int, ...]] | None) -> str:
    return "missing" if entry is None else f"{entry[0]} {list(entry[1])}"


@dataclass(frozen=True)
class ModuleFactors:
    """One checkpoint's factors for one module, as read (A `[r, in]`, B `[out, r]`, as peft stores them)."""

    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None
    lora_bias: torch.Tensor | None = None


def read_module_factors(module: LoraModule, checkpoint: AdapterCheckpoint, files: OpenFiles, dtype: torch.dtype) -> ModuleFactors:
    """Read a module's factors from one checkpoint, cast to `dtype` (the accumulation dtype)."""
    return ModuleFactors(
        A=checkpoint.read_tensor(module.lora_A, files, dtype),
        B=checkpoint.read_tensor(module.lora_B, files, dtype),
        magnitude=None if module.magnitude is None else checkpoint.read_tensor(module.magnitude, files, dtype),
        lora_bias=None if module.lora_bias is None else checkpoint.read_tensor(module.lora_bias, files, dtype),
    )


__all__ = [
    "ADAPTER_BIN",
    "ADAPTER_CONFIG",
    "ADAPTER_SAFETENSORS",
    "AdapterCheckpoint",
    "AdapterConfig",
    "AdapterLayout",
    "AdapterRun",
    "FullTensor",
    "LoraModule",
    "ModuleFactors",
    "check_init",
    "check_one_kind",
    "is_adapter_folder",
    "load_adapter_checkpoint",
    "load_adapter_run",
    "map_adapter",
    "pattern_key",
    "read_adapter_config",
    "read_module_factors",
    "read_tensor",
    "tied_weights",
]
