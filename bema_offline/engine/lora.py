"""The arithmetic of a LoRA average, one targeted module and one block of its rows at a time.

Every checkpoint of a LoRA run is θᵢ = W0 + s·Bᵢ·Aᵢ on the modules the adapter targets, and W0 elsewhere. An average
with effective weights wᵢ (summing to 1, θ0 = the base, whose B is 0) is therefore

    W0 + s·Σ wᵢ·Bᵢ·Aᵢ = W0 + [s·w₁B₁ | … | s·w_K B_K] @ [A₁; …; A_K]

one matmul of stacked factors per row block, exact up to float32 rounding (the weights are folded into B in
float64, so no factor is scaled by the root of a negative weight). The pieces, for the engine:

- `ModuleAverage` (one per targeted module and output): built once from every checkpoint's factors
  (`read_module_factors`: r·(in + out) values per checkpoint), it turns rows `[start, start + n)` of W0
  (`base.tensors[module.theta0]`, as stored, in any dtype) into the same rows of the output (`rows`: float32, ready
  to cast), and the base bias into the output bias where the adapter has `lora_bias` (`bias`). `block_bytes(n)` is
  its working memory for n rows. When `module.rows_independent` is False (DoRA on a Conv1D or an embedding) the
  block must be the whole tensor.
- `full_rows`: a tensor trained in full (`modules_to_save`, trained biases): Σ wᵢ·θᵢ with the base tensor
  `full.theta0` as θ0 and each checkpoint's copy (`checkpoint.source.tensors[full.key]`, an ordinary TensorInfo):
  the engine's own weighted sum does the same.
- Untargeted tensors are W0, cast to the output dtype: nothing to compute.
- `iter_merged` drives these calls over a whole run, tensor by tensor: the reference the engine must match.

The product is computed in tiles of `TILE_ROWS` rows aligned to the tensor's first row, whatever block the engine
asks for, so the result does not depend on `--max-memory` (a float32 matmul sums in an order that depends on its
shape). Blocks aligned to `TILE_ROWS` waste nothing; others recompute at most one tile at each end.

`mode="factors"` (`--lora-average factors`) computes W0 + s·(Σ wᵢBᵢ)(Σ wᵢAᵢ) instead, what averaging the factors
separately gives (the base's factors count as zero), and `factor_difference` measures how far that is from the
exact average. DoRA (`use_dora`) is not linear in the factors: each checkpoint's merge scales W0 + s·ΔWᵢ by its
magnitude over its own row norms. Those norms come from one more matmul per block (W0 against the stacked A), so a
DoRA block costs two matmuls whatever the number of checkpoints; on a transposed weight (Conv1D, embedding), whose
norms run down columns, each checkpoint is merged in turn, on the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..files import OpenFiles
from ..sources.peft import AdapterRun, LoraModule, ModuleFactors, read_module_factors, read_tensor
from ..sources.tensors import BASE_STEP, WeightSource

LORA_AVERAGES = ("exact", "factors")
TILE_ROWS = 256  # rows of each matmul: a fixed shape gives the same bits whatever the block
WEIGHT_SUM_TOLERANCE = 1e-9


def check_weights(weights: Mapping[int, float], factor_steps: Collection[int]) -> None:
    """Check that `weights` sum to 1 and that every step but the base has factors (a programming error if not)."""
    total = math.fsum(weights.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"effective weights must sum to 1, got {total!r}")
    missing = [step for step in weights if step != BASE_STEP and step not in factor_steps]
    if missing:
        raise ValueError(f"no factors for steps {missing}")


def _oriented(module: LoraModule, factors: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with ΔW = left @ right in the weight's stored orientation: (B, A), or (Aᵀ, Bᵀ) when transposed."""
    if module.transposed:
        return factors.A.t(), factors.B.t()
    return factors.B, factors.A


