"""A sweep directory: the flags it was started with, sweep.csv with a row per finished point (exit layer, draft
length, draft policy), the baseline measured once, and the summary and plots at the end. Running the same sweep
again resumes it."""

import csv
import fcntl
import io
import json
import math
from pathlib import Path
from typing import NamedTuple

from . import distributed
from .benchmarking import RUNNERS, Batch
from .reporting import summarize
from .equivalence import tally
from .errors import UsageError
from .results import append_line, read_json_object, write_json

# tokens_per_second is the benchmark's headline (`reporting.summarize`): in batches, all tokens over all the time
COLUMNS = ["exit_layer", "num_speculations", "draft_policy", "tokens_per_second", "speedup_vs_baseline",
           "autoregressive_tokens_per_second", "speedup_vs_autoregressive", "acceptance_rate",
           "tokens_per_full_model_pass", "tokens_per_second_median", "time_per_token_median", "total_time",
           "outputs_differing_from_baseline", "near_ties", "divergences"]


class Point(NamedTuple):
    """One setting a sweep measures. Under the static policy every step drafts `num_speculations`; under the
    adaptive one it is the first step's length, and the policy sets the others."""

    exit_layer: int
    num_speculations: int
    draft_policy: str = "static"


def run_shared(runner, batches: list[Batch]):
    """Every batch of prompts through the runner, the batches split over the processes; the samples in prompt
    order on rank 0, None on the others."""
    return run_in_turn([runner], batches)[0]


def run_in_turn(runners: list, batches: list[Batch]) -> list:
    """Every batch through every runner in turn, the order alternating from batch to batch (so that the runners
    share the machine's moments, its drift cancelling in their ratio), the batches split over the processes; per
    runner its samples in prompt order on rank 0, None on the others."""
    def in_turn(index, batch):
        order = range(len(runners)) if index % 2 == 0 else reversed(range(len(runners)))
        return {i: runners[i].run_batch(batch, index) for i in order}

    per_batch = distributed.map_shards(batches, in_turn)
    if per_batch is None:
        return [None] * len(runners)
    return [sorted((s for samples in per_batch for s in samples[i]), key=lambda s: s.prompt_id)
            for i in range(len(runners))]


