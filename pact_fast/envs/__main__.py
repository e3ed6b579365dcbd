"""``python -m pact_fast.envs --demo``: built-in tasks with their expert traces, and one episode of a
tiny random model, printed for a person to read."""
import argparse


def demo(n_tasks=3, seed=0, hops=(1,)):
    """Print ``n_tasks`` built-in tasks with ``hops`` look-ups (default: the main job's 1-hop tasks) and their
    expert traces, then one episode of an untrained tiny model on the first."""
    from ..chat import render
    from ..data import parse_example
    from ..rollout import HFRolloutEngine, RolloutConfig
    from .multihop import MultiHopEnv, make_tasks
    from .tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tasks = [parse_example(t) for t in make_tasks(n_tasks, seed=seed, hops=hops, ops=False)]  # as the main job
    for k, ex in enumerate(tasks):
        n_hops = hops[k % len(hops)]
        print(f"=== task {ex.id} ({n_hops} hop{'s' if n_hops > 1 else ''})  answer: {ex.answer}")
        print("question:", ex.messages[-1]["content"])
        for m in ex.trace:
            if m["role"] == "assistant":
                calls = " ; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls", []))
                print(f"  assistant  think: {m.get('reasoning_content', '')}")
                print(f"             {'call: ' + calls if calls else 'answer: ' + m['content']}")
            else:
                print(f"  {m['role']:<10} {m['content']}")
        print()
    from ..models import random_qwen3

    model = random_qwen3(len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_positions=1024, seed=seed)
    ex = tasks[0]
    engine = HFRolloutEngine(model, tokenizer, RolloutConfig(group_size=1, max_new_tokens=24, max_turns=3), seed=seed)
    ep = engine.rollout([ex], lambda e: MultiHopEnv(e, max_turns=3))[0][0]
    print("=== one episode of an untrained tiny model (prompt-only)")
    print(render(tokenizer, ex.messages, ex.tools, True))
    print(tokenizer.decode(ep.response_ids))
    print(f"finish={ep.finish} turns={ep.turns} tool_calls={ep.tool_calls} reward={ep.reward}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", action="store_true", help="print tasks, traces and one episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hops", type=int, nargs="+", default=[1], help="look-ups per task (the main job: 1)")
    args = parser.parse_args()
    if not args.demo:
        parser.print_help()
        return
    demo(seed=args.seed, hops=tuple(args.hops))


if __name__ == "__main__":
    main()
