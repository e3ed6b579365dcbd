"""What every tool environment shares: turn and error bookkeeping around one-call execution."""


class ToolEnv:
    """Base of the environments the rollout drives.

    Subclasses implement ``run_call(name, arguments) -> (response text, ok)`` and ``reward(final_text)``;
    multi-turn environments also override ``next_user_turn``. ``max_turns`` is the episode's turn limit.
    """

    malformed_response = "error : bad tool call"

    def __init__(self, max_turns):
        self.max_turns = max_turns
        self.turns = 0
        self.errors = 0

    def run_call(self, name, arguments):
        raise NotImplementedError

    def step(self, calls):
        """Execute a turn's calls (``ToolCall`` or ``ToolCallError`` items) -> tool response texts."""
        self.turns += 1
        out = []
        for call in calls:
            text, ok = self.run_call(call.name, call.arguments) if hasattr(call, "arguments") else (
                self.malformed_response, False)
            self.errors += not ok
            out.append(text)
        return out

    def next_user_turn(self):
        """The next user message once the assistant ends a turn (multi-turn environments); None ends the episode."""
        return None
