"""What differs between training stages: one `Task` per kind of stage, behind one interface.

The training loop (emu2_jax.train) and `aot` see a stage only through the `Task` protocol below;
the loop, optimizer, shardings and checkpoints are shared. A stage config names its kind in
`config.task`. A new kind of stage is a new module here and one entry in `TASKS`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import ml_collections
from flax import linen as nn

from emu2_jax import metrics
from emu2_jax import sharding as sh
from emu2_jax.data import layout
from emu2_jax.tasks import decoder, llm, video_decoder

PyTree = Any


class Task(Protocol):
    """What the training loop and `aot` need of a stage."""
    config: ml_collections.ConfigDict
    model_cfg: Any
    model: nn.Module
    components: tuple[str, ...]        # top-level parameter subtrees; `config.trainable` names some
    lora: bool                         # only LoRA adapters of `llm` train
    batch_layout: layout.Layout        # names, shapes and dtypes of the batch (its keys are fed)
    metric_names: tuple[str, ...]      # the loss parts `micro_loss` returns, summed over microbatches

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> Task:
        """The stage's task for `config`."""

    def dummy_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape structs of a batch of `rows` rows (abstract init, AOT)."""

    def loss_normalizers(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Whole-batch totals [accum, rows, ...] that weight each microbatch's loss."""

    def micro_loss(self, params: PyTree, micro: Mapping[str, jax.Array], normalizers: Mapping[str, jax.Array],
                   rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, {metric_name: part}) of one microbatch; the microbatches' losses sum to the batch's."""

    def counts(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """{'tokens': ..., 'images': ...} processed in the batch, for throughput."""

    def training_flops(self, abstract_params: PyTree) -> float:
        """Model FLOPs of one optimizer step (MFU's numerator; causal attention at half)."""

    def create_iterator(self, batch_size: int, shard_index: int, shard_count: int) -> Iterator:
        """This process's batches: a checkpointable iterator (get_state/set_state/stats/close)."""

    def create_sampler(self, mesh: jax.sharding.Mesh, rules: sh.Rules, workdir: str
                       ) -> Callable[[int, PyTree, metrics.SummaryWriter | None], None] | None:
        """`sample(step, params, writer)` writing samples into the workdir and TensorBoard (process 0
        writes), or None when the stage has none."""


# Classes, not instances: their `components` are known before a model is built (config checks).
TASKS: dict[str, type[Task]] = {
    "llm": llm.LlmTask,
    "decoder": decoder.DecoderTask,
    "video_decoder": video_decoder.VideoDecoderTask,
}


def create(config: ml_collections.ConfigDict) -> Task:
    """The task that `config.task` names."""
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}; known: {sorted(TASKS)}")
    return TASKS[config.task].create(config)