class SweepDirectory:
    def __init__(self, path: Path, settings: dict):
        """`settings`: the sweep's flags. A directory holding a sweep with other flags is refused; its own name is
        not a setting, so a sweep moved elsewhere resumes there."""
        self.path, self.settings = path, json.loads(json.dumps(settings, default=str))
        self.settings_path, self.csv_path = path / "sweep_config.json", path / "sweep.csv"
        saved = read_json_object(self.settings_path, "use another --output_dir") if self.settings_path.exists() else None
        if saved is not None and (differing := self.differing_flags(saved)):
            raise UsageError(f"--output_dir {path} holds a sweep with other flags ({'; '.join(differing)}); resume "
                             "with its flags, or use another directory to start anew")

    def differing_flags(self, saved: dict) -> list[str]:
        """The flags whose saved values are not these, as "--flag X, here Y": the directory's own name aside, and a
        local path the same however it is written (relative or absolute)."""
        def flags(settings: dict) -> dict:
            found = {}
            for section in settings.values() if isinstance(settings, dict) else ():
                for key, value in section.items() if isinstance(section, dict) else ():
                    if isinstance(value, str) and value and Path(value).exists():
                        value = str(Path(value).resolve())
                    found[key] = value
            found.pop("output_dir", None)
            return found

        theirs, ours = flags(saved), flags(self.settings)
        return [f"--{key} {json.dumps(theirs.get(key))}, here {json.dumps(ours.get(key))}"
                for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]

    def start(self) -> set[Point]:
        """Claim the directory for this sweep (call once every flag is checked) and return the finished points.
        A lock held until the process ends keeps a second sweep out of the directory: two would measure every
        point twice, each beside the other."""
        if distributed.rank() == 0:
            self.lock = (self.path / "sweep.lock").open("w")
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--output_dir {self.path}: another sweep is running there; wait for it to end or "
                                 "use another directory") from None
        done = self.finished_points(repair=distributed.rank() == 0) if self.csv_path.exists() else set()
        if distributed.rank() == 0 and not self.settings_path.exists():  # else it holds these flags already
            write_json(self.settings_path, self.settings)
            if not self.csv_path.exists():
                with self.csv_path.open("w", newline="") as f:
                    csv.writer(f).writerow(COLUMNS)
        return done

    def finished_points(self, repair: bool) -> set[Point]:
        """The points of sweep.csv's complete rows. A torn last row (the process killed while writing it) is not
        one; with `repair` it is cut off the file, so the next row starts on a line of its own."""
        text = self.csv_path.read_text()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1] or ",".join(COLUMNS) + "\n"
            if repair:
                self.csv_path.write_text(text)
        if text.split("\n", 1)[0] != ",".join(COLUMNS):
            raise UsageError(f"{self.csv_path} has other columns (an older version's sweep); use another --output_dir")
        rows = csv.DictReader(io.StringIO(text))
        return {_point(r) for r in rows if None not in r and None not in r.values()}

    def baseline(self, model, tokenizer, config, seed: int, batches: list[Batch], warmup: int) -> dict | None:
        """hf_generate on every batch of prompts, measured once per directory (reused when the sweep resumes);
        None off rank 0."""
        path = self.path / "sweep_baseline.json"
        if path.exists():
            saved = read_json_object(path, "delete it to measure the baseline again")
            outputs, prompts = saved.get("outputs"), sum(len(b.prompts) for b in batches)
            if (type(saved.get("tokens_per_second")) not in (int, float) or not isinstance(outputs, list)
                    or len(outputs) != prompts
                    or not all(isinstance(o, list) and all(type(t) is int for t in o) for o in outputs)):
                raise UsageError(f"{path}: expected tokens_per_second and the outputs of the {prompts} prompts; "
                                 "delete it to measure the baseline again")
            return saved
        runner = RUNNERS["hf_generate"](model, tokenizer, config, seed)
        runner.warm_up(batches, warmup)
        samples = run_shared(runner, batches)
        if samples is None:
            return None
        baseline = summarize(samples) | {"outputs": [s.tokens for s in samples], "settings": runner.settings}
        write_json(path, baseline)
        return baseline

    def write_point(self, model, point, samples, prompts: list[list[int]], baseline: dict,
                    autoregressive: list | None = None) -> None:
        """sweep.csv's row for one point, with `autoregressive`, our autoregressive decoding's
        samples timed in turn with the point's, its speedup over it; greedy outputs differing from the baseline's
        are split into rounding near ties and divergences."""
        m = summarize(samples)
        plain = summarize(autoregressive)["tokens_per_second"] if autoregressive else None
        counts = {} if point.sample else tally(model, prompts, baseline["outputs"], [s.tokens for s in samples])
        row = [point.exit_layer, point.num_speculations, point.draft_policy, m["tokens_per_second"],
               m["tokens_per_second"] / baseline["tokens_per_second"], plain,
               m["tokens_per_second"] / plain if plain else None, m["acceptance_rate"],
               m["tokens_per_full_model_pass"], m["tokens_per_second_median"], m["time_per_token_median"],
               m["total_time"], counts.get("differing"), counts.get("near_ties"), counts.get("divergences")]
        line = io.StringIO()
        csv.writer(line).writerow(row)
        append_line(self.csv_path, line.getvalue(), kept="the finished points are kept; the same command resumes")

    def frame(self, points: list[Point]):
        """sweep.csv's rows for these points (a directory may hold more, from a wider sweep resumed narrower)."""
        import pandas as pd

        frame = pd.read_csv(self.csv_path)
        return frame[frame.apply(lambda r: _point(r) in set(points), axis=1)]

    def report(self, points: list[Point], baseline: dict, greedy: bool) -> str:
        """The table of this sweep's points, the best one (and with several draft policies, each policy's best),
        a word on differing outputs."""
        frame = self.frame(points)
        # best by the speedup timed in turn with autoregressive decoding where every point has one: tokens/s of
        # points measured minutes apart follow the machine's drift as much as the setting
        within = frame["speedup_vs_autoregressive"].notna().all()
        column = "speedup_vs_autoregressive" if within else "tokens_per_second"
        policies = list(dict.fromkeys(frame["draft_policy"]))
        lines = [frame.sort_values(["draft_policy", "exit_layer", "num_speculations"]).to_string(
                     index=False, float_format=lambda v: f"{v:.3f}"),
                 f"baseline hf_generate: {baseline['tokens_per_second']:.1f} tokens/s"]
        if len(policies) > 1:
            lines += [_best_line(f"best {policy}", frame[frame["draft_policy"] == policy], column, within)
                      for policy in policies]
        lines.append(_best_line("best", frame, column, within, with_policy=len(policies) > 1))
        if greedy and frame["divergences"].sum() > 0:
            lines.append("warning: some greedy outputs diverge from the baseline's (more than a rounding tie); "
                         "see divergences")
        elif greedy and frame["near_ties"].sum() > 0:
            lines.append(f"{int(frame['near_ties'].sum())} greedy outputs differ from the baseline's by rounding near "
                         "ties (half precision; see docs/correctness.md)")
        return "\n".join(lines)

    def plot(self, points: list[Point]) -> str:
        """Contour plots of the static points' tokens/s, acceptance and speedup, and with other policies a plot
        of each policy's best by exit layer, beside sweep.csv; a plot that cannot be written (a full disk) raises
        UsageError after the table was printed, saying that the table and the CSV are complete."""
        from .plotting import policy_plot, sweep_plot

        frame = self.frame(points)
        static = frame[frame["draft_policy"] == "static"]
        within = frame["speedup_vs_autoregressive"].notna().all()
        try:
            if len(static):
                sweep_plot(static, "tokens_per_second", "self-speculative tokens/s",
                           self.path / "sweep_tokens_per_second")
                sweep_plot(static, "acceptance_rate", "acceptance rate", self.path / "sweep_acceptance")
                if within:
                    sweep_plot(static, "speedup_vs_autoregressive",
                               "speedup over autoregressive decoding (timed in turn)", self.path / "sweep_speedup")
            if len(set(frame["draft_policy"])) > 1 or not len(static):
                column = "speedup_vs_autoregressive" if within else "tokens_per_second"
                policy_plot(frame, column, self.path / "sweep_policies")
        except OSError as error:
            raise UsageError(f"cannot write the plots in {self.path} ({error.strerror or error}); the table above "
                             f"and {self.csv_path} are complete") from None
        return f"results in {self.csv_path} and sweep_*.png/pdf"


def _point(row) -> Point:
    """The point of a sweep.csv row (a dict or a pandas row)."""
    return Point(int(row["exit_layer"]), int(row["num_speculations"]), str(row["draft_policy"]))


def _best_line(label: str, frame, column: str, within: bool, with_policy: bool = False) -> str:
    """The fastest point of `frame` by `column`, its speed against the baseline (and autoregressive decoding timed
    beside it, `within`) and its acceptance."""
    best = frame.loc[frame[column].idxmax()]
    speedups = f"{best['speedup_vs_baseline']:.2f}x hf_generate"
    if within:
        speedups += f", {best['speedup_vs_autoregressive']:.2f}x our autoregressive decoding timed in turn"
    policy = f" ({best['draft_policy']})" if with_policy else ""
    return (f"{label}: exit_layer {int(best['exit_layer'])}, num_speculations {int(best['num_speculations'])}{policy}: "
            f"{best['tokens_per_second']:.1f} tokens/s ({speedups}), "
            + ("no drafts" if math.isnan(best["acceptance_rate"]) else  # none: every output ended before a draft
               f"acceptance {100 * best['acceptance_rate']:.1f}%"))
