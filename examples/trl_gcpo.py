"""
Train a policy with GCPO inside TRL's GRPOTrainer (gcpo_trl.GCPOTrainer), on one
process or many.

    # smoke run in under a minute on a CPU: random tiny policy and encoder, 2 steps
    python examples/trl_gcpo.py --model tiny --encoder tiny --max_steps 2
    # the offline defaults: SmolLM2-135M-Instruct, all-MiniLM-L6-v2, built-in arithmetic
    python examples/trl_gcpo.py --max_steps 20
    # several GPUs (see configs/); any GRPOConfig option is a flag, e.g. vLLM generation
    accelerate launch --config_file configs/deepspeed_zero2.yaml examples/trl_gcpo.py \\
        --model Qwen/Qwen2.5-1.5B-Instruct --task gsm8k --num_generations 8 --use_vllm true --vllm_mode colocate

Flags come from three dataclasses: ScriptArguments below (model and data),
gcpo_trl.GCPOConfig (the method: --signal, --calibration, --tau, --kernel,
--weight_rule, --alpha, --w_min, --rescale, --encoder) and TRL's GRPOConfig (everything else).
`--help` lists them all. The data comes from tasks.py: the built-in arithmetic task,
GSM8K or MATH-500 from the hub, or a local JSONL file (--data); the reward is
tasks.grade, 1 for a final answer equivalent to the reference, else 0.

Departures from train.py, which is the single-process reference loop:
1. The loss is TRL's (GRPOConfig.loss_type, default "dapo": token sum divided by
   the number of tokens in the global accumulated batch), and its advantages follow
   GRPOConfig.scale_rewards (default "group", the same formula as gcpo.group_advantages).
2. There are no presets: --signal none is GRPO, --signal semantic --calibration none
   is SEED-GRPO, and the defaults (--signal geometric --calibration reward) are GCPO.
3. Only the none, geometric and semantic signals are available (see gcpo_trl.py).
"""
import functools
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live at the repo root

from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import models  # noqa: E402
import tasks  # noqa: E402
from gcpo_trl import GCPOConfig, GCPOTrainer, completion_text  # noqa: E402


@dataclass
class ScriptArguments:
    """Model and data options of this script."""

    model: str = field(default=models.DEFAULT_POLICY, metadata={
        "help": "policy: hub id, local folder, the packaged default SmolLM2-135M-Instruct, or 'tiny' "
                "(random 2-layer Llama for smoke runs)"})
    task: Literal["arithmetic", "gsm8k", "math500"] = field(default="arithmetic", metadata={
        "help": "arithmetic (built in) | gsm8k | math500 (the latter two from the hub unless --data is set)"})
    data: str = field(default="", metadata={"help": "local JSONL training file; keeps --task's prompt template"})
    question_field: str = field(default="question", metadata={"help": "JSONL field with the question"})
    answer_field: str = field(default="answer", metadata={"help": "JSONL field with the reference answer"})
    n_prompts: int = field(default=0, metadata={
        "help": "number of training prompts (0: all of the file or hub split, 2000 for arithmetic)"})
    task_seed: int = field(default=0, metadata={"help": "seed of the arithmetic task's generator"})
    unparsed: Literal["singleton", "shared"] = field(default="singleton", metadata={
        "help": "meaning clusters of completions without a parsable answer, for --signal semantic: "
                "singleton (one cluster each) | shared (one cluster for all)"})


def parse_args(argv=None):
    """Parse the command line into (ScriptArguments, GCPOConfig, GRPOConfig)."""
    parser = HfArgumentParser((ScriptArguments, GCPOConfig, GRPOConfig))
    # Defaults for a first run: small groups and short completions. TRL's own defaults
    # (G = 8, 512 tokens, bf16) suit a GPU run and are one flag away.
    parser.set_defaults(
        output_dir="runs/trl_gcpo", num_generations=4, per_device_train_batch_size=8,
        max_completion_length=64, learning_rate=1e-5, logging_steps=1, save_strategy="no",
        report_to="none", bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
    )
    return parser.parse_args_into_dataclasses(args=argv)


def build_dataset(script: ScriptArguments) -> Dataset:
    """Build the training set in TRL's format: chat messages in "prompt", the reference in "answer"."""
    items = tasks.load_items(script.task, data=script.data or None, split="train", n=script.n_prompts or None,
                             seed=script.task_seed, question_field=script.question_field,
                             answer_field=script.answer_field)
    rows = [{"prompt": tasks.build_messages(item, script.task), "answer": item.answer} for item in items]
    return Dataset.from_list(rows)


def correctness(completions, answer, **kwargs):
    """TRL reward function: 1.0 when a completion's final answer is equivalent to the reference, else 0.0."""
    return [tasks.grade(completion_text(c), reference)[0] for c, reference in zip(completions, answer)]


def load_model(script: ScriptArguments, args: GRPOConfig):
    """Return (model, tokenizer): a model object for 'tiny', else a name or folder that TRL loads itself."""
    if script.model == "tiny":
        return models.tiny_policy(seed=args.seed)
    if script.model != models.DEFAULT_POLICY:
        return script.model, None  # TRL loads it, which lets DeepSpeed ZeRO-3 partition it while loading
    # The packaged default is a GGUF file, which the Trainer cannot fine-tune. models.py
    # converts it once to a float32 folder, and TRL then loads that folder like any other.
    folder = models.policy_cache_dir()
    with args.main_process_first(desc="converting the default policy"):
        if not (folder / "config.json").exists():
            models.load_policy(models.DEFAULT_POLICY, device="cpu")
    return str(folder), None


def main(argv=None):
    script, gcpo, args = parse_args(argv)
    if args.process_index == 0:
        print("script:", json.dumps(asdict(script)), "\ngcpo:", json.dumps(asdict(gcpo)), flush=True)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        config = {"script": asdict(script), "gcpo": asdict(gcpo), "grpo": json.loads(args.to_json_string())}
        # run_config.json, because save_model writes the model's own config.json to the same folder
        (Path(args.output_dir) / "run_config.json").write_text(json.dumps(config, indent=2))

    model, tokenizer = load_model(script, args)
    encoder = None  # GCPOTrainer loads gcpo.encoder by name when the signal needs it
    if gcpo.signal == "geometric" and gcpo.encoder == "tiny":
        # NOTE: fails on ranks other than 0 of a multi-process run, because tiny_encoder
        # passes through save_pretrained, which transformers 5.25 runs only on rank 0.
        encoder = models.tiny_encoder(seed=args.seed)
    cluster_fn = functools.partial(tasks.cluster_by_answer, unparsed=script.unparsed)
    trainer = GCPOTrainer(
        model=model, reward_funcs=correctness, args=args, train_dataset=build_dataset(script),
        processing_class=tokenizer, gcpo=gcpo, encoder=encoder,
        cluster_fn=cluster_fn if gcpo.signal == "semantic" else None,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.accelerator.end_training()  # also destroys the process group of a multi-process run


if __name__ == "__main__":
    main()
