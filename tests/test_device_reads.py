"""A decoding step reads the device once: the accepted tokens of every row. On a GPU each read is a sync that
stalls the pipeline, so drafting, verification and acceptance must stay on the device; here every read a
generation makes (`item`, `tolist`, `int(...)`, `bool(...)`, `.cpu()`, ...) is counted."""

import pytest
from torch.overrides import TorchFunctionMode

from models import tiny_llama
from self_speculation import GenerationConfig, Generator

READS = {"item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy"}
PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 4], [0] + list(range(40, 60)), [0, 3]]
SETTINGS = {
    "autoregressive": {},
    "self_speculative": {"exit_layer": 2, "num_speculations": 3},
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


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=4, seed=3, eos_token_id=None)


def reads_and_steps(generator: Generator, prompts: list[list[int]]) -> tuple[int, int]:
    """(reads, steps) of one generation: steps are the decoding loop's iterations, the prompt's pass included."""
    with DeviceReads() as reads:
        results = generator.generate_batch(prompts)
    return reads.count, 1 + max(r.steps for r in results)


@pytest.mark.parametrize("choice", CHOICE)
@pytest.mark.parametrize("strategy", SETTINGS)
@pytest.mark.parametrize("batch", ["one prompt", "ragged batch"])
def test_one_device_read_per_step(model, strategy, choice, batch):
    config = GenerationConfig(generation_strategy=strategy, max_steps=20, **SETTINGS[strategy], **CHOICE[choice])
    prompts = PROMPTS[:1] if batch == "one prompt" else PROMPTS
    reads, steps = reads_and_steps(Generator(model, None, config, seed=0), prompts)
    assert steps > 3 and reads == steps


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
