"""Kernel launching: device -> arch -> selected variant -> one dispatch call.

GPU only and without autograd; mhc_gen.library wraps these as torch ops.
Nothing here syncs the host: pointers, sizes and the current stream go to
the dispatch module, which launches and returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re

import torch

from generator.render import INCLUDE
from generator.spec import Arch, DType, Op, parse

from . import _loader, jit, tuning
from .select import NoKernelError, arch_for_capability, arch_for_gcn, select

DTYPES = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16, torch.float32: DType.FP32}
TORCH_DTYPES = {d: t for t, d in DTYPES.items()}


def _pointer_names() -> tuple[str, ...]:
    """mhc::Ptr's enumerators, in order, as snake_case: kGradHPreIn -> grad_h_pre_in."""
    text = (INCLUDE / "mhc" / "args.h").read_text()
    body = text[text.index("enum Ptr : int {") : text.index("kNumPtrs")]
    names = re.findall(r"^\s+k([A-Za-z0-9]+)\s*,", body, re.M)
    return tuple(re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower() for n in names)


POINTERS = _pointer_names()
_SLOT = {name: i for i, name in enumerate(POINTERS)}

_POISON = contextvars.ContextVar("mhc_gen_poison_outputs", default=False)
_FORCED = contextvars.ContextVar("mhc_gen_forced_variants", default=frozenset())


@contextlib.contextmanager
def poisoned_outputs():
    """Within this context GPU outputs start as NaN, so an unwritten element shows."""
    token = _POISON.set(True)
    try:
        yield
    finally:
        _POISON.reset(token)


@contextlib.contextmanager
def forced_variant(*names: str):
    """Within this context each op named runs exactly that variant instead of
    the selected one (tests use it to cover every variant)."""
    for name in names:
        parse(name)
    token = _FORCED.set(frozenset(names))
    try:
        yield
    finally:
        _FORCED.reset(token)


def empty(shape, dtype, device):
    if _POISON.get():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def target_arch(device_index: int):
    """(backend, arch) whose variants run on the device: the device's own, or
    MHC_GEN_ARCH (e.g. sm_80 on an H100, to test the A100 code path; the variants
    carry PTX, so an older arch's code runs on a newer GPU)."""
    backend, arch = device_arch(device_index)
    forced = os.environ.get("MHC_GEN_ARCH")
    if not forced:
        return backend, arch
    try:
        over = Arch(forced)
    except ValueError:
        choices = [a.value for a in Arch]
        raise ValueError(f"MHC_GEN_ARCH={forced!r}: expected one of {choices}") from None
    if over.backend != backend:
        raise ValueError(f"MHC_GEN_ARCH={forced}: not a {backend} arch")
    return backend, over


@functools.cache
def device_arch(device_index: int):
    if torch.version.hip:
        props = torch.cuda.get_device_properties(device_index)
        return "hip", arch_for_gcn(props.gcnArchName)
    return "cuda", arch_for_capability(*torch.cuda.get_device_capability(device_index))


@functools.cache
def device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


@functools.cache
def _selected(
    op: Op,
    n: int,
    hidden: int,
    dtype: DType,
    backend: str,
    arch: Arch,
    policy: str,
    gpu: str,
    bucket: int | None = None,
):
    """(launch function, table index): prebuilt first (tuned where a table for this
    GPU says so), else compiled on demand (mhc_gen.jit)."""
    mod = _loader.module(backend)
    table = _loader.table(backend)
    tuned = tuning.winners(gpu, torch.__version__, torch.version.cuda)
    try:
        spec = select(op, n, hidden, dtype, arch, table, tuned, bucket)
        if spec.n is None and policy == "specialize" and jit.spec_for(op, n, dtype, arch):
            # (split_dyn has no compile-time-n form: its n counts parts, not streams)
            raise NoKernelError(f"{spec.name} serves n = {n} at run time")
        return mod.launch, table[spec.name]
    except NoKernelError as miss:
        target = jit.spec_for(op, n, dtype, arch)
        if target is None or policy == "off":
            if mod is None:
                raise RuntimeError(
                    f"mhc_gen: no {backend} kernels are built and compilation on demand is off; "
                    f"run python build.py --arch {arch.value}"
                ) from miss
            raise
        return jit.load(target).launch, 0


def has_variant(op: Op, n: int, hidden: int, dtype: DType, device_index: int) -> bool:
    """Whether a variant serves the request (for optional fast paths)."""
    try:
        backend, arch = target_arch(device_index)
        _selected(op, n, hidden, dtype, backend, arch, jit.policy(), device_name(device_index))
    except NoKernelError:
        return False
    return True


def _variant(op: Op, n: int, hidden: int, dtype: DType, device_index: int, tokens: int):
    backend, arch = target_arch(device_index)
    for name in _FORCED.get():
        if parse(name).op is op:  # a prebuilt variant, named by a test
            return _loader.module(backend).launch, _loader.table(backend)[name]
    gpu = device_name(device_index)
    bucket = tuning.token_bucket(tokens)
    # An op without a hidden axis has no variant that depends on it: its selection is keyed
    # without it, so that a shape-dependent value (split_dyn's columns, T·C along the rows)
    # does not add an entry to _selected's cache for every T.
    hidden = hidden if op.has_hidden_axis else 1
    return _selected(op, n, hidden, dtype, backend, arch, jit.policy(), gpu, bucket)


def _raw_stream(device_index: int) -> int:
    """The current stream's handle on a device (a torch without the C shortcut: the
    Python API)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is None:
        return torch.cuda.current_stream(device_index).cuda_stream
    return get(device_index)


def launch(
    op: Op,
    device: torch.device,
    dtype: DType,
    *,
    n: int,
    hidden: int,
    tokens: int,
    sinkhorn_iters: int = 20,
    eps_rms: float = 1e-6,
    eps_sk: float = 1e-6,
    post_mult: float = 2.0,
    splits: int = 0,
    **tensors,
) -> None:
    """Launches the variant for (op, n, hidden, dtype) on device's current stream.
    ``tensors`` maps mhc::Ptr names (snake_case) to tensors or None."""
    fn, index = _variant(op, n, hidden, dtype, device.index, tokens)
    ptrs = [0] * len(POINTERS)
    for name, t in tensors.items():
        if t is not None:
            ptrs[_SLOT[name]] = t.data_ptr()
    args = (index, ptrs, tokens, hidden, n, int(sinkhorn_iters), int(splits), float(eps_rms),
            float(eps_sk), float(post_mult))  # fmt: skip
    # The raw-stream and device queries are single C calls: the launch path of a small op is
    # host-bound, and torch.cuda.device / current_stream cost several times more.
    dev = device.index if device.index is not None else torch.cuda.current_device()
    stream = _raw_stream(dev)
    if torch.cuda.current_device() == dev:
        fn(*args, stream)
    else:
        with torch.cuda.device(dev):
            fn(*args, stream)