def _plus_product(base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, start: int) -> torch.Tensor:
    """`base + left @ right` for rows `[start, start + n)` of a tensor (`base` and `left` hold those n rows),
    computed as one `addmm` per whole tile of TILE_ROWS rows aligned to the tensor's row 0, the rows beyond the
    block being zeros: each row's bits depend on its own values only, never on the block it came in."""
    stop = start + base.shape[0]
    first = start // TILE_ROWS * TILE_ROWS
    last = -(-stop // TILE_ROWS) * TILE_ROWS
    if (first, last) == (start, stop):  # whole tiles: no padding to copy into
        out = base.to(right.dtype, copy=True, memory_format=torch.contiguous_format)
        lhs = left.to(right.dtype)
    else:
        out = torch.empty((last - first, right.shape[1]), dtype=right.dtype)
        out[: start - first].zero_()
        out[start - first : stop - first] = base
        out[stop - first :].zero_()
        lhs = torch.zeros((last - first, left.shape[1]), dtype=right.dtype)
        lhs[start - first : stop - first] = left
    for tile in range(0, last - first, TILE_ROWS):
        out[tile : tile + TILE_ROWS].addmm_(lhs[tile : tile + TILE_ROWS], right)
    return out[start - first : stop - first]


class ModuleAverage:
    """One targeted module's average for one output.

    Args:
        module (`LoraModule`): the module (from `AdapterLayout.modules`).
        factors (`Mapping[int, ModuleFactors]`): each checkpoint's factors, by step (see `read_module_factors`).
        weights (`Mapping[int, float]`): each source's effective weight; the base is step 0 (its B is 0). They sum
            to 1, so W0's coefficient is 1.
        mode (`str`, defaults to "exact"): "exact", or "factors" to average A and B separately.
        dtype (`torch.dtype`, defaults to float32): the accumulation dtype (float32 or float64).

    Example:

    ```python
    >>> average = ModuleAverage(module, {20: f20, 40: f40}, {0: -0.1, 20: 0.3, 40: 0.8})
    >>> out = average.rows(w0_rows, start=0)   # rows [0, len(w0_rows)) of the averaged weight, float32
    ```
    """

    def __init__(
        self,
        module: LoraModule,
        factors: Mapping[int, ModuleFactors],
        weights: Mapping[int, float],
        *,
        mode: str = "exact",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if mode not in LORA_AVERAGES:
            raise UsageError(f"--lora-average must be one of {', '.join(LORA_AVERAGES)}, got {mode!r}")
        if mode == "factors" and module.magnitude is not None:
            raise UsageError("--lora-average factors does not apply to DoRA adapters (use_dora); leave it at exact")
        check_weights(weights, factors)
        self.module, self.mode, self.dtype = module, mode, dtype
        self.base_weight = weights.get(BASE_STEP, 0.0)
        steps = [step for step in sorted(weights) if step != BASE_STEP]
        used = [step for step in steps if weights[step] != 0]
        s = module.scaling
        rows, cols = module.shape
        lefts = {step: s * _oriented(module, factors[step])[0].double() for step in steps}  # s·B, rows of ΔW
        rights = {step: _oriented(module, factors[step])[1].double() for step in steps}
        self._bias_terms = [(s * weights[step], factors[step].lora_bias) for step in steps if factors[step].lora_bias is not None]
        if mode == "factors":
            self._left = sum((weights[step] * lefts[step] for step in steps), torch.zeros(rows, module.rank, dtype=torch.float64))
            self._right = sum((weights[step] * rights[step] for step in steps), torch.zeros(module.rank, cols, dtype=torch.float64))
        elif module.magnitude is None:
            self._left = torch.cat([torch.zeros(rows, 0, dtype=torch.float64), *(weights[step] * lefts[step] for step in used)], dim=1)
            self._right = torch.cat([torch.zeros(0, cols, dtype=torch.float64), *(rights[step] for step in used)], dim=0)
        else:  # DoRA: per checkpoint, its weight, s·B, A, the magnitude; and the squared norm of each row of s·ΔW
            self._dora = [(weights[step], lefts[step], rights[step].to(dtype), factors[step].magnitude.double()) for step in used]
            self._delta_norms = [((lefts[step] @ (rights[step] @ rights[step].t())) * lefts[step]).sum(dim=1) for step in used]
            self._left = torch.zeros(rows, 0, dtype=torch.float64)  # the block's own left factor is built per block
            self._right = torch.cat([torch.zeros(0, cols, dtype=torch.float64), *(rights[step] for step in used)], dim=0)
        self._left = self._left.to(dtype)
        self._right = self._right.to(dtype).contiguous()

    @property
    def rank(self) -> int:
        """The rank of the stacked product (r·K exact, r with factors)."""
        return self._right.shape[0]

    def rows(self, w0_rows: torch.Tensor, start: int) -> torch.Tensor:
        """Rows `[start, start + len(w0_rows))` of the averaged weight, from the same rows of W0 (as stored).

        DoRA on a transposed weight (`module.rows_independent` False) needs the whole tensor in one block.

        Returns:
            `torch.Tensor`: the rows in the accumulation dtype (a view into a buffer of whole tiles).
        """
        stop = start + w0_rows.shape[0]
        if self.module.magnitude is None:
            return _plus_product(w0_rows, self._left[start:stop], self._right, start)
        if self.module.transposed:
            return self._dora_whole(w0_rows.to(self.dtype), start, stop)
        return self._dora_rows(w0_rows.to(self.dtype), start, stop)

    def _dora_rows(self, w0: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """DoRA where each output feature is a row: Σ wᵢ·(mᵢ / ‖W0 + s·ΔWᵢ‖)·(W0 + s·ΔWᵢ) + w_base·W0, which is
        c ⊙ W0 + [f₁·s·w₁B₁ | … ] @ [A₁; …] with per-row factors fᵢ = mᵢ / ‖W0 + s·ΔWᵢ‖ and c = w_base + Σ wᵢ·fᵢ.
        The norms come from ‖W0‖² + 2⟨W0, s·ΔWᵢ⟩ + ‖s·ΔWᵢ‖² (float64), the cross terms from one matmul
        W0 @ [A₁; …]ᵀ: two matmuls per block whatever the number of checkpoints."""
        crossed = _plus_product(torch.zeros(w0.shape[0], self._right.shape[0], dtype=self.dtype), w0, self._right.t(), start).double()
        w0_norms = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float64) ** 2
        coefficient = torch.full((w0.shape[0],), float(self.base_weight), dtype=torch.float64)
        scaled, offset = [], 0
        for (w, left, right, magnitude), delta_norms in zip(self._dora, self._delta_norms):
            rank = right.shape[0]
            left = left[start:stop]
            norms = (w0_norms + 2 * (left * crossed[:, offset : offset + rank]).sum(dim=1) + delta_norms[start:stop]).sqrt()
            factor = w * magnitude[start:stop] / norms
            coefficient += factor
            scaled.append(factor[:, None] * left)
            offset += rank
        base = w0 * coefficient.to(self.dtype)[:, None]
        left = torch.cat([torch.zeros(w0.shape[0], 0, dtype=torch.float64), *scaled], dim=1).to(self.dtype)
        return _plus_product(base, left, self._right, start)

    def _dora_whole(self, w0: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """DoRA on a transposed weight (Conv1D, embedding), whose norms run down the columns: each checkpoint's
        merged weight as peft computes it, then weighted; the whole tensor in one block."""
        if (start, stop) != (0, self.module.shape[0]):
            raise ValueError(f"{self.module.weight}: DoRA on a transposed weight needs the whole tensor in one block")
        out = w0 * self.base_weight
        for w, left, right, magnitude in self._dora:
            merged = _plus_product(w0, left.to(self.dtype), right, start)  # W0 + s·ΔW, whose column norms DoRA takes
            merged *= (magnitude.to(self.dtype) / torch.linalg.vector_norm(merged, dim=0)).view(1, -1)
            out.add_(merged, alpha=w)
        return out

    def bias(self, b0: torch.Tensor) -> torch.Tensor:
        """The output bias from the base bias: b0 + s·Σ wᵢ·(lora_B bias)ᵢ (the `lora_bias` option)."""
        out = b0.double()
        for coefficient, lora_bias in self._bias_terms:
            out += coefficient * lora_bias.double()
        return out.to(self.dtype)

    def block_bytes(self, rows: int) -> int:
        """Working memory of `rows(...)` for a block of `rows` rows, beyond the caller's W0 buffer."""
        tiles = -(-rows // TILE_ROWS) + 1
        copies = 1 if self.module.magnitude is None else 3  # DoRA: W0 upcast, W0 scaled, the sum
        return copies * tiles * TILE_ROWS * self.module.shape[1] * torch.finfo(self.dtype).bits // 8


def factor_difference(module: LoraModule, factors: Mapping[int, ModuleFactors], weights: Mapping[int, float]) -> float:
    """‖Δ_factors − Δ_exact‖_F / ‖Δ_exact‖_F for one module: how far averaging A and B separately lands from the
    exact average, computed from Gram matrices of the stacked factors in float64 (no out × in matrix).

    Returns 0.0 when the exact delta is zero and so is the difference.
    """
    check_weights(weights, factors)
    steps = [step for step in sorted(weights) if step != BASE_STEP]
    oriented = [tuple(t.double() for t in _oriented(module, factors[step])) for step in steps]
    w = [weights[step] for step in steps]
    s = module.scaling
    exact_left = torch.cat([s * wi * L for wi, (L, _) in zip(w, oriented)], dim=1)
    exact_right = torch.cat([R for _, R in oriented], dim=0)
    factors_left = s * sum(wi * L for wi, (L, _) in zip(w, oriented))
    factors_right = sum(wi * R for wi, (_, R) in zip(w, oriented))
    exact = _frobenius_squared(exact_left, exact_right)
    difference = _frobenius_squared(torch.cat([exact_left, -factors_left], dim=1), torch.cat([exact_right, factors_right], dim=0))
    if exact == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return math.sqrt(max(difference, 0.0) / exact)


def _frobenius_squared(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖_F² = trace((leftᵀleft)(right rightᵀ)), without forming the product."""
    return float(((left.t() @ left) * (right @ right.t())).sum())


def full_rows(
    theta0_rows: torch.Tensor, copies: Mapping[int, torch.Tensor], weights: Mapping[int, float], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rows of a tensor trained in full: Σ wᵢ·θᵢ, with the base's rows as θ0 (step 0) and each checkpoint's copy.

    Args:
        theta0_rows (`torch.Tensor`): the base tensor's rows (for a tied `lm_head`, the input embedding's).
        copies (`Mapping[int, torch.Tensor]`): the same rows of each checkpoint's copy, by step.
        weights (`Mapping[int, float]`): effective weights by step (the base is step 0).
    """
    check_weights(weights, copies)
    out = torch.zeros(theta0_rows.shape, dtype=dtype)
    for step, w in sorted(weights.items()):
        out.add_((theta0_rows if step == BASE_STEP else copies[step]).to(dtype), alpha=w)
    return out


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of a merged average, whole (the reference driver's output)."""

    name: str
    value: torch.Tensor  # the accumulation dtype for a changed tensor, the base's dtype for an unchanged one
    changed: bool


def iter_merged(
    run: AdapterRun,
    base: WeightSource,
    weights: Mapping[int, float],
    *,
    mode: str = "exact",
    dtype: torch.dtype = torch.float32,
    block_rows: int = TILE_ROWS,
) -> Iterator[MergedTensor]:
    """Every tensor of the merged average, computed block by block: the plain reference driver of this module.

    It reads W0 in blocks of `block_rows` rows and each module's factors once, as a streaming engine does, but keeps
    each finished tensor whole; the engine streams the same calls within its memory budget instead.

    Args:
        run (`AdapterRun`): the adapter checkpoints and their layout.
        base (`WeightSource`): the base model.
        weights (`Mapping[int, float]`): effective weights by step (0: the base).
    """
    layout = run.layout
    steps = [step for step in sorted(weights) if step != BASE_STEP]
    identities = {**base.identities, **run.identities}
    with OpenFiles(identities=identities) as files:
        for name, theta0 in layout.output_tensors(base).items():
            info = base.tensors[theta0]
            if name in layout.modules:
                module = layout.modules[name]
                factors = {step: read_module_factors(module, run.checkpoints[step], files, dtype) for step in steps}
                average = ModuleAverage(module, factors, weights, mode=mode, dtype=dtype)
                rows = module.shape[0]
                block = block_rows if module.rows_independent else rows
                value = torch.cat([average.rows(read_tensor(info, files, start, min(start + block, rows)), start) for start in range(0, rows, block)])
            elif name in layout.lora_biases:
                module = layout.lora_biases[name]
                factors = {step: read_module_factors(module, run.checkpoints[step], files, dtype) for step in steps}
                value = ModuleAverage(module, factors, weights, mode=mode, dtype=dtype).bias(read_tensor(info, files))
            elif name in layout.full_tensors:
                key = layout.full_tensors[name].key
                rows = info.shape[0] if info.shape else 1
                blocks = []
                for start in range(0, rows, block_rows):
                    stop = min(start + block_rows, rows)
                    copies = {step: run.checkpoints[step].read_tensor(key, files, rows=(start, stop)) for step in steps}
                    blocks.append(full_rows(read_tensor(info, files, start, stop), copies, weights, dtype=dtype))
                value = torch.cat(blocks)
            else:
                yield MergedTensor(name, read_tensor(info, files), changed=False)
                continue
            yield MergedTensor(name, value, changed=True)
