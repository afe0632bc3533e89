"""`--lora-output adapter`: the average of a LoRA run written as a PEFT adapter folder.

The average W0 + s·Σ wᵢ·Bᵢ·Aᵢ is itself an adapter, of rank r·K: B = [s·w₁B₁ | … | s·w_K B_K] and
A = [A₁; …; A_K]. That is the default output, lossless. The weights and the scaling are folded into B (in float64),
so no factor is scaled by the root of a negative weight, and the config gives every module `lora_alpha = r`: peft's
scaling `lora_alpha / r` is then exactly 1, whatever `use_rslora`, `rank_pattern` or `alpha_pattern` said.

`rank` truncates each module to at most that rank by SVD without forming the out × in product: thin QR of both
stacked factors (B = Q_B·R_B, Aᵀ = Q_A·R_A), an SVD of the small core R_B·R_Aᵀ = U·Σ·Vᵀ, then
B' = Q_B·U_R·√Σ_R and A' = √Σ_R·V_Rᵀ·Q_Aᵀ; each module's relative Frobenius error is √(Σ_{i>R} σᵢ²) / √(Σ σᵢ²).

`mode="factors"` writes (Σ wᵢBᵢ, Σ wᵢAᵢ) at the adapter's own rank and scaling: what averaging the factors gives.
DoRA adapters are refused: their merged weight is not linear in the factors, so no adapter holds their average.
Tensors trained in full (`modules_to_save`, biases) are averaged as they are, and peft's frozen copies of targeted
embeddings are copied from the newest checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..engine.lora import LORA_AVERAGES, TILE_ROWS, check_weights, full_rows
from ..errors import DataError, UsageError
from ..files import OpenFiles, write_new_file
from ..sources.peft import (
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    AdapterConfig,
    AdapterLayout,
    AdapterRun,
    LoraModule,
    ModuleFactors,
    pattern_key,
    read_module_factors,
    read_tensor,
)
from ..sources.safetensors_io import SINGLE_FILE
from ..sources.tensors import BASE_STEP, WeightSource
from .writer import ModelFolderWriter, TensorSpec

SINGLE_SHARD = 2**62  # a shard size no adapter reaches: one file


def check_adapter_output(layout: AdapterLayout, *, rank: int | None = None, mode: str = "exact") -> None:
    """Refuse what an adapter output cannot hold, before anything is read.

    Raises:
        `UsageError`: a DoRA adapter, a rank below 1, or `rank` with `mode="factors"`.
    """
    if layout.config.use_dora:
        raise UsageError(
            f"--lora-output adapter: {layout.config.path} is a DoRA adapter (use_dora), whose merged weight is not linear "
            "in its factors, so no adapter holds the average; use --lora-output merged"
        )
    if mode not in LORA_AVERAGES:
        raise UsageError(f"--lora-average must be one of {', '.join(LORA_AVERAGES)}, got {mode!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--lora-rank must be a positive integer, got {rank!r}")
    if rank is not None and mode == "factors":
        raise UsageError("--lora-rank truncates the exact average; it does not combine with --lora-average factors")


def _terms(weights: Mapping[int, float]) -> list[int]:
    """The checkpoint steps whose factors the output stacks: those with a non-zero weight (at least one)."""
    steps = [step for step in sorted(weights) if step != BASE_STEP]
    return [step for step in steps if weights[step] != 0] or steps[:1]


def output_rank(module: LoraModule, weights: Mapping[int, float], *, rank: int | None = None, mode: str = "exact") -> int:
    """The rank a module gets in the adapter output, known before any factor is read."""
    if mode == "factors":
        return module.rank
    stacked = module.rank * len(_terms(weights))
    if rank is None:
        return stacked
    rows, cols = module.shape
    b_rows, a_cols = (cols, rows) if module.transposed else (rows, cols)  # B [b_rows, r] @ A [r, a_cols]
    return min(rank, stacked, b_rows, a_cols)


@dataclass(frozen=True)
class AdapterFactors:
    """One module of the output adapter (float64): B `[out, rank]`, A `[rank, in]`, the `lora_B` bias, and the
    relative Frobenius error of the truncation (None when nothing was truncated)."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None
    truncation_error: float | None


