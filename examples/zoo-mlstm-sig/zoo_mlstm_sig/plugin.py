"""The hooks xlstm-zoo calls: registers the mLSTMsig cells and the ``rmsnorm_offset`` norm."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from zoo.registry import hookimpl

from zoo_mlstm_sig.cells import chunkwise_sig, parallel_sig, recurrent_sig
from zoo_mlstm_sig.norms import OffsetRMSNorm

PLATFORMS = ("cpu", "cuda", "tpu")  # plain jax.numpy: runs and exports wherever JAX does


class ChunkwiseSigKwargs(BaseModel):
    """Options of ``chunkwise_sig``."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(64, ge=1, description="steps per chunk (any sequence length works)")


@hookimpl
def register_cells(register):
    common = {"exportable": True, "platforms": PLATFORMS, "reference": "parallel_sig"}
    register("parallel_sig", parallel_sig, supports_state=False, **common,
             description="mLSTMsig, quadratic parallel form (the reference of the sig cells); no states")
    register("chunkwise_sig", chunkwise_sig, supports_state=True, state_reference="recurrent_sig",
             kwargs_model=ChunkwiseSigKwargs, **common,
             description="mLSTMsig, chunkwise: linear in S, any S, states in and out")
    register("recurrent_sig", recurrent_sig, supports_state=True, state_reference="chunkwise_sig", **common,
             description="mLSTMsig, one step at a time; states in and out (for decoding)")


@hookimpl
def register_norms(register):
    register("rmsnorm_offset", OffsetRMSNorm, description="RMSNorm with learned scale and offset (per head)")
