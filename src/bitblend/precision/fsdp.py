"""FSDP2 mixed-precision policies from a precision recipe (this package names the dtypes).

`fully_shard` casts each unit's all-gathered parameters to `param_dtype` for compute and
reduce-scatters gradients in `reduce_dtype`. bf16-mixed gathers bf16 parameters (half the
all-gather volume) and reduces in fp32; modules the recipe keeps in fp32 (norms, heads,
keep_fp32 patterns) get a unit of their own with an fp32 policy; 32-true changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch


def fsdp_policies(autocast_dtype: torch.dtype | None, weight_dtype: torch.dtype) -> tuple[Any, Any]:
    """(policy of the transformer blocks and the root, policy of the fp32-kept modules)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    if autocast_dtype == torch.bfloat16 and weight_dtype == torch.float32:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), fp32
    return MixedPrecisionPolicy(), fp32
