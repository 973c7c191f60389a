"""Fully sharded data parallel training (PyTorch's FSDP2), for a model that does not fit one GPU.

Every decoder layer is a shard group of its own, and the rest of the model (embeddings, final norm, head) one more,
the root, over a 1-D device mesh of all the processes. A process holds 1/N of the weights, of their gradients and
of the optimizer state. A layer's weights are gathered on every process just before it runs and freed after it;
its gradients are reduce-scattered as soon as its backward is done.

The recipe runs a layer from its weights (`layers.run_layers`), not through the module's own forward, which is
where FSDP gathers the weights. So each layer gets a forward method of its own, registered with FSDP
(`register_fsdp_forward_method`): it runs `layers.run_layers` over a one-layer view of the model, built while
that layer's weights are gathered, so the maths is the unsharded model's exactly.

Layer dropout: a layer runs on every process when some sample of the global batch runs it (recipe_forward with
`rows`), which is the test one process makes; the all-gathers and reduce-scatters then come in the same order on
every process. A process whose rows all skip the layer computes it and keeps none of its output, so its gradient
there is zero, as a skipped sample's is in one process. A layer that no sample runs is skipped by every process;
its weights get no gradient, and AdamW leaves them and their moments alone, as in one process.

Checkpoints are `torch.distributed.checkpoint` directories: model and optimizer state keyed by parameter name,
each process writing its shards, so any number of processes (one without FSDP too) reads them back.
"""

import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from self_speculation import distributed, layers

RunLayer = Callable[[torch.Tensor, int], torch.Tensor]  # (hidden (B, T, H), layer index) -> hidden


class _OneLayer:
    """Layer `index` of `model` as a model of one layer, what `layers.run_layers` reads. It has its own entry in the
    layer runner's table of weights, read while this layer's weights are gathered (the model's own entry would
    hold other layers' shards)."""

    def __init__(self, model, index: int):
        self.model = SimpleNamespace(layers=[model.model.layers[index]], rotary_emb=model.model.rotary_emb)
        self.config = model.config


def checkpointed(run_layer: RunLayer) -> RunLayer:
    """`run_layer` keeping none of a layer's activations for backward: they are computed again there."""
    return lambda hidden, i: checkpoint(run_layer, hidden, i, use_reentrant=False)


def plain_runner(model) -> RunLayer:
    return lambda hidden, i: layers.run_layers(model, hidden, None, i, i + 1)


def precision(dtype: torch.dtype) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """FSDP's mixed precision for the layers and for the root: weights gathered and computed in `dtype`, gradients
    reduced in float32 into the float32 shards the optimizer updates (the master weights). The root's inputs are
    token ids and the recipe's loss weights, which stay as they are."""
    param_dtype = None if dtype == torch.float32 else dtype
    return (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False))


def shard(model, root: torch.nn.Module, device: torch.device, dtype: torch.dtype,
          activation_checkpointing: bool) -> RunLayer:
    """Shard every decoder layer of `model`, then `root` (a module holding `model`, whose forward runs the recipe)
    with the rest, over all processes on `device`'s type (gloo on the CPU, nccl on GPUs, as the process group was
    started). Every process holds the same whole model (one seed, or one checkpoint) and keeps its shards of it;
    a layer goes to the device as it is sharded, so the whole model is never there. Returns what runs layer i,
    for recipe_forward's `run_layer`."""
    mesh = init_device_mesh(device.type, (distributed.world_size(),), mesh_dim_names=("fsdp",))
    layer_policy, root_policy = precision(dtype)
    runs = []
    for i, layer in enumerate(model.model.layers):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
        layer.run_recipe_layer = partial(layers.run_layers, _OneLayer(model, i), cache=None, start=0, end=1)
        register_fsdp_forward_method(layer, "run_recipe_layer")
        runs.append(layer.run_recipe_layer)
    fully_shard(root, mesh=mesh, mp_policy=root_policy)
    run_layer = lambda hidden, i: runs[i](hidden)  # noqa: E731
    return checkpointed(run_layer) if activation_checkpointing else run_layer


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_parameter_bytes(model) -> int:
    """Bytes of the weights this process holds (its shards, for a sharded model)."""
    return sum(_local(p).nbytes for p in model.parameters())


