"""The torch.ops.mhc_gen custom ops as torch sees them (CPU, float64): each passes
torch.library.opcheck (schema, fake implementation, autograd registration), and
the eager shortcut that skips the dispatcher (mhc_gen.library._Op) gives bitwise
the values and gradients of the dispatcher path, which tracing still takes."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mhc_gen
from mhc_gen import library as L
from mhc_gen import reference as R

T, N, C = 5, 3, 7
CFG = (6, 1e-6, 2.0)  # sinkhorn iterations, eps_sk, post_mult
DYN_CFG = (6, 1e-6, 1e-6, 2.0)  # sinkhorn iterations, eps_rms, eps_sk, post_mult


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = R.num_logits(N)

    def leaf(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.requires_grad_()

    x, y = leaf(T, N, C), leaf(T, C)
    phi, b, w = leaf(N * C, m, scale=0.3), leaf(m), leaf(C, scale=0.1, shift=1.0)
    alpha = torch.tensor([0.9, 1.1, 1.3], dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(T, N, generator=g, dtype=torch.float64).requires_grad_()
    h_res = torch.rand(T, N, N, generator=g, dtype=torch.float64).requires_grad_()
    return {
        "pre_dynamic": (x, phi, alpha, b, *DYN_CFG),
        "dynamic_coefficients": (x, phi, alpha, b, *DYN_CFG),
        "static_coefficients": (b, N, *CFG),
        "pre_static": (x, b, *CFG),
        "post_dynamic": (x, y, h_post, h_res),
        "post_static": (x, y, b, *CFG),
        "layer_dynamic": (x, w, phi, alpha, b, *DYN_CFG),
        "layer_static": (x, w, b, 6, 1e-6, 1e-6, 2.0),
    }


OPS = sorted(_inputs())


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    torch.library.opcheck(getattr(L, name).op, _inputs()[name])


def _values_and_grads(fn, args):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("name", OPS)
def test_eager_shortcut_matches_dispatcher(name, monkeypatch):
    op = getattr(L, name)
    dispatched = _values_and_grads(op.op, _inputs()[name])
    monkeypatch.setattr(op, "op", None)  # the eager call must not reach the dispatcher
    eager = _values_and_grads(op, _inputs()[name])
    for got, want in zip(eager, dispatched, strict=True):
        assert torch.equal(got, want)


class _Recorder(TorchDispatchMode):
    """A dispatch mode that records the ops it sees."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", OPS)
def test_dispatch_modes_see_the_op(name):
    """Under a dispatch mode (FakeTensor, FLOP counters, ...) the shortcut steps aside."""
    with torch.no_grad(), _Recorder() as mode:
        getattr(L, name)(*_inputs()[name])
    assert f"mhc_gen.{name}" in mode.seen


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", OPS)
def test_torch_function_modes_see_the_op(name):
    with torch.no_grad(), _FunctionRecorder() as mode:
        getattr(L, name)(*_inputs()[name])
    assert f"mhc_gen.{name}.default" in mode.seen


@pytest.mark.parametrize("dynamic", [True, False])
def test_traced_graph_holds_the_custom_ops(dynamic):
    model = torch.nn.Sequential(
        mhc_gen.MHCConnection(torch.nn.Linear(C, C), C, N, dynamic), mhc_gen.MHCLayer(C, N, dynamic)
    ).double()
    x = torch.randn(2, T, N, C, dtype=torch.float64, requires_grad=True)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    kind = "dynamic" if dynamic else "static"
    assert {f"mhc_gen.{op}_{kind}.default" for op in ("pre", "post", "layer")} <= set(seen)
    assert torch.equal(out, model(x))


def test_ops_without_autograd_take_the_dispatcher_when_a_gradient_is_wanted(monkeypatch):
    """A backward op under create_graph: torch's handling, not a graph-less shortcut."""
    op = L.post_dynamic_backward
    calls = []
    dispatcher = op.op
    monkeypatch.setattr(op, "op", lambda *a: calls.append(1) or dispatcher(*a))
    x, y, h_post, h_res = _inputs()["post_dynamic"]
    grad = torch.ones_like(x)
    with torch.no_grad():
        op(grad, x, y, h_post, h_res)
    assert calls == []
    op(grad, x, y, h_post, h_res)
    assert calls == [1]


@pytest.mark.parametrize("dynamic", [True, False])
def test_inference_mode_matches_no_grad(dynamic):
    model = torch.nn.Sequential(
        mhc_gen.MHCConnection(torch.nn.Linear(C, C), C, N, dynamic), mhc_gen.MHCLayer(C, N, dynamic)
    ).double()
    x = torch.randn(2, T, N, C, dtype=torch.float64)
    with torch.inference_mode():
        inferred = model(x)
    with torch.no_grad():
        assert torch.equal(inferred, model(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_records_the_custom_ops():
    """Deprecated, but legacy ONNX export still traces: it must record the ops."""
    model = mhc_gen.MHCConnection(torch.nn.Linear(C, C), C, N, True).double()
    x = torch.randn(2, T, N, C, dtype=torch.float64)
    with pytest.warns(torch.jit.TracerWarning):  # ops.py's shape checks are Python branches
        traced = torch.jit.trace(model, (x,), check_trace=False)
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert {"mhc_gen::pre_dynamic", "mhc_gen::post_dynamic"} <= kinds
    assert "prim::PythonOp" not in kinds
    assert torch.equal(traced(x), model(x))


def test_compile_with_dynamic_shapes_builds_one_graph():
    model = torch.nn.Sequential(
        mhc_gen.MHCConnection(torch.nn.Linear(C, C), C, N, True), mhc_gen.MHCLayer(C, N, True)
    ).double()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=backend)
    for tokens in (4, 6, 10):  # none equal to N or C: torch unifies equal sizes
        x = torch.randn(2, tokens, N, C, dtype=torch.float64)
        assert torch.equal(compiled(x), model(x))
    assert len(graphs) == 1
