"""Training with the LayerSkip recipe: data preparation, the optimisation loop, checkpoints that resume exactly,
a CSV of the training curve and held-out per-layer early-exit losses, and a plot of both. A run that cannot go on
(a non-finite loss, a failed write) stops in one line and keeps its last good checkpoint; the data cache and the
checkpoint are each written whole or not at all.

Under torchrun the processes are DistributedDataParallel replicas, or with --fsdp True shards of one model
(sharding.py); either way N processes train as one process with the same --batch_size does."""

import csv
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM)

from self_speculation import distributed, layers
from self_speculation.errors import UsageError, check_range, check_seed
from self_speculation.loading import TOKENIZER_FILES, check_available, check_weights, model_source, resolve_device
from self_speculation.results import ensure_output_dir

from . import corpus, sharding
from .recipe import (
    CURRICULA,
    EXIT_WEIGHTINGS,
    RAMPS,
    Distillation,
    draw_kept,
    dropout_rates,
    early_exit_layers,
    early_exit_weights,
    ramp_scale,
    recipe_forward,
)

MAX_E_SCALE = 1e6  # beyond it the normalised early-exit weights change by less than a part in a million
MAX_TEMPERATURE = 1e3  # τ²·KL is τ² times a difference of two near-equal entropies: far beyond, rounding noise
BACKENDS = ("auto", "nccl", "gloo")  # the process group's under torchrun

# Where every number of TrainConfig may lie, as check_range's bounds (which also refuse nan and infinities); --seed
# has its own check.
RANGES = {
    "vocab_size": dict(low=corpus.MIN_VOCAB_SIZE, high=2**31 - 1),  # token ids are packed as int32
    "num_layers": dict(low=2),  # an early exit needs a layer after it (and the depth weighting a non-zero sum)
    "hidden_size": dict(low=1),
    "intermediate_size": dict(low=1),
    "num_heads": dict(low=1),
    "num_kv_heads": dict(low=1),
    "seq_len": dict(low=2),  # a one-token sequence has no next token to predict: its loss is nan
    "batch_size": dict(low=1),
    "grad_accum": dict(low=1),
    "max_steps": dict(low=1),
    "lr": dict(low=0, low_open=True),
    "min_lr_ratio": dict(low=0, high=1),
    "warmup_steps": dict(low=0),
    "weight_decay": dict(low=0),
    "grad_clip": dict(low=0),
    "p_max": dict(low=0, high=1, high_open=True),
    "rotation": dict(low=1, high=2**63 - 1),  # the curriculum takes the step modulo it in an int64 tensor
    "e_scale": dict(low=0, high=MAX_E_SCALE),
    "distill_weight": dict(low=0, high=1),
    "distill_temperature": dict(low=0, high=MAX_TEMPERATURE, low_open=True),
    "heldout_fraction": dict(low=0, high=1, low_open=True, high_open=True),
    "eval_every": dict(low=1),
    "eval_batches": dict(low=1),
    "save_every": dict(low=1),
}


