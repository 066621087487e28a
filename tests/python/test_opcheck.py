"""torch.library.opcheck on flash_kda::fwd (CPU): the schema's mutation annotations, the fake
implementation and AOT dispatch agree with what the real kernel does."""

from __future__ import annotations

import pytest
import torch

import flash_kda
from flash_kda import reference


@pytest.mark.parametrize(
    ("sizes", "state_dtype"),
    [
        ({"batch": 2, "tokens": 9}, torch.float32),
        ({"seqlens": [5, 0, 4]}, torch.bfloat16),
        ({"batch": 1, "tokens": 4}, None),
    ],
    ids=["fixed-fp32-state", "varlen-bf16-state", "no-state"],
)
def test_opcheck(sizes: dict[str, object], state_dtype: torch.dtype | None) -> None:
    inputs = reference.random_inputs(
        **sizes, heads=2, head_dim_k=16, head_dim_v=16, initial_state_dtype=state_dtype
    )
    kwargs = inputs.fwd_kwargs()
    out = torch.zeros_like(inputs.v)
    final_state = None if state_dtype is None else torch.zeros(inputs.state_shape(), dtype=state_dtype)
    args = (
        kwargs["q"], kwargs["k"], kwargs["v"], kwargs["g"], kwargs["beta"], kwargs["scale"], out,
        kwargs["A_log"], kwargs["dt_bias"], kwargs["lower_bound"], kwargs["initial_state"], final_state,
        kwargs["cu_seqlens"],
    )  # fmt: skip
    torch.library.opcheck(torch.ops.flash_kda.fwd.default, args)


def test_torch_compile_fullgraph() -> None:
    """Dynamo traces flash_kda.fwd (argument checks included) into one graph around the opaque op."""
    inputs = reference.random_inputs(
        seqlens=[5, 0, 4], heads=2, head_dim_k=16, head_dim_v=16, initial_state_dtype=torch.float32
    )

    def forward(kwargs: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty_like(kwargs["v"])
        final_state = torch.empty(kwargs["initial_state"].shape)
        flash_kda.fwd(out=out, final_state=final_state, **kwargs)
        return out, final_state

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    out, final_state = compiled(inputs.fwd_kwargs())
    eager_out, eager_state = forward(inputs.fwd_kwargs())
    assert torch.equal(out, eager_out)
    assert torch.equal(final_state, eager_state)