def adapter_factors(
    module: LoraModule,
    factors: Mapping[int, ModuleFactors],
    weights: Mapping[int, float],
    *,
    rank: int | None = None,
    mode: str = "exact",
) -> AdapterFactors:
    """The output factors of one module, in peft's orientation (B @ A), computed in float64.

    Args:
        module (`LoraModule`): the module.
        factors (`Mapping[int, ModuleFactors]`): each checkpoint's factors by step.
        weights (`Mapping[int, float]`): effective weights by step (0: the base, whose B is 0); they sum to 1.
        rank (`int`, *optional*): truncate to at most this rank (SVD of the small core).
        mode (`str`, defaults to "exact"): "exact" (stacked, scaling folded into B) or "factors" (Σ wᵢBᵢ, Σ wᵢAᵢ,
            at the adapter's own scaling).
    """
    check_weights(weights, factors)
    s = module.scaling
    steps = [step for step in sorted(weights) if step != BASE_STEP]
    biases = [(weights[step], factors[step].lora_bias.double()) for step in steps if factors[step].lora_bias is not None]
    if mode == "factors":
        B = sum((weights[step] * factors[step].B.double() for step in steps), torch.zeros(factors[steps[0]].B.shape, dtype=torch.float64))
        A = sum((weights[step] * factors[step].A.double() for step in steps), torch.zeros(factors[steps[0]].A.shape, dtype=torch.float64))
        bias = sum((w * b for w, b in biases), torch.zeros(B.shape[0], dtype=torch.float64)) if biases else None
        return AdapterFactors(A, B, bias, None)
    used = _terms(weights)
    B = torch.cat([s * weights[step] * factors[step].B.double() for step in used], dim=1)
    A = torch.cat([factors[step].A.double() for step in used], dim=0)
    bias = s * sum((w * b for w, b in biases), torch.zeros(B.shape[0], dtype=torch.float64)) if biases else None
    if rank is None:
        return AdapterFactors(A, B, bias, None)
    B, A, error = truncate(B, A, rank)
    return AdapterFactors(A, B, bias, error)


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of B @ A (Eckart–Young), as factors, and its relative Frobenius error.

    Thin QR of B `[out, k]` and Aᵀ `[in, k]`, then an SVD of the core `[k, k]`: never an out × in matrix.
    """
    q_b, r_b = torch.linalg.qr(B.double())
    q_a, r_a = torch.linalg.qr(A.double().t())
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.t(), full_matrices=False)
    kept = min(rank, sigma.numel())
    total = float((sigma**2).sum())
    dropped = float((sigma[kept:] ** 2).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    root = sigma[:kept].sqrt()
    return q_b @ (u[:, :kept] * root), (root[:, None] * vh[:kept]) @ q_a.t(), error


def adapter_config(config: AdapterConfig, ranks: Mapping[str, int], *, mode: str = "exact", base_model: str | None = None) -> dict:
    """The output's `adapter_config.json`: the run's config with the output's ranks.

    With the scaling folded into B (`mode="exact"`), every module gets `lora_alpha = r` (peft's scaling is then
    exactly 1): `r` and `lora_alpha` hold the most common rank, `rank_pattern` and `alpha_pattern` the others,
    keyed by the module's full name (escaped, longest first, so that peft's first match is the module's own).

    Args:
        config (`AdapterConfig`): the run's config.
        ranks (`Mapping[str, int]`): each module's output rank, by module name.
    """
    raw = dict(config.raw)
    raw["inference_mode"] = True
    raw["init_lora_weights"] = True  # how the run started says nothing about this adapter
    if base_model is not None:
        raw["base_model_name_or_path"] = base_model
    if mode == "factors":
        return raw
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(module): rank for module, rank in sorted(ranks.items(), key=lambda item: (-len(item[0]), item[0])) if rank != common}
    for module, rank in ranks.items():
        if pattern.get(pattern_key(pattern, module), common) != rank:  # a name that another's pattern also matches
            raise DataError(f"module {module!r}: cannot give it rank {rank} through rank_pattern without changing another module; report this bug")
    raw.update(r=common, lora_alpha=common, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    return raw


@dataclass(frozen=True)
class AdapterReport:
    """What `write_adapter` wrote: each module's rank and truncation error (None when lossless), by module name."""

    folder: Path
    ranks: dict[str, int]
    truncation_errors: dict[str, float | None]
    config: dict

    @property
    def max_truncation_error(self) -> float | None:
        errors = [e for e in self.truncation_errors.values() if e is not None]
        return max(errors) if errors else None