@dataclass
class TrainConfig:
    output_dir: str = field(metadata={"help": "directory for checkpoints, the final model, the CSV and the plot"})
    data: list[str] = field(
        default_factory=lambda: ["stdlib"],
        metadata={"help": "training text: 'stdlib' (the Python standard library without its tests), "
                          "'site-packages' (the installed packages' Python source without tests or HumanEval), "
                          "files, directories, globs, .jsonl files (a 'text' field per line) or hf:NAME[:CONFIG] (the "
                          "'text' column of a Hugging Face dataset's train split; needs the hub)"},
    )
    init_from: str | None = field(default=None, metadata={"help": "continue from this model directory (else train from scratch)"})
    vocab_size: int = field(default=2048, metadata={
        "help": f"BPE vocabulary when training from scratch (at least {corpus.MIN_VOCAB_SIZE}: the 256 bytes and "
                f"{', '.join(corpus.SPECIAL_TOKENS)})"})
    num_layers: int = field(default=16, metadata={"help": "decoder layers (from scratch)"})
    hidden_size: int = field(default=128, metadata={"help": "hidden size (from scratch)"})
    intermediate_size: int = field(default=352, metadata={"help": "MLP size (from scratch)"})
    num_heads: int = field(default=4, metadata={"help": "attention heads (from scratch)"})
    num_kv_heads: int = field(default=2, metadata={"help": "key/value heads (from scratch)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per packed training sequence"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)"})
    dtype: str = field(default="float32", metadata={
        "help": "training precision: float32, or mixed precision (autocast) in bfloat16 or float16 (float16 with a "
                "gradient scaler); with --fsdp the gathered weights are in that dtype too, and gradients are reduced "
                "in float32 into the float32 shards the optimizer updates", "choices": ("float32", "bfloat16", "float16")})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present; under torchrun one GPU per "
                                                          "process), cpu, cuda or cuda:N"})
    p_max: float = field(default=0.1, metadata={"help": "layer dropout of the last layer (0: no layer dropout)"})
    dropout_ramp: str = field(default="exponential", metadata={"help": "S(t)", "choices": RAMPS})
    curriculum: str = field(
        default="rotational", metadata={"help": "which layers get the early-exit loss (none: last layer only)",
                                        "choices": CURRICULA}
    )
    rotation: int = field(default=4, metadata={"help": "R of the rotational curriculum"})
    e_scale: float = field(default=1.0, metadata={"help": "early-exit loss scale"})
    exit_weighting: str = field(
        default="depth", metadata={"help": "early-exit loss weights: depth (the paper's, growing with depth) or uniform "
                                           "(e_scale for every enabled exit, 1 for the last layer)",
                                   "choices": EXIT_WEIGHTINGS}
    )
    distill_weight: float = field(
        default=0.0, metadata={"help": "self-distillation: share of each early exit's loss that is the KL divergence "
                                       "from the last layer's distribution (0: plain cross-entropy, 1: KL only)"}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "temperature of both distributions in the KL"})
    heldout_fraction: float = field(default=0.05, metadata={"help": "share of files held out for evaluation"})
    eval_every: int = field(default=100, metadata={"help": "steps between held-out evaluations"})
    eval_batches: int = field(default=8, metadata={"help": "held-out micro-batches per evaluation"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=42, metadata={"help": "seed for initialisation, data order and layer dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --output_dir"})
    recommend: bool = field(default=True, metadata={
        "help": "after training, measure the final model as exits.py does (10 HumanEval prompts) and write the "
                "predicted best exit_layer and num_speculations into its config.json, which every script then uses"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun, shard the weights, gradients and optimizer state over the processes (FSDP2: every "
                "decoder layer, then the rest of the model), for a model that does not fit one GPU; checkpoints are "
                "then sharded too, and resume on any number of processes"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "keep no activations inside the decoder layers for the backward pass and compute them again there "
                "(less memory, about a third more compute; the same result)"})
    backend: str = field(default="auto", metadata={
        "help": "process group under torchrun: auto (nccl on GPUs, gloo on the CPU), nccl or gloo",
        "choices": BACKENDS})

    def __post_init__(self):
        check_seed(self.seed)
        for name, bounds in RANGES.items():
            check_range(f"--{name}", getattr(self, name), **bounds)
        if self.lr * self.weight_decay >= 1:
            raise UsageError(f"--lr times --weight_decay must be < 1 (got {self.lr} and {self.weight_decay}): AdamW "
                             "multiplies the weights by 1 - lr · weight_decay at every step")
        if self.num_heads % self.num_kv_heads or self.hidden_size % self.num_heads:
            raise UsageError(f"--num_heads must divide --hidden_size and be a multiple of --num_kv_heads (got "
                             f"{self.num_heads}, {self.hidden_size} and {self.num_kv_heads})")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2:
            raise UsageError(f"--hidden_size {self.hidden_size} over --num_heads {self.num_heads} gives a head "
                             f"dimension of {head_dim}; rotary position embeddings need an even one")
        if self.backend == "nccl" and self.device == "cpu":
            raise UsageError("--backend nccl runs collectives between GPUs only, and --device cpu trains on the CPU; "
                             "use --backend gloo (or auto)")

    def distillation(self) -> Distillation | None:
        return Distillation(self.distill_weight, self.distill_temperature) if self.distill_weight > 0 else None


AUTOCAST = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class Dataset:
    train: torch.Tensor  # (N, seq_len) packed token ids
    heldout: torch.Tensor  # (M, seq_len)
    info: dict  # corpus description for the model card


def data_key(config: TrainConfig, documents: list[tuple[str, str]]) -> dict:
    """What the packed data and the tokenizer are built from; a cache made from anything else is not reused."""
    return {
        "data": list(config.data),
        "content_sha256_16": corpus.content_hash(documents),
        "tokenizer": config.init_from or f"bpe-{config.vocab_size}",
        "seq_len": config.seq_len,
        "heldout_fraction": config.heldout_fraction,
    }


def prepare_data(config: TrainConfig, out: Path, resuming: bool = False) -> tuple[Dataset, object]:
    """Tokenizer and packed splits, cached in the output directory under the key of what they were built from, so
    a resumed run reuses them exactly and a run with other data or settings never does. Resuming from a
    checkpoint whose data has changed since (files edited, packages upgraded) is refused."""
    cached, tokenizer_dir = out / "data.pt", out / "tokenizer"
    files = corpus.expand_sources(config.data, hub_directory=out / "hub_data")
    read = list(corpus.read_documents(files))
    documents = list(corpus.unique_documents(read))
    key = data_key(config, documents)
    cache = read_cache(cached, tokenizer_dir)
    if cache is not None:
        saved, tokenizer = cache
        if saved.get("key") == key:
            return Dataset(saved["train"], saved["heldout"], saved["info"]), tokenizer
        if resuming:
            changed = [k for k in key if saved.get("key", {}).get(k) != key[k]]
            raise UsageError(f"--resume: the training data in {out} was built from other data or settings "
                             f"({', '.join(changed)} changed since); the run cannot continue exactly")
    from self_speculation.analysis import humaneval_problems

    leaking = corpus.leaking_documents(documents, [p["canonical_solution"] for p in humaneval_problems()])
    kept = [(name, text) for name, text in documents if name not in leaking]
    heldout_texts = [text for name, text in kept if corpus.is_held_out(name, config.heldout_fraction)]
    train_texts = [text for name, text in kept if not corpus.is_held_out(name, config.heldout_fraction)]
    if config.init_from:
        tokenizer = AutoTokenizer.from_pretrained(config.init_from)
    else:
        tokenizer = corpus.train_tokenizer(train_texts, config.vocab_size)

    def packed(texts):
        batches = (tokenizer(texts[i : i + 256]).input_ids for i in range(0, len(texts), 256))  # parallel, bounded
        return corpus.pack_tensor((ids for batch in batches for ids in batch), config.seq_len, tokenizer.eos_token_id)

    train, heldout = packed(train_texts), packed(heldout_texts)
    if len(train) < config.batch_size or len(heldout) < 1:
        raise UsageError(f"--data: too little text for --seq_len {config.seq_len} and --batch_size {config.batch_size} "
                         f"({len(train)} training and {len(heldout)} held-out sequences; {config.batch_size} and 1 "
                         "are needed)")
    info = {
        "sources": config.data,
        "files": len(files),
        "documents": len(kept),
        "duplicates_dropped": len(read) - len(documents),
        "humaneval_leaks_dropped": sorted(leaking),
        "heldout_documents": len(heldout_texts),
        "file_list_sha256_16": corpus.file_list_hash(name for name, _ in files),
        "content_sha256_16": key["content_sha256_16"],
        "train_tokens": train.numel(),
        "heldout_tokens": heldout.numel(),
    }
    # the tokenizer first, then data.pt, each whole or absent: a data.pt on disk always has its tokenizer beside it
    with writing(cached):
        cached.unlink(missing_ok=True)
    with writing(tokenizer_dir):
        tokenizer.save_pretrained(tokenizer_dir)
    save({"key": key, "train": train, "heldout": heldout, "info": info}, cached)
    return Dataset(train, heldout, info), tokenizer


def read_cache(cached: Path, tokenizer_dir: Path) -> tuple[dict, object] | None:
    """The cached splits and their tokenizer, or None when either is absent or cannot be read: a cache torn by a
    crash or a full disk is rebuilt, not a reason to fail."""
    if not (cached.is_file() and tokenizer_dir.is_dir()):
        return None
    try:
        return torch.load(cached), AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception:  # whatever a torn file raises (zip, pickle, JSON or tokenizers errors)
        return None


def check_init_from(name: str) -> None:
    """What training from the checkpoint `name` needs, checked before the data is read: a causal language model in
    the Llama layout (its architecture only, built on the meta device: no weights are read) and a tokenizer with
    an eos token, which separates the packed documents."""
    source = model_source(name, "--init_from")
    check_available(source, "--init_from")
    if Path(source).is_dir() and not any((Path(source) / file).exists() for file in TOKENIZER_FILES):
        raise UsageError(f"--init_from {name}: no tokenizer there (expected one of {', '.join(TOKENIZER_FILES)})")
    model_config = AutoConfig.from_pretrained(source)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except ValueError:  # transformers' answer for an architecture without a causal language-model head
        raise UsageError(f"--init_from {name}: a {model_config.model_type} model is not a causal language "
                         "model") from None
    try:
        layers.check_layout(skeleton)
    except UsageError as error:
        raise UsageError(f"--init_from {name}: {error}") from None
    if AutoTokenizer.from_pretrained(source).eos_token_id is None:
        raise UsageError(f"--init_from {name}: its tokenizer has no eos token, which training puts between the packed "
                         "documents; set eos_token in its tokenizer_config.json")


def build_model(config: TrainConfig, tokenizer) -> LlamaForCausalLM:
    if config.init_from:
        model, report = AutoModelForCausalLM.from_pretrained(config.init_from, dtype=torch.float32,
                                                             output_loading_info=True)
        check_weights(model, report, f"--init_from {config.init_from}")  # a layer missing would train from noise
        layers.check_layout(model)
        return model
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=2 * config.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(model_config)


def batch_indices(step: int, micro: int, config: TrainConfig, num_sequences: int) -> torch.Tensor:
    """Which training sequences micro-batch `micro` of `step` uses: a fresh seeded permutation per epoch, a pure
    function of the step, so a resumed run sees exactly the data the uninterrupted run would have."""
    per_step = config.batch_size * config.grad_accum
    start = (step * per_step + micro * config.batch_size)
    epoch, offset = divmod(start, num_sequences)
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(config.seed + epoch))
    indices = order[offset : offset + config.batch_size]
    if len(indices) < config.batch_size:  # the batch runs into the next epoch
        following = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(config.seed + epoch + 1))
        indices = torch.cat([indices, following[: config.batch_size - len(indices)]])
    return indices


