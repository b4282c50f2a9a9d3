"""Command-line flags shared by the training scripts.

Parsing happens before JAX is imported: ``--devices N`` on a CPU-only machine must set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts. This module
therefore imports nothing from JAX.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

NORMS = ("batch", "group", "layer", "none")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


@dataclass(frozen=True)
class Defaults:
    """A script's defaults: what makes a useful run of that model on the bundled data."""

    epochs: int
    batch_size: int
    lr: float
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4


def build_parser(prog: str, description: str, defaults: Defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--use-bn", action="store_true", help="batch norm (same as --norm batch)")
    model.add_argument("--norm", choices=NORMS, help="normalization layer (default: none)")
    model.add_argument(
        "--bn-momentum",
        type=float,
        default=0.1,
        help="batch norm momentum, PyTorch meaning: weight of the new batch (default 0.1)",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits")
    data.add_argument("--data-dir", default="data", help="dataset root, torchvision layout")
    data.add_argument(
        "--no-download", action="store_true", help="never download; fail if files are missing"
    )
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=defaults.epochs)
    opt.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch")
    opt.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    opt.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="learning-rate schedule (cosine decay to 0 over the run, or constant)",
    )
    opt.add_argument(
        "--sgd-momentum",
        type=float,
        default=defaults.sgd_momentum,
        help="SGD momentum of the optimizer (not batch norm's)",
    )
    opt.add_argument(
        "--momentum",
        action=_AmbiguousMomentum,
        help="ambiguous here: use --sgd-momentum or --bn-momentum",
    )
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    opt.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("devices and hosts")
    run.add_argument(
        "--devices", type=int, default=1, help="data-parallel devices per process (CPU: simulated)"
    )
    run.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-host runs")
    run.add_argument("--num-processes", type=int, default=1)
    run.add_argument("--process-id", type=int, default=0)
    run.add_argument(
        "--join-timeout",
        type=float,
        default=60,
        help="seconds to wait for the coordinator and the other processes (default 60)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--workdir", help="write metrics.jsonl and checkpoints here")
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its newest good checkpoint (same flags; "
        "--epochs may grow only with --schedule constant)",
    )
    out.add_argument("--inspect", action="store_true", help="print the BN statistics table")
    return parser


class _AmbiguousMomentum(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--momentum is ambiguous: use --sgd-momentum (optimizer) or --bn-momentum (batch norm)"
        )


def parse_args(
    prog: str, description: str, defaults: Defaults, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parses and checks the flags, and prepares the simulated devices before JAX starts."""
    parser = build_parser(prog, description, defaults)
    args = parser.parse_args(argv)
    if args.use_bn and args.norm not in (None, "batch"):
        parser.error(f"--use-bn contradicts --norm {args.norm}")
    args.norm = "batch" if args.use_bn else (args.norm or "none")
    for flag in ("epochs", "batch_size", "devices", "num_processes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.join_timeout <= 0:
        parser.error("--join-timeout must be positive")
    if args.resume and not args.workdir:
        parser.error("--resume needs --workdir")
    if args.num_processes > 1 and not args.coordinator:
        parser.error("--num-processes > 1 needs --coordinator HOST:PORT")
    request_cpu_devices(args.devices)
    return args


def request_cpu_devices(count: int) -> None:
    """Asks XLA for ``count`` host devices, if JAX has not started yet (no effect after)."""
    if count > 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"


def run_cli(
    prog: str, description: str, defaults: Defaults, make_model, argv: list[str] | None = None
) -> int:
    """A script's whole ``main``: parse the flags, then start JAX and train.

    ``train.loop`` (and with it JAX) is imported only after parsing, so ``--devices`` can still
    choose the number of simulated CPU devices.
    """
    args = parse_args(prog, description, defaults, argv)
    from train.loop import run_script

    return run_script(args, make_model)
