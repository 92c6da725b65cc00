"""Command line (also `python -m posttrain`).

posttrain run CONFIG.yaml [key.sub=value ...] [--overwrite] [--restart-from STAGE]
posttrain plan CONFIG.yaml [key.sub=value ...]
posttrain status RUN_DIR
posttrain rewards list
posttrain rewards score --config R.yaml --input in.jsonl --output out.jsonl
posttrain report RUN_DIR [--output DIR]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from posttrain import plan, report, rewards_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Staged post-training: SFT, GRPO and more, from one YAML file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a pipeline config")
    run.add_argument("config", type=Path, help="pipeline YAML file")
    run.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. stages.1.rollout.n=4"
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument(
        "--restart-from", metavar="STAGE", help="redo this stage and the ones after it"
    )
    status = commands.add_parser("status", help="stages of a run folder: state and progress")
    status.add_argument("run_dir", type=Path, help="run folder, e.g. runs/quickstart")
    rewards_cli.add_commands(commands)
    plan.add_commands(commands)
    report.add_commands(commands)
    # Overrides may come before or after options: collect the stray ones too.
    args, extra = parser.parse_known_args(argv)
    if args.command in ("rewards", "report", "status"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        commands = {"rewards": rewards_cli.run, "report": report.run, "status": _status}
        return _guarded(commands[args.command], args)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    if args.command == "plan":
        return _guarded(plan.run, args)
    return _run(args)


def _guarded(command, args: argparse.Namespace) -> int:
    """Run a command; errors the user must fix print as one message and exit with 2."""
    from posttrain.config.load import ConfigError
    from posttrain.data.load import DataError
    from rewards import RewardError, RewardLookupError

    try:
        return command(args)
    except (
        ConfigError,
        DataError,
        RewardLookupError,
        RewardError,
        FileNotFoundError,
        TypeError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _status(args: argparse.Namespace) -> int:
    from posttrain.resume import format_status, status

    if not (args.run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run folder (no config.yaml)")
    print(format_status(status(args.run_dir)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from posttrain.config.load import ConfigError, load_config
    from posttrain.data.load import DataError
    from posttrain.learner import NonFiniteError
    from posttrain.pipeline import RunFolderError, format_summary, run_pipeline
    from posttrain.resume import StageChangedError
    from rewards import RewardConfigError, RewardLookupError, RewardSignatureError

    # SIGTERM unwinds like Ctrl-C, so engines and servers are stopped by their `finally`s.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_pipeline(
            cfg, args.config, overwrite=args.overwrite, restart_from=args.restart_from
        )
    except (
        ConfigError,
        DataError,
        RewardLookupError,
        RewardSignatureError,
        RewardConfigError,
        RunFolderError,
        StageChangedError,
        FileNotFoundError,
        NonFiniteError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {cfg.run.folder}\n")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
