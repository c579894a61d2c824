"""Where ghost and sync leave the math alone (one ghost batch, a sync group of one), a bnfx batch
norm is torch's: torch's own module database (``module_db``, the batch-norm entries) run on
converted modules through every door, against torch's module through the same door.

The generic checks of PyTorch's ``test/test_modules.py`` that apply on CPU are re-created
here: forward, non-contiguous and channels-last input, gradcheck and gradgradcheck, forward-
mode AD, the error inputs, repr, dtype conversion and state_dict round trips.
"""

from __future__ import annotations

import copy
import functools
import io
import re

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.testing._internal.common_modules import module_db

import bnfx
from bnfx.convert import Conversion, converted_forward
from world_of_one import world_of_one

BATCH_NORMS = [info for info in module_db if info.name in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")]
ONE_CHUNK = 1 << 30  # a ghost batch larger than any batch: one chunk


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Each test compiles its modules anew: every sample is a new module of one class, more
    recompiles of its forward than Dynamo's default limit."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024):
        yield


@pytest.fixture(scope="module")
def group_name():
    with world_of_one() as group:
        yield group.group_name


def _ghost(module, group_name):
    return bnfx.convert(module, ghost_batch_size=ONE_CHUNK)


def _sync_group_of_one(module, group_name):
    # convert() keeps a world of one plain (nothing to synchronize); the sync op over it is
    # what a group of one computes, so convert each module to it directly
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.forward = functools.partial(converted_forward, m, Conversion("sync", group_name=group_name))
    return module


def _compiled(module):
    return torch.compile(module, backend="aot_eager", fullgraph=True)


def _compiled_reference(module):
    """torch's module compiled; where torch's compile refuses an input its eager module takes
    (``momentum=None`` reads the counter on the host: a data-dependent guard), eager torch is
    the reference bnfx's compiled door must match."""
    compiled = _compiled(module)

    def call(input):
        try:
            return compiled(input)
        except Exception as compile_error:  # noqa: BLE001
            try:
                return module(input)
            except Exception:  # noqa: BLE001
                raise compile_error from None

    return call


# door -> (bnfx's module from torch's, the same door for torch's module)
DOORS = {
    "convert": (_ghost, lambda m: m),
    "convert-sync": (_sync_group_of_one, lambda m: m),
    "convert-compile": (lambda m, g: _compiled(_ghost(m, g)), _compiled_reference),
    "backend": (
        lambda m, g: torch.compile(
            m, backend="bnfx", options={"ghost_batch_size": ONE_CHUNK, "inner": "aot_eager"}, fullgraph=True
        ),
        _compiled_reference,
    ),
    "transform": (
        lambda m, g: bnfx.transform(torch.fx.symbolic_trace(torch.nn.Sequential(m)), ghost_batch_size=ONE_CHUNK),
        lambda m: m,
    ),
}


def _samples(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _pair(info, sample, dtype, training, door, group_name):
    """torch's module and bnfx's (deep copies of one module), each through ``door``."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reference = info.module_cls(*args, **kwargs).to(dtype).train(training)
    make_bnfx, make_torch = DOORS[door]
    converted = copy.deepcopy(reference)
    return reference, make_torch(reference), converted, make_bnfx(converted, group_name)


def _outcome(call, input, module):
    """``(output, input and parameter gradients)`` of a step with a dense upstream gradient, or
    the exception raised."""
    input = input.detach().clone().requires_grad_(input.requires_grad)
    try:
        out = call(input)
        grads = ()
        wrt = [t for t in (input, *module.parameters()) if t.requires_grad]
        if wrt and out.requires_grad:
            upstream = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()
            grads = torch.autograd.grad(out, wrt, upstream, allow_unused=True, materialize_grads=True)
        return out, grads
    except Exception as error:  # noqa: BLE001  (compared with torch's)
        return error


def _assert_same(got, want, context):
    if isinstance(want, Exception):
        assert isinstance(got, Exception), f"{context}: torch raised {want!r}, bnfx returned"
        # torch's type, or a subclass (Dynamo's TorchRuntimeError is a RuntimeError: bnfx's fake
        # kernels refuse at trace time what torch's compiled kernel refuses when it runs)
        assert isinstance(got, type(want)), f"{context}: torch raised {type(want).__name__}, bnfx {got!r}"
        return
    assert not isinstance(got, Exception), f"{context}: bnfx raised {got!r}, torch returned"
    torch.testing.assert_close(got[0], want[0], msg=lambda m: f"{context}, output: {m}")
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    assert len(got[1]) == len(want[1])
    for index, (g, w) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(g, w, msg=lambda m: f"{context}, gradient {index}: {m}")


def _assert_same_state(converted, reference, context):
    for (name, got), (_, want) in zip(converted.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got, want, msg=lambda m: f"{context}, {name}: {m}")


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.name)
def test_module_db_samples_give_torchs_results(info, training, dtype, door, group_name):
    if door in ("convert-compile", "backend", "transform") and dtype == torch.float64:
        pytest.skip("graph doors in float32 only: each sample traces anew (the suite's time)")
    if door == "backend" and not training:
        pytest.skip("the backend leaves eval-mode batch norm to torch")
    for sample in _samples(info, dtype, training):
        reference, torch_call, converted, bnfx_call = _pair(info, sample, dtype, training, door, group_name)
        [input] = sample.forward_input.args
        for step in range(2):  # the state after one step feeds the second
            context = f"{info.name} {sample.desc or 'default'} {door} step {step}"
            _assert_same(_outcome(bnfx_call, input, converted), _outcome(torch_call, input, reference), context)
            _assert_same_state(converted, reference, context)


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.name)
def test_module_db_error_inputs_raise_torchs_errors(info, door, group_name):
    for training in (True, False):
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                               training=training)
        assert errors
        for error_input in errors:
            sample = error_input.module_error_input
            reference, torch_call, converted, bnfx_call = _pair(info, sample, torch.float32, training, door, group_name)
            [input] = sample.forward_input.args
            want, got = _outcome(torch_call, input, reference), _outcome(bnfx_call, input, converted)
            _assert_same(got, want, f"{info.name} {door}")
            if door in ("convert", "convert-sync") and re.search(error_input.error_regex, str(want)):
                # eager: the error itself, with torch's words
                assert isinstance(got, error_input.error_type)
                assert re.search(error_input.error_regex, str(got)), got


# Inputs module_db does not name, each a case torch answers: results or errors.
def _odd_inputs():
    c = 3
    return {
        "empty batch": (torch.nn.BatchNorm2d(c), torch.randn(0, c, 2, 2)),
        "empty spatial": (torch.nn.BatchNorm2d(c), torch.randn(4, c, 0, 2)),
        "momentum None, empty": (torch.nn.BatchNorm1d(c, momentum=None), torch.randn(0, c)),
        "wrong channels": (torch.nn.BatchNorm2d(c), torch.randn(4, c + 2, 2, 2)),
        "wrong channels, no state": (torch.nn.BatchNorm2d(c, track_running_stats=False), torch.randn(4, c + 2, 2, 2)),
        "wrong channels, no affine": (torch.nn.BatchNorm1d(c, affine=False), torch.randn(4, c - 1)),
        "wrong channels, empty": (torch.nn.BatchNorm1d(c), torch.randn(0, c + 1)),
        "one value": (torch.nn.BatchNorm1d(c), torch.randn(1, c)),
        "integer input": (torch.nn.BatchNorm2d(c), torch.ones(4, c, 2, 2, dtype=torch.int64)),
        "complex input": (torch.nn.BatchNorm2d(c), torch.randn(4, c, 2, 2, dtype=torch.complex64)),
        "float64 input, float32 module": (torch.nn.BatchNorm2d(c), torch.randn(4, c, 2, 2, dtype=torch.float64)),
        "float32 input, float64 module": (torch.nn.BatchNorm2d(c).double(), torch.randn(4, c, 2, 2)),
        "bfloat16 input, float32 module": (torch.nn.BatchNorm2d(c), torch.randn(4, c, 2, 2).bfloat16()),
        "float16 input, bfloat16 module": (torch.nn.BatchNorm2d(c).bfloat16(), torch.randn(4, c, 2, 2).half()),
        "eps 0": (torch.nn.BatchNorm2d(c, eps=0.0), torch.randn(4, c, 2, 2)),
        "wrong rank": (torch.nn.BatchNorm2d(c), torch.randn(4, c, 2)),
    }


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("case", list(_odd_inputs()))
def test_odd_inputs_give_torchs_result_or_error(case, door, group_name):
    module, input = _odd_inputs()[case]
    if door in ("convert-compile", "backend") and not input.is_floating_point():
        pytest.skip("Dynamo raises its own error for integer and complex input, in both")
    make_bnfx, make_torch = DOORS[door]
    converted = copy.deepcopy(module)
    bnfx_call = make_bnfx(converted, group_name)
    if door == "convert-sync" and case == "wrong channels, empty":
        # the one documented difference: sync checks sizes on an empty share too, since a rank
        # must refuse what its peers (with samples) refuse rather than wait for them
        with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
            bnfx_call(input)
        return
    for step in range(2):
        context = f"{case} {door} step {step}"
        want, got = _outcome(make_torch(module), input, module), _outcome(bnfx_call, input, converted)
        _assert_same(got, want, context)
        if not isinstance(want, Exception):
            _assert_same_state(converted, module, context)


@pytest.mark.parametrize("chunks", [1, 2], ids=["one chunk", "two chunks"])
@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.name)
def test_gradcheck_and_gradgradcheck(info, chunks):
    """test_modules.py's test_grad and test_gradgrad, forward-mode AD included, on converted
    modules in float64 (two ghost batches too)."""
    for sample in _samples(info, torch.float64, training=True):
        [input] = sample.forward_input.args
        # a few values per channel keep the numerical Jacobians small
        input = input.detach()[(slice(0, 4),) + (slice(None),) + (slice(0, 2),) * (input.dim() - 2)]
        if input.shape[0] < 2 * chunks:
            continue
        module = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs).double()
        bnfx.convert(module, ghost_batch_size=ONE_CHUNK if chunks == 1 else input.shape[0] // 2)
        params = dict(module.named_parameters())

        def call(x, *values):
            return torch.func.functional_call(module, dict(zip(params, values)), (x,))

        inputs = (input.detach().requires_grad_(), *params.values())
        assert torch.autograd.gradcheck(call, inputs, check_forward_ad=True, check_batched_grad=False)
        if sample.desc in ("", "affine", "not_affine"):  # second derivatives: with and without a weight
            assert torch.autograd.gradgradcheck(call, inputs)


@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.name)
def test_forward_mode_ad_gives_torchs_tangents(info, group_name):
    for training in (True, False):
        for sample in _samples(info, torch.float64, training, requires_grad=False):
            [input] = sample.forward_input.args
            tangent = torch.randn_like(input)
            tangents = []
            for make in (lambda m, g: m, _ghost, _sync_group_of_one):  # torch's, then bnfx's
                module = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
                module = make(module.double().train(training), group_name)
                with forward_ad.dual_level():
                    tangents.append(forward_ad.unpack_dual(module(forward_ad.make_dual(input, tangent))).tangent)
            torch.testing.assert_close(tangents[1], tangents[0])
            torch.testing.assert_close(tangents[2], tangents[0])


@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.name)
def test_non_contiguous_and_channels_last_input(info):
    for sample in _samples(info, torch.float32, training=True):
        [input] = sample.forward_input.args
        reference = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        converted = bnfx.convert(copy.deepcopy(reference), ghost_batch_size=ONE_CHUNK)
        layouts = [input.detach().repeat_interleave(2, dim=-1)[..., ::2]]  # strided, not contiguous
        if input.dim() in (4, 5):
            fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
            layouts.append(input.detach().contiguous(memory_format=fmt))
        for x in layouts:
            x.requires_grad_()
            _assert_same(_outcome(converted, x, converted), _outcome(reference, x, reference), info.name)
            _assert_same_state(converted, reference, info.name)


def test_repr_dtype_conversion_and_state_dict_round_trip():
    reference = torch.nn.BatchNorm2d(3, momentum=None)
    converted = bnfx.convert(copy.deepcopy(reference), ghost_batch_size=ONE_CHUNK)
    assert repr(converted) == repr(reference)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    reference.double()(x)
    converted.double()(x)  # .double() after convert: the converted forward follows the module
    _assert_same_state(converted, reference, "double")
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    fresh = bnfx.convert(torch.nn.BatchNorm2d(3, momentum=None).double(), ghost_batch_size=ONE_CHUNK)
    fresh.load_state_dict(torch.load(buffer))
    _assert_same(_outcome(fresh, x, fresh), _outcome(reference, x, reference), "loaded")
    _assert_same_state(fresh, reference, "loaded")


@pytest.mark.parametrize("door", ["convert", "transform"])
def test_export_refuses_wrong_sizes_as_torch_does(door):
    """torch.export, the last door: a wrong-size weight is refused while exporting (bnfx's fake
    kernels, as torch's meta kernels refuse it), a right one exports torch's result."""
    x = torch.randn(4, 5, 2, 2)
    for channels, works in ((5, True), (3, False)):
        reference = torch.nn.BatchNorm2d(channels, track_running_stats=False)
        model = copy.deepcopy(reference)
        if door == "convert":
            bnfx.convert(model, ghost_batch_size=ONE_CHUNK)
        else:
            model = bnfx.transform(torch.fx.symbolic_trace(torch.nn.Sequential(model)), ghost_batch_size=ONE_CHUNK)
        if not works:
            with pytest.raises(RuntimeError, match="weight should contain 5 elements not 3"):
                torch.export.export(model, (x,))
            with pytest.raises(RuntimeError):
                torch.export.export(reference, (x,))
            continue
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), reference(x))
