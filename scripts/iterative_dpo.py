#!/usr/bin/env python
"""Iterative DPO with BEMA reference models: K rounds of `bema-offline dpo` chained by `bema-average`.

Round 1's reference is the base model. Round k+1's reference is the BEMA of round k's checkpoints, averaged with
update_freq = save_steps, so every saved checkpoint is an update step. θ0 of each average is the weights the round
started from (its policy), since update_after is 0. The policy of round k+1 starts from its reference (the
default of `bema-offline dpo`) or, with --policy-init last, from round k's last checkpoint.

Everything lands under --workdir:

    round-1/checkpoint-N/ ...   round-1-bema/   round-2/ ...   round-K-bema/   rounds.json

`rounds.json` records every round's inputs and outputs (paths, sha256 fingerprints, steps, schedule); it is
rewritten after each round, so an interrupted run still says what was done.

Example:

    python scripts/iterative_dpo.py --base-model ./base --dataset prefs.jsonl --rounds 3 \\
        --save-steps 100 --max-steps 1000 --learning-rate 5e-7 --workdir runs/iterative
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from bema_offline import BEMASchedule, BemaError, UsageError, __version__, average
from bema_offline.train.dpo import parse_config_overrides, require_dpo_extra, train_dpo
from bema_offline.output.fingerprint import folder_fingerprint

ROUNDS_FILE = "rounds.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, required=True, help="Model folder: round 1's policy and reference.")
    parser.add_argument("--dataset", type=Path, action="append", required=True,
                        help="Preference data; give it once (every round) or once per round.")
    parser.add_argument("--rounds", type=int, required=True, help="Number of rounds K.")
    parser.add_argument("--workdir", type=Path, required=True, help="Where the rounds, averages and rounds.json go.")
    parser.add_argument("--policy-init", choices=["reference", "last"], default="reference",
                        help="Start round k+1's policy from its reference (the BEMA) or from round k's last checkpoint.")
    dpo = parser.add_argument_group("DPO (each round)")
    dpo.add_argument("--save-steps", type=int, required=True, help="Checkpoint cadence; also the BEMA update_freq.")
    dpo.add_argument("--max-steps", type=int)
    dpo.add_argument("--beta", type=float)
    dpo.add_argument("--learning-rate", type=float)
    dpo.add_argument("--per-device-train-batch-size", type=int)
    dpo.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    dpo.add_argument("--precompute-ref-log-probs", action="store_true")
    dpo.add_argument("--config-set", action="append", default=[], metavar="KEY=VALUE", help="Any other DPOConfig field.")
    bema = parser.add_argument_group("BEMA (each average; update_freq = --save-steps, update_after = 0)")
    bema.add_argument("--ema-power", type=float, default=0.5)
    bema.add_argument("--bias-power", type=float, default=0.2)
    bema.add_argument("--lag", type=float, default=10.0)
    bema.add_argument("--multiplier", type=float, default=1.0)
    bema.add_argument("--min-ema-multiplier", type=float, default=0.0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the rounds; return the rounds.json record."""
    require_dpo_extra()
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    if len(args.dataset) not in (1, args.rounds):
        raise UsageError(f"--dataset given {len(args.dataset)} times; give it once, or once per round ({args.rounds})")
    workdir: Path = args.workdir
    if workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"--workdir {workdir} is not empty; choose a new folder")
    overrides = parse_config_overrides(args.config_set)
    schedule = BEMASchedule(
        update_freq=args.save_steps,
        ema_power=args.ema_power,
        bias_power=args.bias_power,
        lag=args.lag,
        multiplier=args.multiplier,
        min_ema_multiplier=args.min_ema_multiplier,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    record = {
        "tool": "bema-offline scripts/iterative_dpo.py",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"path": str(args.base_model), "fingerprint": folder_fingerprint(args.base_model)},
        "policy_init": args.policy_init,
        "schedule": schedule.to_dict(),
        "rounds": [],
    }
    reference, policy = args.base_model, args.base_model
    for k in range(1, args.rounds + 1):
        dataset = args.dataset[0] if len(args.dataset) == 1 else args.dataset[k - 1]
        run_dir, bema_dir = workdir / f"round-{k}", workdir / f"round-{k}-bema"
        print(f"== round {k}/{args.rounds}: reference {reference}, policy {policy}, dataset {dataset}")
        result = train_dpo(
            reference,
            dataset,
            run_dir,
            policy=policy,
            beta=args.beta,
            learning_rate=args.learning_rate,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            save_steps=args.save_steps,
            bf16=args.bf16,
            precompute_ref_log_probs=args.precompute_ref_log_probs,
            config_overrides=overrides,
        )
        print(f"bema-average {run_dir} --base-model {policy} --update-freq {args.save_steps} -o {bema_dir}")
        averaged = average(run_dir, bema_dir, schedule=schedule, base_model=policy)
        output = averaged.outputs[0]
        record["rounds"].append(
            {
                "round": k,
                "reference": {"path": str(reference), "fingerprint": result.reference_fingerprint},
                "policy": {"path": str(policy), "fingerprint": folder_fingerprint(policy)},
                "dataset": result.record["dataset"],
                "dpo": result.record["dpo"],
                "output_dir": str(run_dir),
                "global_step": result.record["global_step"],
                "checkpoints": result.checkpoints,
                "average": {
                    "path": str(bema_dir),
                    "fingerprint": folder_fingerprint(bema_dir),
                    "kind": output.kind,
                    "step": output.step,
                    "theta0": str(policy),
                    "update_steps": averaged.plan.schedules[0].update_steps,
                    "ignored_steps": averaged.plan.ignored_steps,
                    "effective_weights": {str(step): weight for step, weight in sorted(output.weights.items())},
                },
            }
        )
        (workdir / ROUNDS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        reference = bema_dir
        policy = bema_dir if args.policy_init == "reference" else run_dir / f"checkpoint-{max(result.checkpoints)}"
    print(f"done: {args.rounds} rounds; the last BEMA is {reference}; see {workdir / ROUNDS_FILE}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
