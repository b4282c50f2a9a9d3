"""jaxbn on a GPU: a correctness check against PyTorch's cuDNN batch norm on the same device,
then batch norm and training-step speed against flax.linen.BatchNorm and PyTorch.

Usage (from the repository root; ``PYTHONPATH=.`` in front where jaxbn is not installed):
    python -m benchmarks.gpu            # on a GPU: the check and both tables (a few minutes,
                                        # mostly XLA compiling the ResNet-18 steps)
    python -m benchmarks.gpu --quick    # fewer shapes, batch 128 only, fewer repeats
    python -m benchmarks.gpu --smoke    # the tiny CPU-sized run, also on a GPU

It prints, in order:
  1. the correctness check, on the device: jaxbn.BatchNorm against torch.nn.BatchNorm1d/2d
     (cuDNN on a GPU) after one training step — y, dx, dscale, dbias and the running mean and
     variance, float32 and bfloat16 — as max |jaxbn − torch| / max |torch| per quantity, with
     the tolerances; the script stops with exit status 1 if any is exceeded;
  2. batch norm fwd+bwd in µs for conv-like and dense-like shapes, float32 and bfloat16: jaxbn,
     flax.linen.BatchNorm (computing in the input's dtype), torch NCHW, torch channels_last, and
     the bandwidth bound (8 activation passes ÷ the measured copy bandwidth of a large array);
     ratios are jaxbn's time over each;
  3. a training step (forward, backward, SGD with momentum; ``train.step``'s) of the ConvNet and
     the CIFAR ResNet-18 on 32×32×3 inputs at batch 128 and 256: the jaxbn models computing in
     bfloat16 (float32 parameters), the same models with flax.linen.BatchNorm, and the PyTorch
     twins under bfloat16 autocast in channels_last; images per second and time ratios.

JAX is timed with ``block_until_ready`` after several queued calls, PyTorch with CUDA events
after several calls, both after warm-up (compilation, cuDNN autotuning), as the median of
repeats with the contenders taking turns. Without a GPU it says so in one line and runs the
same three parts on tiny shapes on the CPU (PyTorch timed by the wall clock), exit status 0.
If only one of JAX and PyTorch sees a GPU, it says so: with JAX on a GPU the PyTorch columns
are left empty (the correctness check then uses PyTorch on the CPU); with JAX on the CPU it is
the smoke run.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import bn, train_step
from benchmarks.timing import (
    copy_bandwidth,
    interleaved_rounds,
    jax_timer,
    script_parser,
    torch_timer,
)
from tests.torch_twins import to_jax

GPU_PLATFORMS = ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures."""

    name: str
    check_shapes: tuple[tuple[int, ...], ...]  # NHWC or [N, C]
    bn_shapes: tuple[tuple[int, ...], ...]
    batches: tuple[int, ...]
    side: int  # input images are side × side × 3
    conv: dict  # ConvNet fields
    res: dict  # ResNet fields
    model_names: tuple[str, str]  # labels of the ConvNet and the ResNet
    repeats: int  # timed measurements per contender (median)
    rounds: int  # rounds the measurements are spread over (contenders take turns)
    bn_calls: int  # calls per measurement
    step_calls: int
    copy_elements: int  # float32 elements of the array whose copy gives the bandwidth
    # PyTorch's CPU threads (None: its default). One for the tiny shapes: with more, a shared
    # machine times the threads' hand-offs (up to a scheduler tick each), not the work.
    torch_threads: int | None = None


