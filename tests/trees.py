"""Random token trees shaped like PACT groups, for tests."""
import random


def random_tree_sequences(seed, depth, n_leaves=4, vocab=40):
    """Sequences whose trie has the given branching depth, odd segment lengths and single-token segments."""
    rng = random.Random(seed)

    def run(n):
        return [rng.randrange(vocab) for _ in range(n)]

    seqs = []

    def grow(prefix, level):
        if level == depth:
            seqs.append(prefix)
            return
        for _ in range(rng.randint(1, 2) if level else 2):
            grow(prefix + run(rng.choice([1, 2, 3, 5, 7])), level + 1)

    grow(run(rng.choice([3, 9, 13])), 0)
    seqs.append(seqs[0][:2] + [vocab])  # a short branch off the root's first tokens
    seqs.append(seqs[-1][:3] + [vocab + 1])  # a single-token segment below it
    return seqs[: n_leaves + 2] if len(seqs) > n_leaves + 2 else seqs


def pact_group(seed=0, prompt=11, trace=7, header=3, G=3, response=5, sft=6, vocab=50):
    """tc_i = shared + trace + y_i, po_i = shared + header + y_i, sft = shared + header + h (SPEC section 2)."""
    rng = random.Random(seed)
    run = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    shared, trace_block, po_header, h = run(prompt), run(trace), run(header), run(sft)
    ys = [run(response + i) for i in range(G)]
    tc = [shared + trace_block + y for y in ys]
    po = [shared + po_header + y for y in ys]
    return tc + po + [shared + po_header + h]
