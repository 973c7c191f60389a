"""A decoding step reads the device once: the accepted tokens of every row. On a GPU anything else that makes
the host wait for the device stalls the pipeline, so drafting, verification and acceptance stay on the device.
Two counts, over whole generations: every Python-level read (`item`, `tolist`, `int(...)`, `.cpu()`, ...), which
must be one per step; and, at the aten level where the CPU shows what a GPU would do, every operation that blocks
the host on CUDA, which must be none: `.item()` and its kin, `nonzero` and boolean-mask indexing (their output size
is data), `multinomial` (it checks its input with two reads), and tensors made from host data, which are blocking
copies unless they go through `layers.upload` (pinned, asynchronous)."""

import dis
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from models import tiny_llama
from self_speculation import GenerationConfig, Generator, layers

READS = {"item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy"}
BLOCKING = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select", "unique",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "multinomial", "repeat_interleave",
            "_assert_async"}
PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 4], [0] + list(range(40, 60)), [0, 3]]
SETTINGS = {
    "autoregressive": {},
    "self_speculative": {"exit_layer": 2, "num_speculations": 3},
    "self_speculative+adaptive": {"exit_layer": 2, "num_speculations": 3, "draft_policy": "adaptive"},
}
CHOICE = {
    "greedy": {"sample": False},
    "sampling": {"sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
}


class DeviceReads(TorchFunctionMode):
    """Counts the tensor operations that copy a value back to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _caller():
    """The innermost Python frame outside torch and this module: the code that asked for the operation."""
    frame = sys._getframe(2)
    while frame.f_code.co_filename.startswith((torch.__path__[0], __file__)):
        frame = frame.f_back
    return frame


def _uploading() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not layers.upload.__code__:
        frame = frame.f_back
    return frame is not None


class HostWaits(TorchDispatchMode):
    """Counts, by name, the aten operations that would block the host on a CUDA device. A tensor made from host
    data (`lift_fresh`) counts unless `layers.upload` made it, or it is a Python number assigned into a tensor
    (`x[i] = 0`, as transformers' top-p warper does), which CUDA fills in on the device and only the CPU lifts."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.uploads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in BLOCKING:
            self.counts[name] = self.counts.get(name, 0) + 1
        elif name in ("index", "index_put", "index_put_") and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.counts["boolean mask index"] = self.counts.get("boolean mask index", 0) + 1
        elif name == "lift_fresh":
            if _uploading():
                self.uploads += 1
            elif not (args[0].dim() == 0 and
                      (frame := _caller()).f_code.co_code[frame.f_lasti] == dis.opmap["STORE_SUBSCR"]):
                self.counts["tensor from host data"] = self.counts.get("tensor from host data", 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    """A context of 48 positions: the 21-token prompt's row stops early and leaves the batch."""
    return tiny_llama(num_layers=4, seed=3, eos_token_id=None, max_position_embeddings=48)


CASES = [(strategy, choice, batch, False) for strategy in SETTINGS for choice in CHOICE
         for batch in ("one prompt", "ragged batch")]
CASES += [("autoregressive", "sampling", "ragged batch", True), ("self_speculative", "sampling", "ragged batch", True),
          ("self_speculative", "greedy", "one prompt", True)]


@pytest.mark.parametrize("strategy, choice, batch, compiled", CASES,
                         ids=["-".join(map(str, case)).replace(" ", "_") for case in CASES])
def test_one_device_read_per_step_and_nothing_else_waits(model, strategy, choice, batch, compiled, monkeypatch):
    """Compiled passes run outside both counts (dynamo would trace the counters); they cannot wait by
    construction: compiled with fullgraph=True, any read in them would be a graph break, which is an error."""
    real_pass, compiled_runs = layers.compiled._CompiledPass.__call__, []

    def uncounted(*args):
        compiled_runs.append(1)
        modes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
        try:
            with _disable_current_modes():
                return real_pass(*args)
        finally:
            for mode in reversed(modes):
                torch._C._push_on_torch_function_stack(mode)

    monkeypatch.setattr(layers.compiled._CompiledPass, "__call__", uncounted)
    config = GenerationConfig(generation_strategy=strategy.split("+")[0], max_steps=40, compile=compiled,
                              **SETTINGS[strategy],
                              **CHOICE[choice])
    prompts = PROMPTS[:1] if batch == "one prompt" else PROMPTS
    generator = Generator(model, None, config, seed=0)
    generator.generate_batch(prompts)  # with --compile: compiles, outside the count
    with DeviceReads() as reads, HostWaits() as waits:
        results = generator.generate_batch(prompts)
    steps = 1 + max(r.steps for r in results)
    assert steps > 10 and (batch == "one prompt" or results[2].stop_reason == "context_length")  # a row left early
    assert reads.count == steps
    assert waits.counts == {}
    # the prompts, their lengths and how they differ; the rows kept, each time some leave; a batch's rows in the
    # pass timer that chooses its draft length: per generation, never per step
    assert waits.uploads <= 3 + (len(prompts) - 1) + (len(prompts) > 1) + (choice == "sampling")  # its streams
    assert bool(compiled_runs) == compiled


def test_the_counts_see_what_they_are_named_for(model):
    """Not blind: torch.multinomial, a boolean mask and a list made a tensor inside a generation are each counted
    at the aten level, `.item()` at the Python level (in inference mode the CPU reads a scalar without an aten
    call), while the same list through `layers.upload` is not counted."""
    def step(d, budgets):
        torch.multinomial(torch.ones(1, 4), 1)
        torch.zeros(3)[torch.tensor([True, False, True])].sum().item()
        layers.upload([1, 2], d.decoder.device)
        return real(d, budgets)

    generator = Generator(model, None, GenerationConfig(max_steps=5, sample=False))
    real, generator.strategy.step = generator.strategy.step, step
    with DeviceReads() as reads, HostWaits() as waits:
        [result] = generator.generate_batch(PROMPTS[:1])
    assert waits.counts == {"multinomial": 4, "tensor from host data": 4, "boolean mask index": 4}
    assert reads.count == 1 + result.steps + 4 and waits.uploads == 2 + 4  # the prompt and its length, then 4


class DraftsShown:
    """A streamer's interface, keeping the drafts it is shown."""

    def __init__(self):
        self.drafts = []

    def put(self, tokens):
        pass

    def end(self):
        pass

    def put_draft(self, token: int):
        self.drafts.append(token)


def test_the_count_sees_a_read_per_draft(model):
    """The count is not blind: showing drafts as they come, as the interactive streamer does, reads each one."""
    config = GenerationConfig(generation_strategy="self_speculative", max_steps=20, sample=False,
                              **SETTINGS["self_speculative"])
    shown = DraftsShown()
    with DeviceReads() as reads:
        [result] = Generator(model, None, config).generate_batch(PROMPTS[:1], streamer=shown)
    assert shown.drafts and reads.count == 1 + result.steps + len(shown.drafts)