RESNET18 = dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512))
CONVNET = dict(widths=(64, 128, 256), hidden=512)
CHECK_SHAPES = ((16, 16, 16, 32), (256, 128))
FULL = Plan(
    "full",
    CHECK_SHAPES,
    ((256, 56, 56, 64), (256, 14, 14, 256), (4096, 1024)),
    (128, 256),
    32,
    CONVNET,
    RESNET18,
    ("ConvNet", "ResNet-18"),
    repeats=10,
    rounds=5,
    bn_calls=20,
    step_calls=10,
    copy_elements=2**29,
)
QUICK = dataclasses.replace(
    FULL, name="quick", bn_shapes=((256, 56, 56, 64), (4096, 1024)), batches=(128,), repeats=5
)
SMOKE = Plan(
    "smoke",
    ((4, 4, 4, 8), (16, 8)),
    ((4, 4, 4, 8), (16, 8)),
    (4,),
    8,
    dict(widths=(4, 8, 8), hidden=8),
    dict(stage_sizes=(1, 1), widths=(4, 8)),
    ("ConvNet-tiny", "ResNet-tiny"),
    repeats=2,
    rounds=1,
    bn_calls=1,
    step_calls=1,
    copy_elements=2**16,
    torch_threads=1,
)

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}
# max |jaxbn − torch| / max |torch| allowed, per dtype and quantity. bfloat16 y and dx are
# rounded to 8 significant bits (1e-2: 2 units of the last place at the largest value); the
# gradients of the float32 parameters and the running statistics are float32 sums on both
# sides. The classic bug, a biased running variance, is off by 0.1·σ²/(n − 1) — 7e-5 relative
# at the check's conv shape (σ² = 4, n = 4096) — well above the 1e-5 allowed.
TOLERANCES = {
    "float32": {"y": 1e-4, "dx": 1e-4, "dscale": 1e-4, "dbias": 1e-4, "mean": 1e-5, "var": 1e-5},
    "bfloat16": {"y": 1e-2, "dx": 1e-2, "dscale": 1e-3, "dbias": 1e-3, "mean": 1e-5, "var": 1e-5},
}
QUANTITIES = tuple(TOLERANCES["float32"])


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where each framework runs; ``note`` says anything unusual (one line, or empty)."""

    jax_gpu: bool
    torch_device: torch.device
    torch_timed: bool  # torch columns in the tables (False: only JAX sees a GPU)
    note: str


def find_devices() -> Devices:
    jax_devices = jax.devices()
    jax_gpu = any(d.platform in GPU_PLATFORMS for d in jax_devices)
    torch_gpu = torch.cuda.is_available()
    jax_kind = jax_devices[0].device_kind
    if jax_gpu and torch_gpu:
        return Devices(True, torch.device("cuda"), True, "")
    if jax_gpu:
        return Devices(
            True,
            torch.device("cpu"),
            False,
            f"JAX sees a GPU ({jax_kind}) but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}): the torch columns are skipped; the correctness check "
            "compares with torch on the CPU",
        )
    if torch_gpu:
        return Devices(
            False,
            torch.device("cpu"),
            True,
            f"no GPU for JAX (jax {jax.__version__} sees {jax_devices[0].platform} only) although "
            f"torch sees {torch.cuda.get_device_name(0)}: the smoke run on the CPU, torch on "
            "the CPU too",
        )
    return Devices(
        False,
        torch.device("cpu"),
        True,
        f"no GPU found (jax: {jax_devices[0].platform}, torch.cuda.is_available(): False): "
        "a smoke run on tiny shapes on the CPU through the same code paths",
    )


def bound_microseconds(shape, dtype, bandwidth: float) -> float:
    """The bandwidth bound of a BN fwd+bwd: its :func:`benchmarks.bn.bytes_moved` (8 passes)
    at ``bandwidth`` bytes per second, in µs."""
    return bn.bytes_moved(shape, dtype, bn.PASSES_FWD_BWD) / bandwidth * 1e6


def relative_diff(actual, expected) -> float:
    """max |actual − expected| / max |expected| (the scale of the quantity), in float64."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), np.finfo(np.float32).tiny))


def _torch_nhwc(t: torch.Tensor):
    """A torch (N, C, ...) tensor (any device, bfloat16 too) as a host array in NHWC."""
    return np.asarray(to_jax(t, channels_last=True), np.float64)


# 1. correctness ------------------------------------------------------------------------------


