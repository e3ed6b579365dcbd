"""PACT in other RL codebases: thin adapters around ``pact_fast.losses.pact_loss``.

- ``pact_fast.adapters.trl``: ``PACTGRPOTrainer``, a TRL ``GRPOTrainer`` whose loss is PACT's;
- ``pact_fast.adapters.openrlhf``: ``PACTPolicyLoss``, a drop-in for OpenRLHF's ``PolicyLoss``;
- ``pact_fast.adapters.verl``: a ``register_policy_loss`` function and a whole-loss hook for verl.

Only an adapter module imports its host library (the TRL one at import, the verl one lazily, the
OpenRLHF one never: it only mirrors PolicyLoss's call), so ``pact_fast`` itself never depends on them.
Every adapter needs tensors that the host does not compute by itself: the current (and, off-policy,
the old) policy's log-probs of the rollout tokens under the trace-conditioned prompt, and for the
SFT term the trace tokens' log-probs with their component labels (``pact_fast.chat.trace_sequences``
makes the labels from a chat template). Each module's docstring lists exactly what it needs.
"""
