"""A rollout engine that replays the expert trace as every episode (shortened by g tokens for the
g-th episode, reward alternating 0/1): the same global batch on every run, for exact comparisons."""
import torch

from pact_fast.chat import prompt_ids, trace_sequences
from pact_fast.losses import OTHER, REASONING, TOOL_CALL
from pact_fast.rollout import Episode


class ReplayEngine:
    def __init__(self, model, tokenizer, config, seed=0):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.generator = torch.Generator().manual_seed(seed)

    def rollout(self, examples, make_env, group_size=None, greedy=None):
        out = []
        for ex in examples:
            prompt = prompt_ids(self.tokenizer, ex)
            seq = trace_sequences(self.tokenizer, ex)[0]
            resp = seq.input_ids[len(prompt):]
            mask = [int(c in (REASONING, TOOL_CALL, OTHER)) for c in seq.components[len(prompt):]]
            group = []
            for g in range(group_size or self.config.group_size):
                n = len(resp) - g
                group.append(Episode(list(prompt), resp[:n], mask[:n], [-1.0] * n, reward=float(g % 2),
                                     turns=1, finish="answer"))
            out.append(group)
        return out