def check_batch_norm(shape, dtype_name: str, device: torch.device) -> dict[str, float]:
    """One training fwd+bwd of jaxbn.BatchNorm and torch's BatchNorm on the same input, weights
    and upstream gradient; the relative differences of each quantity."""
    jdtype, tdtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    channels = shape[-1]
    x_np = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    g_np = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)

    x = jnp.asarray(x_np, jdtype)
    _, fwd_bwd, _ = bn.jax_functions("jaxbn", x)
    params = {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)}
    y, (dparams, dx), updates = fwd_bwd(params, x, jnp.asarray(g_np, jdtype))
    stats = updates["batch_stats"]

    layer, x_t, g_t = bn.torch_layer(x_np, g_np, tdtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    y_t = bn.torch_closures(layer, x_t, g_t)[0]()

    def host(t):
        return t.detach().float().cpu().numpy()

    pairs = {
        "y": (y, _torch_nhwc(y_t)),
        "dx": (dx, _torch_nhwc(x_t.grad)),
        "dscale": (dparams["scale"], host(layer.weight.grad)),
        "dbias": (dparams["bias"], host(layer.bias.grad)),
        "mean": (stats["mean"], host(layer.running_mean)),
        "var": (stats["var"], host(layer.running_var)),
    }
    return {k: relative_diff(*jax.device_get(pairs[k])) for k in QUANTITIES}


def correctness(plan: Plan, devices: Devices) -> bool:
    where = f"jaxbn on {jax.devices()[0].device_kind} vs torch on {devices.torch_device}"
    if devices.torch_device.type == "cuda":
        where += f" (cuDNN {torch.backends.cudnn.version()})"
    print(f"\n1. correctness after one training step, {where}")
    print("   max |jaxbn - torch| / max |torch|; tolerances:")
    for dtype_name, tol in TOLERANCES.items():
        print(f"   {dtype_name:<8} " + "  ".join(f"{k} {v:.0e}" for k, v in tol.items()))
    header = f"{'shape':<16} {'dtype':<8} " + " ".join(f"{k:>8}" for k in QUANTITIES) + "  result"
    print(header)
    print("-" * len(header))
    ok = True
    for dtype_name in DTYPES:
        for shape in plan.check_shapes:
            diffs = check_batch_norm(shape, dtype_name, devices.torch_device)
            bad = [k for k, v in diffs.items() if not v <= TOLERANCES[dtype_name][k]]
            ok &= not bad
            print(
                f"{_shape(shape):<16} {dtype_name:<8} "
                + " ".join(f"{diffs[k]:>8.1e}" for k in QUANTITIES)
                + ("  ok" if not bad else f"  FAIL ({', '.join(bad)})")
            )
    print("correctness check " + ("passed" if ok else "FAILED"))
    return ok


# 2. batch norm fwd+bwd ------------------------------------------------------------------------


def _measure(
    fns: dict, plan: Plan, calls: int, devices: Devices, torch_names=()
) -> dict[str, float]:
    """Median seconds per call of each contender (JAX: queued calls then one wait; PyTorch:
    CUDA events on a GPU, the wall clock on the CPU), after a warm-up."""
    timers = {
        name: torch_timer(calls, devices.torch_device) if name in torch_names else jax_timer(calls)
        for name in fns
    }
    for name, fn in fns.items():  # compilation, autotuning, first allocations
        timers[name](fn)
    per_round = interleaved_rounds(fns, plan.repeats, plan.rounds, timers=timers)
    return {name: statistics.median(times) for name, times in per_round.items()}


def bn_table(plan: Plan, devices: Devices, bandwidth: float) -> list[dict]:
    rows = []
    for dtype_name, (jdtype, tdtype) in DTYPES.items():
        for shape in plan.bn_shapes:
            rng = np.random.default_rng(0)
            x_np = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
            g_np = rng.standard_normal(shape).astype(np.float32)
            x, g = jnp.asarray(x_np, jdtype), jnp.asarray(g_np, jdtype)
            fns = {}
            for kind in ("jaxbn", "flax"):
                # Flax computes in the input's dtype, as jaxbn does (its default would be float32)
                variables, fwd_bwd, _ = bn.jax_functions(kind, x, dtype=jdtype)
                fns[kind] = lambda f=fwd_bwd, p=variables["params"], x=x, g=g: f(p, x, g)
            torch_names = []
            if devices.torch_timed:
                layouts = (
                    {"torch": False, "torch_cl": True} if len(shape) == 4 else {"torch": False}
                )
                for name, channels_last in layouts.items():
                    layer = bn.torch_layer(
                        x_np,
                        g_np,
                        tdtype,
                        device=devices.torch_device,
                        channels_last=channels_last,
                    )
                    fns[name] = bn.torch_closures(*layer)[0]
                    torch_names.append(name)
            seconds = _measure(fns, plan, plan.bn_calls, devices, torch_names)
            us = {k: v * 1e6 for k, v in seconds.items()}
            us["bound"] = bound_microseconds(shape, jdtype, bandwidth)
            rows.append({"shape": _shape(shape), "dtype": dtype_name, "us": us})
    return rows


def format_bn(rows: list[dict]) -> str:
    names = ("jaxbn", "flax", "torch", "torch_cl", "bound")
    titles = ("jaxbn µs", "flax µs", "torch µs", "t.cl µs", "bound µs")
    ratios = ("flax", "torch", "torch_cl", "bound")
    header = (
        f"{'shape':<16} {'dtype':<8} "
        + " ".join(f"{t:>10}" for t in titles)
        + " "
        + " ".join(f"{'/' + r.replace('torch_cl', 't.cl'):>7}" for r in ratios)
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        us = r["us"]
        cells = [f"{us[n]:>10.1f}" if n in us else f"{'-':>10}" for n in names]
        cells += [f"{us['jaxbn'] / us[n]:>7.2f}" if n in us else f"{'-':>7}" for n in ratios]
        lines.append(f"{r['shape']:<16} {r['dtype']:<8} " + " ".join(cells))
    return "\n".join(lines)


# 3. training step -----------------------------------------------------------------------------


def step_table(plan: Plan, devices: Devices) -> list[dict]:
    pairs = train_step.model_pairs(plan.conv, plan.res, plan.side, jnp.bfloat16)
    labels = dict(zip(pairs, plan.model_names, strict=True))
    norms = train_step.norms(jnp.bfloat16)
    rows = []
    for name, (make, make_torch) in pairs.items():
        for batch in plan.batches:
            rng = np.random.default_rng(0)
            x_np = rng.standard_normal((batch, plan.side, plan.side, 3)).astype(np.float32)
            y_np = rng.integers(0, 10, batch).astype(np.int32)
            x, y = jnp.asarray(x_np), jnp.asarray(y_np)
            fns = {
                kind: train_step.jax_step(make(norms[kind]), x, y)[0] for kind in ("jaxbn", "flax")
            }
            torch_names = []
            if devices.torch_timed:
                fns["torch"] = train_step.torch_step(
                    make_torch(),
                    x_np,
                    y_np,
                    device=devices.torch_device,
                    autocast_dtype=torch.bfloat16,
                    channels_last=True,
                )
                torch_names.append("torch")
            seconds = _measure(fns, plan, plan.step_calls, devices, torch_names)
            rows.append({"model": labels[name], "batch": batch, "seconds": seconds})
    return rows


def format_steps(rows: list[dict]) -> str:
    names = ("jaxbn", "flax", "torch")
    header = (
        f"{'model':<13} {'batch':>5} "
        + " ".join(f"{n + ' img/s':>12}" for n in names)
        + f" {'jaxbn/flax':>10} {'jaxbn/torch':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        s = r["seconds"]
        cells = [f"{r['batch'] / s[n]:>12.0f}" if n in s else f"{'-':>12}" for n in names]
        cells += [
            f"{s['jaxbn'] / s[n]:>{w}.2f}" if n in s else f"{'-':>{w}}"
            for n, w in (("flax", 10), ("torch", 11))
        ]
        lines.append(f"{r['model']:<13} {r['batch']:>5} " + " ".join(cells))
    return "\n".join(lines)


# main -----------------------------------------------------------------------------------------


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def main(argv: list[str] | None = None) -> int:
    parser = script_parser("python -m benchmarks.gpu", __doc__)
    parser.add_argument("--smoke", action="store_true", help="the tiny run, even on a GPU")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, batch 128, 5 repeats")
    parser.add_argument("--repeats", type=int, help="timed repeats per contender (median)")
    args = parser.parse_args(argv)

    devices = find_devices()
    if devices.note:
        print(devices.note)
    plan = SMOKE if args.smoke or not devices.jax_gpu else QUICK if args.quick else FULL
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    if devices.torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick, as XLA autotunes
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on "
        f"{devices.torch_device}; {plan.name} run, median of {plan.repeats}"
    )
    sys.stdout.flush()
    threads = torch.get_num_threads()
    try:
        if plan.torch_threads:
            torch.set_num_threads(plan.torch_threads)
        return run(plan, devices)
    finally:
        torch.set_num_threads(threads)


def run(plan: Plan, devices: Devices) -> int:
    """The three parts; 1 if the correctness check fails (then nothing is timed), else 0."""
    if not correctness(plan, devices):
        return 1

    bandwidth = copy_bandwidth((plan.copy_elements,), jnp.float32, max(plan.repeats, 3))
    print(
        f"\n2. batch norm fwd+bwd (training mode), µs per call; ratios: jaxbn's time / each; "
        f"bound: 8 passes at the copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    sys.stdout.flush()
    print(format_bn(bn_table(plan, devices, bandwidth)))

    print(
        f"\n3. training step (forward, backward, SGD), {plan.side}x{plan.side}x3 inputs: JAX "
        "models in bfloat16 (float32 parameters), torch under bfloat16 autocast, channels_last; "
        "ratios: jaxbn's time / each"
    )
    sys.stdout.flush()
    print(format_steps(step_table(plan, devices)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