@torch.no_grad()
def evaluate(step: "_RecipeStep", heldout: torch.Tensor, config: TrainConfig, device: torch.device, parts: int = 1,
             part: int = 0) -> tuple[list[float], list[float]]:
    """Held-out loss at every layer's exit, and every exit's top-1 agreement with the last layer (no dropout): the
    mean over batches of each batch's mean. A sharded model is run by all `parts` processes, each on its `part` of
    every batch, and the parts are summed by rows: the numbers are one process's."""
    step.eval()
    num_layers = layers.num_layers(step.model)
    count = min(config.eval_batches, math.ceil(len(heldout) / config.batch_size))
    sums = torch.zeros(count, 2, num_layers, dtype=torch.float64)  # per batch: rows × (loss, agreement) per layer
    sizes = torch.zeros(count, 1, 1, dtype=torch.float64)
    for i in range(count):
        batch = heldout[i * config.batch_size : (i + 1) * config.batch_size]
        ids = batch.tensor_split(parts)[part]
        sizes[i] = len(batch)
        # a short last batch may leave a process no rows; it runs one anyway, as every process gathers the weights
        _, losses, agreement = step((ids if len(ids) else batch[:1]).long().to(device), torch.zeros(num_layers),
                                    None, None, None)
        if len(ids):
            sums[i] = len(ids) * torch.stack([losses, agreement]).double().cpu()
    step.train()
    means = (distributed.sum_over_processes(sums) if parts > 1 else sums).div(sizes).mean(0)
    return means[0].tolist(), means[1].tolist()


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, with weight decay on the matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )


