"""
Helpers shared by the benchmark scripts: offline setup, the machine's description,
medians, Markdown tables written beside a JSON copy of the same numbers, and
StageClock, the sub-timers inside a training step.

Importing this module sets the offline switches before transformers is imported,
and puts the repository root on sys.path so the scripts can import train.py,
rollout.py and models.py.

StageClock wraps what a training step calls, without changing train.py, and adds
the seconds of each call to the current step's record:
  generate     transformers' GenerationMixin.generate (the model's own sampling)
  score        rollout.completion_logprobs without grad: stored old or reference
               log-probs, which train.py skips when mu = 1 and beta = 0
  logprobs_grad  rollout.completion_logprobs with grad, of which
  fwd_model    is the policy's own forward. The rest is log-softmax, gather and
               token entropy over the vocabulary
  backward     torch.Tensor.backward
  optimizer_step  optimizer.step, through torch's global optimizer step hooks
  semantic     tasks.cluster_by_answer, which GCPO runs only to log semantic entropy
"""
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

# Read by transformers and datasets at import time, so they are set before any import of them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUB_TIMERS = ("generate", "score", "logprobs_grad", "fwd_model", "backward", "optimizer_step", "semantic")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))


def machine() -> dict:
    """Describe the host: CPU count, load average at call time, Python, torch and transformers versions."""
    import transformers

    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def median(values):
    """Median of a list, or None for an empty list."""
    return statistics.median(values) if values else None


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads. 0 keeps torch's default (one per core)."""
    if threads:
        torch.set_num_threads(threads)


def peak_rss_gb() -> float:
    """
    Peak resident memory of this process in GiB: VmHWM from /proc/self/status on Linux.

    ru_maxrss is the fallback only, because Linux carries it across exec, so a
    subprocess would start with its parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB to GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def markdown_table(rows: list[dict], columns: list[str], digits: int = 3) -> str:
    """Format rows as a Markdown table with the given columns, floats rounded to `digits` decimals."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, markdown: str, data: dict) -> None:
    """Print the Markdown report and write it to bench/results/NAME.md, with the numbers in NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(markdown)
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {RESULTS / name}.md and .json")


class StageClock:
    """Seconds spent in the calls listed in the module docstring, one dict per training step in `steps`."""

    def __init__(self):
        self.steps = []
        self.optimizer = None  # class and fused/foreach options of the last optimizer that stepped
        self.peak_rss_gb = None  # peak resident memory at the end of the last optimizer step
        self._in_logprobs = False
        self._hooked_models = set()

    def _add(self, name, seconds):
        if self.steps:
            self.steps[-1][name] = self.steps[-1].get(name, 0.0) + seconds

    def _timed(self, function, name_of_call):
        """Wrap `function` so each call adds its duration under the name that name_of_call() returns."""
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            name = name_of_call()
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._add(name, time.perf_counter() - t0)
        return wrapper

    def _hook_model_forward(self, model):
        """Time the policy's own forward calls that happen inside completion_logprobs."""
        if id(model) in self._hooked_models:
            return
        self._hooked_models.add(id(model))
        start = {}
        model.register_forward_pre_hook(lambda *_: start.__setitem__("t", time.perf_counter()))

        def after_forward(*_):
            if self._in_logprobs and torch.is_grad_enabled():
                self._add("fwd_model", time.perf_counter() - start["t"])
        model.register_forward_hook(after_forward)

    def new_step(self):
        """Start the record of the next training step. The rollout wrapper calls it, and so may a TRL callback."""
        self.steps.append({})

    @contextlib.contextmanager
    def installed(self):
        """Install the wrappers and hooks, and restore the originals on exit."""
        import torch.optim.optimizer as optim_hooks
        from transformers.generation.utils import GenerationMixin

        import rollout
        import train

        originals = {
            (rollout, "generate_groups"): rollout.generate_groups,
            (rollout, "completion_logprobs"): rollout.completion_logprobs,
            (GenerationMixin, "generate"): GenerationMixin.generate,
            (torch.Tensor, "backward"): torch.Tensor.backward,
            (train.tasks, "cluster_by_answer"): train.tasks.cluster_by_answer,
        }

        def sample(*args, **kwargs):
            self.new_step()  # train.py samples once per step, at its start
            return originals[(rollout, "generate_groups")](*args, **kwargs)

        timed_logprobs = self._timed(originals[(rollout, "completion_logprobs")],
                                     lambda: "logprobs_grad" if torch.is_grad_enabled() else "score")

        def logprobs(model, *args, **kwargs):
            self._hook_model_forward(model)
            self._in_logprobs = True
            try:
                return timed_logprobs(model, *args, **kwargs)
            finally:
                self._in_logprobs = False

        rollout.generate_groups = sample
        rollout.completion_logprobs = logprobs
        GenerationMixin.generate = self._timed(originals[(GenerationMixin, "generate")], lambda: "generate")
        torch.Tensor.backward = self._timed(originals[(torch.Tensor, "backward")], lambda: "backward")
        train.tasks.cluster_by_answer = self._timed(originals[(train.tasks, "cluster_by_answer")],
                                                    lambda: "semantic")
        step_start = {}

        def before_step(optimizer, *_):
            self.optimizer = (f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')}, "
                              f"foreach={optimizer.defaults.get('foreach')})")
            step_start["t"] = time.perf_counter()

        pre = optim_hooks.register_optimizer_step_pre_hook(before_step)
        def after_step(*_):
            self._add("optimizer_step", time.perf_counter() - step_start["t"])
            self.peak_rss_gb = peak_rss_gb()

        post = optim_hooks.register_optimizer_step_post_hook(after_step)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()
            for (owner, name), original in originals.items():
                setattr(owner, name, original)
