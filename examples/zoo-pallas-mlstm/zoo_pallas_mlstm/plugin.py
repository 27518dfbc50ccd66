"""The ``zoo`` entry point of zoo-pallas-mlstm: registers the ``pallas_chunkwise`` cell backend."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from zoo.registry import hookimpl
from zoo_pallas_mlstm.kernel import pallas_chunkwise


class PallasChunkwiseKwargs(BaseModel):
    """Options of ``pallas_chunkwise`` (each one a keyword argument of the cell)."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(64, ge=1, description="steps per chunk (any sequence length works); compiled "
                                                  "kernels round it up to a power of two of at least 16")
    interpret: bool | None = Field(None, description="None: Triton on CUDA, Mosaic on TPU, the interpreted "
                                                     "kernel elsewhere (CPU), chosen per lowering platform; "
                                                     "True: always interpret; False: always compile")


# cpu: the interpreted kernel (what the tests run). cuda: Pallas' Triton backend; lowered from the CPU with
# jax.export(platforms=("cuda",)) and run on an NVIDIA H200 (jax 0.11.2), where it passed zoo's parity matrix.
# tpu: Pallas' Mosaic backend; jax.export(platforms=("tpu",)) lowers it to a tpu_custom_call, but it was never
# compiled or run on a TPU. See README.md.
PLATFORMS = ("cpu", "cuda", "tpu")
# Not exportable: Pallas blocks cannot take the symbolic batch and sequence sizes that zoo's exporters use,
# jax.export refuses the Triton custom call (no compatibility guarantee), and lowering for several platforms at
# once fails. See README.md.
EXPORTABLE = False


@hookimpl
def register_cells(register):
    register(
        "pallas_chunkwise",
        pallas_chunkwise,
        supports_state=True,
        exportable=EXPORTABLE,
        platforms=PLATFORMS,
        sequence_constraint=None,
        kwargs_model=PallasChunkwiseKwargs,
        description=("chunkwise mLSTM forward as one Pallas kernel (interpreted on CPU, Triton on CUDA, Mosaic "
                     "on TPU: lowering only, never run on a TPU), backward through the built-in chunkwise; any S; "
                     "states in and out; not exportable"),
    )
