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
