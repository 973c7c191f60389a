"""Compilation you can count: each compiled pass compiles once per shape of its inputs, whatever other passes and
generators compile in the same process."""

import torch
from torch._dynamo.utils import counters

from models import tiny_llama
from self_speculation import GenerationConfig, Generator


def test_each_pass_compiles_once_per_shape_in_cuda_graph_buckets():
    """The CUDA-graph configuration (static buffers, capacities in buckets of 256, 512, ...) forced on the CPU: two
    generators' generations in two buckets, then the first again, compile each of their passes once per bucket and
    never again, under a recompile limit of 2. Each pass has its own compiled code and its own limit (passes
    sharing one code object shared one limit, and with fullgraph=True reaching it was an error)."""
    model = tiny_llama(num_layers=3, seed=4, eos_token_id=None, max_position_embeddings=600)
    generators = [Generator(model, None, GenerationConfig(sample=False, compile=True, **settings))
                  for settings in ({}, {"generation_strategy": "early_exit", "exit_layer": 2})]
    compiles = []
    with torch._dynamo.config.patch(recompile_limit=2):
        for steps in (40, 300, 40):  # buckets 256, 512, 256
            for generator in generators:
                generator.compiled.graphs = generator.graphs = True
                generator.config.max_steps = steps
                before = counters["stats"]["unique_graphs"]
                assert len(generator.generate_ids([0, 5, 17]).tokens) == steps
                compiles.append(counters["stats"]["unique_graphs"] - before)
    assert compiles == [1, 1, 1, 1, 0, 0]
    assert sorted(key for key in generators[0].caches) == [(1, 256), (1, 512)]


def test_a_warm_up_compiles_what_every_timed_batch_needs():
    """A dataset's batches may need code its first batch did not compile: a last batch of one prompt (a batch's
    passes serve every batch size from 2, a lone prompt's are its own), and with CUDA graphs (forced here) each
    batch size and cache bucket. After `Runner.warm_up`, no timed batch compiles."""
    from self_speculation.benchmarking import RUNNERS, batches

    model = tiny_llama(num_layers=3, seed=4, eos_token_id=None, max_position_embeddings=600)
    config = GenerationConfig(sample=False, compile=True, max_steps=60, generation_strategy="self_speculative",
                              exit_layer=1, num_speculations=2, batch_drafts=False)
    short, long = [0, 5, 17], [0] + [i % 90 + 1 for i in range(249)]  # caches of buckets 256 and 512
    for graphs, prompts in ((False, [short, short, short]), (True, [short, short, long, long, long])):
        runner = RUNNERS["self_speculative"](model, None, config, 0)
        runner.generator.compiled.graphs = runner.generator.graphs = graphs
        grouped = batches(prompts, 2)
        runner.warm_up(grouped, 1)
        compiles = []
        for batch in grouped:
            before = counters["stats"]["unique_graphs"]
            runner.run_batch(batch)
            compiles.append(counters["stats"]["unique_graphs"] - before)
        assert compiles == [0] * len(grouped), graphs