def write_adapter(
    folder: Path,
    run: AdapterRun,
    base: WeightSource,
    weights: Mapping[int, float],
    *,
    rank: int | None = None,
    mode: str = "exact",
    dtype: str | None = None,
    base_model: str | None = None,
    block_rows: int = 16 * TILE_ROWS,
) -> AdapterReport:
    """Write the average of a LoRA run as a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).

    `folder` is created and must not exist: write into a staging folder and publish it (see `output/publish.py`).

    Args:
        folder (`Path`): the folder to create.
        run (`AdapterRun`): the run's adapter checkpoints and layout.
        base (`WeightSource`): the base model (θ0 of the tensors trained in full).
        weights (`Mapping[int, float]`): effective weights by step (0: the base).
        rank (`int`, *optional*): truncate every module to at most this rank (`--lora-rank`).
        mode (`str`, defaults to "exact"): "exact", or "factors" (`--lora-average factors`).
        dtype (`str`, *optional*): safetensors dtype name of the output tensors; default: each tensor's input dtype.
        base_model (`str`, *optional*): recorded as `base_model_name_or_path`.
        block_rows (`int`): rows per block when averaging tensors trained in full.

    Returns:
        `AdapterReport`

    Example:

    ```python
    >>> report = write_adapter(staging, run, base, {0: -0.04, 20: 0.3, 40: 0.74}, rank=16)
    >>> report.max_truncation_error
    0.0123
    ```
    """
    layout = run.layout
    check_adapter_output(layout, rank=rank, mode=mode)
    check_weights(weights, run.checkpoints)
    if all(step == BASE_STEP for step in weights):  # all weight on the base: a checkpoint still shapes the factors
        weights = {**weights, min(run.checkpoints): 0.0}
    steps = [step for step in sorted(weights) if step != BASE_STEP]
    newest = run.checkpoints[max(run.checkpoints)]
    ranks = {module.module: output_rank(module, weights, rank=rank, mode=mode) for module in layout.modules.values()}

    def out_dtype(key: str) -> str:
        return dtype or newest.shapes[key][0]

    specs: dict[str, TensorSpec] = {}
    for module in layout.modules.values():
        a_shape, b_shape = newest.shapes[module.lora_A][1], newest.shapes[module.lora_B][1]
        specs[module.lora_A] = TensorSpec(module.lora_A, out_dtype(module.lora_A), (ranks[module.module], a_shape[1]))
        specs[module.lora_B] = TensorSpec(module.lora_B, out_dtype(module.lora_B), (b_shape[0], ranks[module.module]))
        if module.lora_bias is not None:
            specs[module.lora_bias] = TensorSpec(module.lora_bias, out_dtype(module.lora_bias), newest.shapes[module.lora_bias][1])
    for tensor in layout.full_tensors.values():
        specs[tensor.key] = TensorSpec(tensor.key, out_dtype(tensor.key), newest.shapes[tensor.key][1])
    for key in layout.saved_base_layers:
        specs[key] = TensorSpec(key, newest.shapes[key][0], newest.shapes[key][1])
    ordered = [specs[key] for key in sorted(specs)]

    folder.mkdir(parents=True)
    errors: dict[str, float | None] = {}
    identities = {**base.identities, **run.identities}
    with OpenFiles(identities=identities) as files, OpenFiles(writable=True, max_open=None) as out_files:
        writer = ModelFolderWriter(folder, ordered, max_shard_size=SINGLE_SHARD, files=out_files)

        def write(key: str, value: torch.Tensor, start: int = 0) -> None:
            """Rows of `key` from row `start` on (all of it by default)."""
            if tuple(value.shape[1:]) != specs[key].shape[1:] or start + len(value) > specs[key].shape[0]:
                raise RuntimeError(f"{key}: rows of shape {list(value.shape)} at {start} do not fit {list(specs[key].shape)}")
            data = value.to(DTYPES[specs[key].dtype].torch).contiguous()
            writer.write(key, start * math.prod(value.shape[1:]), memoryview(data.view(torch.uint8).numpy()))

        for module in layout.modules.values():
            factors = {step: read_module_factors(module, run.checkpoints[step], files, torch.float64) for step in steps}
            result = adapter_factors(module, factors, weights, rank=rank, mode=mode)
            write(module.lora_A, result.A)
            write(module.lora_B, result.B)
            if module.lora_bias is not None:
                write(module.lora_bias, result.bias)
            errors[module.module] = result.truncation_error
        for tensor in layout.full_tensors.values():
            info = base.tensors[tensor.theta0]
            rows = info.shape[0] if info.shape else 1
            for start in range(0, rows, block_rows):
                stop = min(start + block_rows, rows)
                copies = {step: run.checkpoints[step].read_tensor(tensor.key, files, rows=(start, stop)) for step in steps}
                write(tensor.key, full_rows(read_tensor(info, files, start, stop), copies, weights), start)
        for key in layout.saved_base_layers:
            write(key, newest.read_tensor(key, files))
        writer.finish(index=False)
    os.rename(folder / SINGLE_FILE, folder / ADAPTER_SAFETENSORS)
    config = adapter_config(layout.config, ranks, mode=mode, base_model=base_model)
    write_new_file(folder / ADAPTER_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return AdapterReport(folder, ranks, errors, config)


__all__ = [
    "AdapterFactors",
    "AdapterReport",
    "adapter_config",
    "adapter_factors",
    "check_adapter_output",
    "output_rank",
    "truncate",
    "write_adapter",
]
