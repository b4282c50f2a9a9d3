"""Command-line flags shared by the training scripts.

Parsing happens before JAX is imported: ``--devices N`` on a CPU-only machine must set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts. This module
therefore imports nothing from JAX.

Every flag is checked here, before anything runs: a value outside its domain is one line,
``PROG: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

from train.config import Run

NORMS = ("batch", "group", "layer", "none")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
DTYPES = ("float32", "bfloat16")
AUGMENTED = ("cifar10",)  # the datasets --augment applies to (on by default there)
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed: 2**32 would init like 0


@dataclass(frozen=True)
class Defaults:
    """A script's defaults: what makes a useful run of that model on the bundled data."""

    epochs: int
    batch_size: int
    lr: float
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default in its help."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def bn_momentum(text: str) -> float | None:
    """``--bn-momentum``: a number in [0, 1], or ``none`` (cumulative average, PyTorch's
    ``momentum=None``)."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number in [0, 1] or none, got {text!r}"
        ) from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] or none, got {text}")
    return value


def build_parser(
    prog: str, description: str, defaults: Defaults, *, sweep: bool = False
) -> argparse.ArgumentParser:
    """The flags of a training script; ``sweep=True`` (``train.compare``) leaves out the ones
    a sweep sets itself or cannot honour (norm, learning rate, workdir, resume, keep), so that
    argparse refuses them instead of ignoring them."""
    # no abbreviations: `train.compare --lr 0.1` must be refused, not read as `--lrs 0.1`
    parser = OneLineParser(
        prog=prog, description=description, formatter_class=_HelpFormatter, allow_abbrev=False
    )
    model = parser.add_argument_group("model")
    if not sweep:
        model.add_argument(
            "--use-bn", action="store_true", help="batch norm (same as --norm batch)"
        )
        model.add_argument(
            "--norm", choices=NORMS, help="normalization layer (unset: none; batch with --use-bn)"
        )
    model.add_argument(
        "--bn-momentum",
        type=bn_momentum,
        default=0.1,
        help="batch norm momentum, PyTorch meaning: weight of the new batch, in [0, 1]; "
        "'none': cumulative average",
    )
    model.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="activation dtype; parameters, batch norm statistics and the loss stay float32",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="training data")
    data.add_argument("--data-dir", default="data", help="dataset root, torchvision layout")
    data.add_argument(
        "--no-download", action="store_true", help="never download; fail if files are missing"
    )
    data.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random 32x32 crops of the 4-pixel zero-padded training images and horizontal "
        "flips, on the device, keyed by --seed, epoch and step (unset: on for cifar10; "
        "cifar10 only: a mirrored digit is another digit)",
    )
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs, at least 1")
    opt.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="global batch, at least 1"
    )
    if not sweep:
        opt.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate, > 0")
    opt.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="constant" if sweep else "cosine",
        help="learning-rate schedule (cosine decay to 0 over the run, or constant)",
    )
    opt.add_argument(
        "--sgd-momentum",
        type=float,
        default=defaults.sgd_momentum,
        help="SGD momentum of the optimizer (not batch norm's), in [0, 1)",
    )
    opt.add_argument(
        "--momentum",
        action=_AmbiguousMomentum,
        default=argparse.SUPPRESS,
        help="ambiguous here: use --sgd-momentum or --bn-momentum",
    )
    opt.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="L2 weight decay, >= 0"
    )
    opt.add_argument(
        "--seed", type=int, default=0, help=f"initialization and batch order, in [0, {MAX_SEED}]"
    )
    run = parser.add_argument_group("devices and hosts")
    run.add_argument(
        "--devices", type=int, default=1, help="data-parallel devices per process (CPU: simulated)"
    )
    run.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-host runs")
    run.add_argument("--num-processes", type=int, default=1, help="processes of a multi-host run")
    run.add_argument("--process-id", type=int, default=0, help="this process's rank")
    run.add_argument(
        "--join-timeout",
        type=float,
        default=60,
        help="seconds to wait for the coordinator and the other processes, and for every "
        "process to see the file process 0 writes into --workdir (it must be shared)",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show the collectives' own output in multi-process runs (gloo's '[Gloo] Rank 0 is "
        "connected to ...' lines, hidden by default)",
    )
    out = parser.add_argument_group("output")
    if not sweep:
        out.add_argument(
            "--workdir",
            help="write config.json, metrics.jsonl and checkpoints here (several processes: "
            "one directory all of them share)",
        )
        out.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --workdir from its newest good checkpoint (same flags; "
            "--epochs may grow only with --schedule constant)",
        )
        out.add_argument(
            "--keep",
            type=int,
            default=2,
            help="epoch checkpoints kept in --workdir (the newest N); a stopped run's mid-epoch "
            "checkpoint comes on top until the next epoch checkpoint replaces it",
        )
    out.add_argument("--inspect", action="store_true", help="print the BN statistics table")
    return parser


class _AmbiguousMomentum(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--momentum is ambiguous: use --sgd-momentum (optimizer) or --bn-momentum (batch norm)"
        )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses (``parser.error``: one line, exit 2) every value outside its domain."""
    for flag in ("epochs", "batch_size", "devices", "num_processes"):
        value = getattr(args, flag)
        if value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process-id must be in [0, {args.num_processes - 1}]")
    for name, value in (("--lr", getattr(args, "lr", 1.0)), ("--join-timeout", args.join_timeout)):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{name} must be a positive number, got {value}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.sgd_momentum < 1:
        parser.error(f"--sgd-momentum must be in [0, 1), got {args.sgd_momentum}")
    if not 0 <= args.seed <= MAX_SEED:  # numpy's generator refuses < 0, JAX's keys take 32 bits
        parser.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if getattr(args, "keep", 1) < 1:
        parser.error(f"--keep must be at least 1, got {args.keep}")
    if args.num_processes > 1 and not args.coordinator:
        parser.error("--num-processes > 1 needs --coordinator HOST:PORT")
    augment = getattr(args, "augment", None)
    if augment and args.dataset not in AUGMENTED:
        parser.error(
            f"--augment applies to --dataset {' or '.join(AUGMENTED)} only (random crops and "
            f"horizontal flips; a mirrored digit is another digit), not to {args.dataset}"
        )
    args.augment = args.dataset in AUGMENTED if augment is None else augment


def parse_args(
    prog: str, description: str, defaults: Defaults, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parses and checks the flags, and prepares the simulated devices before JAX starts.

    ``train.config.Run.from_flags`` turns the result into the typed run the loop takes.
    """
    parser = build_parser(prog, description, defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.use_bn and args.norm not in (None, "batch"):
        parser.error(f"--use-bn contradicts --norm {args.norm}")
    args.norm = "batch" if args.use_bn else (args.norm or "none")
    check_args(parser, args)
    if args.resume and not args.workdir:
        parser.error("--resume needs --workdir")
    args.command = [*prog.split(), *argv]  # what a stopped run prints to be continued
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
    run = Run.from_flags(parse_args(prog, description, defaults, argv))
    from train.loop import run_script

    return run_script(run, make_model)