def local_state_bytes(optimizer) -> int:
    """Bytes of the optimizer state this process holds (AdamW's two moments: its shards, for a sharded model)."""
    return sum(_local(v).nbytes for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.ndim > 0)


def all_finite(model) -> bool:
    """Whether every weight is finite, on every process (each checks its shards; all get the same answer)."""
    local = torch.stack([torch.isfinite(_local(p)).all() for p in model.parameters()]).all()
    return distributed.all_true(bool(local))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on the CPU of the first process (an empty dict on the others)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model, weights: dict[str, torch.Tensor]):
    """A model of `model`'s class and config holding `weights` (a full state dict, on the CPU) and nothing else: it
    is built on the meta device and takes the tensors as they are, so the weights are not copied."""
    with torch.device("meta"):
        whole = type(model)(model.config)
    whole.load_state_dict(weights, assign=True)
    whole.tie_weights()  # assigning gave a tied head its own tensor
    return whole


def load_whole(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """An unsharded checkpoint's state (checkpoint.pt: whole tensors, the optimizer's keyed by position) into a
    sharded `model` and its `optimizer`: every process keeps its shards."""
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=whole)
    set_optimizer_state_dict(model, optimizer, by_name(optimizer_state, model, optimizer), options=whole)


def by_name(optimizer_state: dict, model, optimizer) -> dict:
    """An optimizer state dict keyed by parameter position (torch's own) keyed by parameter name instead, as
    torch.distributed.checkpoint's helpers take it. Positions follow the optimizer's parameter groups."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: v for i, v in optimizer_state["state"].items()},
            "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}


# Sharded checkpoints. `directory` is written as directory.tmp, then swapped in: a crash leaves the old checkpoint
# or the new one whole (as directory.old if it came in the middle of the swap), never a torn one.

TRAINER_STATE = "trainer.pt"  # what is not model or optimizer state (step, schedules, random state), from rank 0


def existing(directory: Path) -> Path | None:
    """`directory` if it holds a whole sharded checkpoint, else `directory`.old if a crash in the middle of a swap
    left that, else None."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    return None


@contextmanager
def _one_process_is_meant():
    """torch.distributed.checkpoint warns whenever it reads or writes without a process group; here that is one
    process continuing a sharded run, as asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _model_and_optimizer(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(directory: Path, model, optimizer, trainer_state: dict,
                    save_trainer_state: Callable[[dict, Path], None]) -> None:
    """Every process writes its shards of the model and optimizer state; the first writes `trainer_state` with
    `save_trainer_state` (an atomic torch.save) and swaps the new checkpoint in."""
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    try:
        with _one_process_is_meant():
            dcp.save(_model_and_optimizer(model, optimizer), checkpoint_id=tmp)
    except CheckpointException as error:  # raised on every process when any failed to write
        if distributed.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(*_first_os_error(error)) from None
    if distributed.rank() == 0:
        save_trainer_state(trainer_state, tmp / TRAINER_STATE)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _first_os_error(error: CheckpointException) -> tuple:
    """(errno, strerror) of the first process's failure, for the one-line message of a failed write."""
    for failure, _ in error.failures.values():
        if isinstance(failure, OSError):
            return failure.errno, failure.strerror or str(failure)
    failure, _ = next(iter(error.failures.values()))
    return 0, str(failure)


def load_checkpoint(directory: Path, model, optimizer) -> None:
    """Read a sharded checkpoint's model and optimizer state into `model` and `optimizer`, whatever the number of
    processes that wrote it and that read it, sharded or not."""
    state = _model_and_optimizer(model, optimizer)
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded checkpoint, in one process without a process group (for tests and
    inspection)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    converted = directory.with_name(directory.name + ".weights.pt")
    try:
        with _one_process_is_meant():
            dcp_to_torch_save(directory, converted)
        return torch.load(converted, weights_only=False)["model"]
    finally:
        converted.unlink(missing_ok=True)
