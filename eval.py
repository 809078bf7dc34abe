"""
Evaluation: accuracy of a policy on held-out items.
"""
import torch

import rollout
import tasks


def greedy_accuracy(model, tokenizer, items, task, max_new_tokens, batch_size=64):
    """Share of items whose greedy completion is graded correct."""
    correct = 0.0
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        prompts = rollout.render_prompts(tokenizer, [tasks.build_messages(it, task) for it in chunk])
        with torch.no_grad():
            ro = rollout.generate_groups(model, tokenizer, prompts, 1, max_new_tokens, temperature=0.0, score=False)
        correct += sum(tasks.grade(text, it.answer)[0] for text, it in zip(ro.texts, chunk))
    return correct / max(len(items), 1)