class _RecipeStep(torch.nn.Module):
    """recipe_forward as a module, so that DistributedDataParallel runs it and reduces the gradients it leaves, or
    FSDP shards it (the root of the sharded model). `run_layer` runs a decoder layer (None: layers.run_layers)."""

    def __init__(self, model, run_layer: sharding.RunLayer | None = None):
        super().__init__()
        self.model = model
        self.run_layer = run_layer

    def forward(self, ids, rates, weights, kept, distillation, rows=None):
        result = recipe_forward(self.model, ids, rates, weights, None, distillation, kept, rows, self.run_layer)
        return result.loss, result.layer_losses, result.agreement


UNSHARDED_CHECKPOINT = "checkpoint.pt"  # one process's, or DistributedDataParallel's (written by rank 0)
SHARDED_CHECKPOINT = "checkpoint"  # FSDP's: a torch.distributed.checkpoint directory, every process writing its shards

# None changes the training: a run may continue on another device, number of processes or sharding, and from a
# directory moved or copied elsewhere.
NOT_COMPARED_ON_RESUME = ("output_dir", "resume", "device", "recommend", "fsdp", "activation_checkpointing",
                          "backend")


def check_launch(config: TrainConfig, device: torch.device, world: int) -> str:
    """The flags checked against the launch (the processes torchrun started, the device): the process group's
    backend, or a UsageError before any work."""
    local_rank = distributed.local_rank()
    if config.fsdp and world < 2:
        raise UsageError(f"--fsdp True shards the model over the processes torchrun starts, and there is "
                         f"{'1 process' if world == 1 else f'{world} processes'} here: run it as torchrun "
                         "--nproc_per_node N train.py ... with N >= 2, or drop --fsdp")
    if config.batch_size % world:
        raise UsageError(f"--batch_size {config.batch_size} must be a multiple of the {world} processes (each takes "
                         "an equal share of every batch)")
    if world > 1 and device.type == "cuda" and config.device != "auto" and device.index not in (None, local_rank):
        raise UsageError(f"--device {config.device}: under torchrun each process trains on the GPU of its local rank "
                         f"(this is local rank {local_rank}); use --device cuda or auto")
    backend = config.backend if config.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UsageError(f"--backend nccl runs collectives between GPUs only, and training runs on {device.type} "
                         "here; use --backend gloo (or auto)")
    if config.fsdp and device.type not in ("cpu", "cuda"):
        raise UsageError(f"--fsdp True shards over CPUs (gloo) or CUDA GPUs (nccl), not {device.type}")
    if config.fsdp and device.type == "cuda" and backend == "gloo":
        raise UsageError("--fsdp True on GPUs needs --backend nccl (or auto): over gloo every gathered layer would "
                         "go through the host")
    return backend


