"""Every Triton op takes bfloat16 and float16 inputs (under the interpreter on CPU): outputs and gradients are finite
and within a stated relative RMS of the float32 reference run on the same (rounded) inputs."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import assert_finite, needs_triton, outputs_and_grads, rel_rms_error
from tests.kernels.test_registered_ops import OPS

# (outputs, gradients) relative-RMS tolerances against the float32 reference: about 3x the largest error measured
# over these ops (bfloat16 4e-3 and 9e-3, float16 3e-4 and 1e-3), whose outputs and gradients are rounded to the
# input dtype (unit roundoff 2^-8 and 2^-11)
HALF_TOLERANCES = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (1.5e-3, 3e-3)}


def _upcast(value):
    """A float32 leaf copy of a tensor input (a state pair element-wise); other values unchanged."""
    if isinstance(value, tuple):
        return tuple(_upcast(x) for x in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().float().requires_grad_(value.requires_grad)
    return value


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_half_precision_inputs_match_the_float32_reference(name, dtype):
    factory = OPS[name][1]
    call, kwargs = factory("triton", dtype)
    reference_call, _ = factory("reference")
    out = outputs_and_grads(call, kwargs)
    ref = outputs_and_grads(reference_call, {key: _upcast(value) for key, value in kwargs.items()})
    out_tol, grad_tol = HALF_TOLERANCES[dtype]
    for index, (got, want) in enumerate(zip(out.outputs, ref.outputs)):
        assert_finite(**{f"output {index}": got})
        assert rel_rms_error(got, want) < out_tol, f"output {index}: {rel_rms_error(got, want):.2e}"
    for key, want in ref.grads.items():
        got = out.grads[key]
        if want is None:
            continue
        assert got is not None, f"{key} got no gradient"
        assert_finite(**{f"grad {key}": got})
        assert rel_rms_error(got, want) < grad_tol, f"grad {key}: {rel_rms_error(got, want):.2e}"