def train(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    checkpoint_path = find_checkpoint(out)
    if checkpoint_path is not None and not config.resume:
        raise UsageError(f"--output_dir {out} holds a checkpoint; pass --resume to continue it or choose another directory")
    if config.resume and checkpoint_path is None:
        raise UsageError(f"--resume: there is no checkpoint in {out} to continue; run without --resume to start")
    rank, world = distributed.rank(), distributed.world_size()
    device = resolve_device(config.device)
    backend = check_launch(config, device, world)
    ensure_output_dir(config.output_dir)
    if config.init_from:  # checked before the minutes spent reading and tokenizing the data
        check_init_from(config.init_from)
    distributed.join(backend)
    state = load_checkpoint(checkpoint_path, config, device) if config.resume else None  # other flags: refused now
    torch.manual_seed(config.seed)
    # a checkpoint to start from is loaded, and its weights checked, before the minutes spent on the data
    start = build_model(config, None) if config.init_from else None
    if rank == 0:  # the first process builds the data cache; the others read it
        dataset, tokenizer = prepare_data(config, out, resuming=config.resume)
    distributed.barrier()
    if rank != 0:
        dataset, tokenizer = prepare_data(config, out, resuming=config.resume)
    model = start if start is not None else build_model(config, tokenizer)
    step_module = _RecipeStep(model)
    if config.fsdp:
        step_module.run_layer = sharding.shard(model, step_module, device, AUTOCAST[config.dtype],
                                               config.activation_checkpointing)
    else:
        model.to(device)
        if config.activation_checkpointing:
            step_module.run_layer = sharding.checkpointed(sharding.plain_runner(model))
    held = distributed.gather([sharding.local_parameter_bytes(model)])
    if config.fsdp and rank == 0:
        print(f"FSDP over {world} processes: they hold {', '.join(f'{b:,}' for b in held)} bytes of the "
              f"{sum(held):,} bytes of weights")
    num_layers = layers.num_layers(model)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    dropout_random = torch.Generator().manual_seed(config.seed + 1_000_003)
    step, elapsed = 0, 0.0
    # float16: a gradient scaler; with FSDP each process checks its shards' gradients for overflow and the
    # processes agree (DTensor reduces the check), so all of them skip the same steps
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
    if state is not None:
        restore(checkpoint_path, state, model, optimizer, config.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        dropout_random.set_state(state["dropout_random"])
        if state.get("scaler"):  # float16 runs only
            scaler.load_state_dict(state["scaler"])
        step, elapsed = state["step"], state["elapsed"]
    autocast = torch.autocast(device.type, dtype=AUTOCAST[config.dtype], enabled=config.dtype != "float32")
    layer_columns = ["step", "tokens"] + [f"layer_{i + 1}" for i in range(num_layers)]
    if rank == 0:  # only the first process writes
        with writing(out / "train_config.json"):
            (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        curve = CsvLog(out / "training_curve.csv",
                       ["step", "tokens", "lr", "loss", "last_layer_loss", "tokens_per_second", "elapsed"])
        heldout_log = CsvLog(out / "heldout_losses.csv", layer_columns)
        agreement_log = CsvLog(out / "heldout_agreement.csv", layer_columns)
        for log in (curve, heldout_log, agreement_log):
            log.truncate_after(step)  # rows written after the checkpoint are computed again
    distillation = config.distillation()
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    share = config.batch_size // world  # this process's rows of every micro-batch
    rows = slice(rank * share, (rank + 1) * share)
    evaluated_by = (world, rank) if config.fsdp else (1, 0)  # a sharded model is run by every process
    # A layer that no sample of the batch runs leaves its parameters without gradient on every process: DDP is
    # told to expect unused parameters (they stay without gradient, as in one process).
    forward = step_module
    if world > 1 and not config.fsdp:
        forward = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    model.train()
    # closed by the `with` when the run stops too, so that the error begins a line of its own
    with tqdm(total=config.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
              disable=rank != 0) as progress:
        while step < config.max_steps:
            started = time.perf_counter()
            rates = dropout_rates(num_layers, config.p_max, ramp_scale(config.dropout_ramp, step, config.max_steps))
            enabled = early_exit_layers(config.curriculum, num_layers, step, config.max_steps, config.rotation)
            weights = early_exit_weights(enabled, config.e_scale, config.exit_weighting)
            loss_sum, last_sum = 0.0, 0.0
            for micro in range(config.grad_accum):
                # every process draws the whole micro-batch's indices and layer dropout, and takes its rows: the
                # batches and the dropout are those of one process, whatever the number of processes, and every
                # process runs the layers that some sample of the batch runs
                ids = dataset.train[batch_indices(step, micro, config, len(dataset.train))[rows]].long().to(device)
                kept = draw_kept(rates, config.batch_size, dropout_random)
                with autocast:
                    loss, layer_losses, _ = forward(ids, rates, weights, kept, distillation, rows)
                scaler.scale(loss / config.grad_accum).backward()
                loss_sum += loss.item() / config.grad_accum
                last_sum += layer_losses[-1].item() / config.grad_accum
            # averaged before the update, so that every process sees the same loss and all stop together
            loss_sum, last_sum = distributed.mean(loss_sum), distributed.mean(last_sum)
            if not math.isfinite(loss_sum):
                raise RunStopped(f"step {step + 1}: the training loss is {loss_sum}; the run stopped before that "
                                 f"step's update, saving nothing from it, and {kept_checkpoint(out)}; a lower --lr "
                                 "or a --grad_clip may help")
            scaler.unscale_(optimizer)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - started
            elapsed += seconds
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum:.3f}", last=f"{last_sum:.3f}",
                                 tok_s=f"{tokens_per_step / seconds:.0f}")
            saving = step % config.save_every == 0 or step == config.max_steps
            if saving:  # in every process: they hold the same weights, or the shards of one model, and stop together
                check_finite_weights(model, step, out)
            if rank == 0:
                curve.write([step, step * tokens_per_step, scheduler.get_last_lr()[0], loss_sum, last_sum,
                             tokens_per_step / seconds, elapsed])
            if (step % config.eval_every == 0 or step == config.max_steps) and (config.fsdp or rank == 0):
                losses, agreement = evaluate(step_module, dataset.heldout, config, device, *evaluated_by)
                if config.fsdp:
                    step_module.reshard()  # the root's weights, left gathered by a forward without backward
                if rank == 0:
                    heldout_log.write([step, step * tokens_per_step] + losses)
                    agreement_log.write([step, step * tokens_per_step] + agreement)
            if saving and config.fsdp:  # every process writes its shards
                save_sharded_checkpoint(out, model, optimizer, scheduler, dropout_random, step, elapsed, config,
                                        scaler)
            elif saving and rank == 0:
                save_checkpoint(out / UNSHARDED_CHECKPOINT, model, optimizer, scheduler, dropout_random, step, elapsed,
                                config, scaler)
                drop_checkpoint(sharding.existing(out / SHARDED_CHECKPOINT))  # one left by an earlier sharded run
    del forward  # DDP's reducer holds the process group: released here, while the group is alive, not after
    final = out / "model"
    layout = {"processes": world, "fsdp": config.fsdp, "parameter_bytes_per_process": held,
              "optimizer_state_bytes_per_process": distributed.gather([sharding.local_state_bytes(optimizer)])}
    whole = sharding.full_state_dict(model) if config.fsdp else None  # gathered by every process, onto the first
    optimizer.state.clear()  # not needed any more: room for the model the recommendation loads
    if rank == 0:
        saved = model if whole is None else sharding.unsharded(model, whole)
        save_model(saved, tokenizer, final, dataset.info, config, step, elapsed, layout)
        with writing(out / "training_curve.png"):
            plot(out)
        if config.recommend:
            with writing(final):
                print(recommend_settings(final, device))
    distributed.teardown()
    return final


def find_checkpoint(out: Path) -> Path | None:
    """The checkpoint to continue in `out`: checkpoint.pt, a sharded checkpoint directory, or the later of the two
    (a run that changed between sharded and unsharded and stopped before it removed the other)."""
    found = [path for path in (out / UNSHARDED_CHECKPOINT, sharding.existing(out / SHARDED_CHECKPOINT))
             if path is not None and path.exists()]
    return max(found, key=checkpoint_step) if found else None


def checkpoint_step(path: Path) -> int:
    if path.is_dir():
        return torch.load(path / sharding.TRAINER_STATE, weights_only=False)["step"]
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["step"]  # the tensors stay on disk


def drop_checkpoint(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def load_checkpoint(path: Path, config: TrainConfig, device: torch.device) -> dict:
    """The state to resume from (for a sharded checkpoint, all but the model and optimizer state, which `restore`
    reads once they are built), refused unless it was trained with the same flags."""
    if path.is_dir():
        state = torch.load(path / sharding.TRAINER_STATE, weights_only=False, map_location="cpu")
    else:
        state = torch.load(path, weights_only=False, map_location=device)
    compared = {k: v for k, v in state["config"].items() if k not in NOT_COMPARED_ON_RESUME}
    if compared != {k: v for k, v in asdict(config).items() if k not in NOT_COMPARED_ON_RESUME}:
        raise UsageError(f"--resume: the flags differ from those the checkpoint in {path.parent} was trained with")
    return state


def restore(path: Path, state: dict, model, optimizer, sharded: bool) -> None:
    """The model and optimizer state of the checkpoint at `path` into `model` and `optimizer`, sharded or not, from
    a checkpoint written by any number of processes, sharded or not."""
    if path.is_dir():
        sharding.load_checkpoint(path, model, optimizer)
    elif sharded:
        sharding.load_whole(model, optimizer, state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


class RunStopped(UsageError):
    """A run that cannot go on (a non-finite loss, a failed write): one line saying what stopped it and what was
    kept, as for bad input."""


def kept_checkpoint(out: Path) -> str:
    """What a stopped run leaves to continue from, for its message."""
    path = find_checkpoint(out)
    if path is None:
        return "no checkpoint had been saved"
    return f"the checkpoint of step {checkpoint_step(path)} is kept in {path} (--resume continues it)"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A write that fails (a full disk, a quota, a lost mount) ends the run in one line naming the file and what was
    kept. Every output lies in the output directory, beside the checkpoint."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or error
        raise RunStopped(f"could not write {path} ({reason}); {kept_checkpoint(path.parent)}") from None


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary file to write in place of `path`, renamed over it once written: a crash or a full disk leaves the
    old file or none, never a torn one, and no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save(obj, path: Path) -> None:
    """torch.save, atomically. Through a Python file, so that a failed write is an OSError: torch's own writer turns
    it into a RuntimeError that names neither the file nor the cause."""
    with writing(path), atomic(path) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def check_finite_weights(model, step: int, out: Path) -> None:
    """Refuse to save weights that an update made nan or inf (a finite loss can still have an overflowing gradient).
    Every process checks its weights (its shards, for a sharded model), and all get the same answer."""
    if not sharding.all_finite(model):
        raise RunStopped(f"step {step}: its update left weights that are not finite (nan or inf); the run stopped "
                         f"without saving them, and {kept_checkpoint(out)}; a lower --lr or a --grad_clip may help")


def recommend_settings(directory: Path, device: torch.device) -> str:
    """exits.py's prediction for the saved model, written into its config.json."""
    from self_speculation.analysis import exit_report, humaneval_problems, recommend
    from self_speculation.loading import load

    model, tokenizer = load(str(directory), dtype="float32", device=str(device))
    count, steps = layers.num_layers(model), 64
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    problems = [p for p in humaneval_problems() if len(tokenizer(p["prompt"]).input_ids) + steps < context][:10]
    if not problems:
        return f"no recommendation written: no HumanEval prompt fits the model's context of {context} tokens"
    report = exit_report("model", model, tokenizer, problems, steps, list(range(1, count)), list(range(1, 9)), 8)
    return recommend(directory, report.best)


class CsvLog:
    """Rows appended as they come; on resume, rows past the checkpoint are dropped first (no duplicates)."""

    def __init__(self, path: Path, header: list[str]):
        self.path = path
        if self.rows()[:1] != [header]:  # new, or left by a run of another shape, or torn
            self.rewrite([header])

    def rows(self) -> list[list[str]]:
        return list(csv.reader(self.path.read_text().splitlines())) if self.path.exists() else []

    def rewrite(self, rows: list[list[str]]) -> None:
        with writing(self.path), atomic(self.path) as tmp, tmp.open("w", newline="") as f:
            csv.writer(f).writerows(rows)

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to `step`, and drop a row cut short by a crash or a full disk."""
        header, *rows = self.rows()
        self.rewrite([header] + [r for r in rows if len(r) == len(header) and int(r[0]) <= step])

    def write(self, row: list) -> None:
        with writing(self.path), self.path.open("a", newline="") as f:
            csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def save_checkpoint(path: Path, model, optimizer, scheduler, dropout_random, step, elapsed, config,
                    scaler=None) -> None:
    save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "dropout_random": dropout_random.get_state(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step,
            "elapsed": elapsed,
            "config": asdict(config),
        },
        path,
    )


def save_sharded_checkpoint(out: Path, model, optimizer, scheduler, dropout_random, step, elapsed, config,
                            scaler) -> None:
    """A sharded checkpoint (every process writes its shards), then no checkpoint.pt left by an earlier unsharded
    run to be taken for a later one."""
    directory = out / SHARDED_CHECKPOINT
    trainer_state = {"scheduler": scheduler.state_dict(), "dropout_random": dropout_random.get_state(),
                     "scaler": scaler.state_dict(), "step": step, "elapsed": elapsed, "config": asdict(config)}
    with writing(directory):
        sharding.save_checkpoint(directory, model, optimizer, trainer_state, save)
    if distributed.rank() == 0:
        drop_checkpoint(out / UNSHARDED_CHECKPOINT)


def model_shape(model_config) -> dict:
    """The shape actually trained (the shape flags only apply from scratch; --init_from keeps the checkpoint's)."""
    names = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size")
    return {name: getattr(model_config, name) for name in names}


def save_model(model, tokenizer, directory: Path, corpus_info: dict, config: TrainConfig, step: int, elapsed: float,
               layout: dict | None = None):
    """Hugging Face format in bfloat16, with the tokenizer, a generation config and the training facts (with
    `layout`: how the processes held the model)."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    facts = {"corpus": corpus_info, "recipe": asdict(config), "model_shape": model_shape(model.config), "steps": step,
             "tokens": step * config.batch_size * config.grad_accum * config.seq_len, "wall_time_seconds": elapsed}
    if layout is not None:
        facts["processes"] = layout
    try:
        with writing(directory):
            model.to(torch.bfloat16).save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            (directory / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    finally:
        model.to(torch.float32)


def plot(out: Path) -> None:
    """training_curve.png: training loss, and held-out loss and agreement with the last layer per exit layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    curve = pd.read_csv(out / "training_curve.csv")
    heldout = pd.read_csv(out / "heldout_losses.csv").iloc[-1]
    agreement = pd.read_csv(out / "heldout_agreement.csv").iloc[-1]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    left.plot(curve["tokens"], curve["last_layer_loss"], label="last layer (train)", alpha=0.7)
    left.plot(curve["tokens"], curve["loss"], label="weighted early-exit loss (train)", alpha=0.7)
    left.set(xlabel="tokens", ylabel="loss", title="training", yscale="log")
    left.legend()
    layer_columns = [c for c in heldout.index if c.startswith("layer_")]
    exits = range(1, len(layer_columns) + 1)
    middle.plot(exits, [heldout[c] for c in layer_columns], marker="o")
    middle.set(xlabel="exit layer", ylabel="held-out cross-entropy", title=f"held-out loss per exit (step {int(heldout['step'])})")
    right.plot(exits, [100 * agreement[c] for c in layer_columns], marker="o")
    right.set(xlabel="exit layer", ylabel="% of positions", title="held-out top-1 agreement with the last layer")
    figure.tight_layout()
    figure.savefig(out / "training_curve.png", dpi=120)
    plt.close(figure)
