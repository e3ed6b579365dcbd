import random

import pytest
import torch

from pact_fast.ops.tree_attention import segments, tree_mask
from pact_fast.packing import pack_tree, split_units
from trees import pact_group, random_tree_sequences


def _all_cases():
    return [pact_group(seed=s) for s in range(3)] + [random_tree_sequences(s, d) for s in range(3) for d in (1, 2, 4)]


@pytest.mark.parametrize("seqs", _all_cases())
def test_round_trip_and_positions(seqs):
    p = pack_tree(seqs)
    for seq, index in zip(seqs, p.token_index):
        assert p.input_ids[index].tolist() == seq
        assert p.position_ids[index].tolist() == list(range(len(seq)))
    distinct = {tuple(s[: i + 1]) for s in seqs for i in range(len(s))}
    assert p.num_tokens == len(distinct)
    covered = torch.zeros(p.num_tokens, dtype=torch.bool)
    for index in p.token_index:
        covered[index] = True
    assert covered.all()


@pytest.mark.parametrize("seqs", _all_cases())
def test_subtree_end_matches_brute_force_ancestors(seqs):
    p = pack_tree(seqs)
    L = p.num_tokens
    brute = torch.zeros(L, L, dtype=torch.bool)  # [query, key]: key is an ancestor of query or itself
    for index in p.token_index:
        for t in range(len(index)):
            brute[index[t], index[: t + 1]] = True
    assert torch.equal(tree_mask(p.subtree_end[None])[0], brute)


def test_accepts_tensors_and_tensor_inputs_share_prefixes():
    seqs = pact_group(seed=4)
    from_lists = pack_tree(seqs)
    from_tensors = pack_tree([torch.tensor(s) for s in seqs])
    assert torch.equal(from_lists.input_ids, from_tensors.input_ids)
    naive = sum(len(s) for s in seqs)
    assert from_lists.num_tokens < naive / 2


def test_predictor_rows_point_at_the_previous_token():
    seqs = pact_group(seed=1)
    p = pack_tree(seqs)
    rows, targets, offsets = p.predictor_rows()
    for j, seq in enumerate(seqs):
        r = rows[offsets[j]:offsets[j + 1]]
        assert targets[offsets[j]:offsets[j + 1]].tolist() == seq[1:]
        assert r.tolist() == p.token_index[j][:-1].tolist()
    # at the branch point after the shared prefix, one row predicts the first token of several children
    assert len(set(rows.tolist())) < len(rows)
    rows2, targets2, offsets2 = p.predictor_rows([2, 0], [torch.tensor([3, 5]), torch.tensor([1])])
    assert targets2.tolist() == [seqs[2][3], seqs[2][5], seqs[0][1]]
    assert rows2.tolist() == [p.token_index[2][2], p.token_index[2][4], p.token_index[0][0]]
    assert offsets2.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="token 0"):
        p.predictor_rows([0], [torch.tensor([0])])


def test_predictor_rows_refuse_masks_and_ids_out_of_range():
    p = pack_tree([[1, 2, 3, 4], [1, 2, 5]])
    # an all-True mask read as positions [1, 1, 1] scored token 1 three times
    with pytest.raises(TypeError, match="token_ids\\[0\\] must hold integer token positions, got torch.bool"):
        p.predictor_rows([0], [torch.tensor([True, True, True])])
    with pytest.raises(ValueError, match="sequence id -1 is outside \\[0, 2\\)"):  # was the last sequence
        p.predictor_rows([-1])
    with pytest.raises(ValueError, match="it has tokens 1..2 to score"):  # an IndexError
        p.predictor_rows([1], [torch.tensor([3])])


def test_segments_follow_the_trie():
    seqs = pact_group(seed=2, G=2)
    p = pack_tree(seqs)
    segs = segments(p.subtree_end)
    assert sum(e - s for s, e, _ in segs) == p.num_tokens
    # shared prompt, trace block, 2 tc responses, po header, 2 po responses, sft branch
    assert len(segs) == 8
    for s, e, anc in segs:
        assert (p.position_ids[s:e] == torch.arange(e - s) + len(anc)).all()


def test_split_units_respects_the_budget_and_covers_every_sequence():
    groups = [pact_group(seed=s, G=4) for s in range(5)]
    budget = 60
    index = [(g, j) for g, grp in enumerate(groups) for j in range(len(grp))]  # one sequence per unit
    batches = [[index[u] for u in b] for b in split_units([[groups[g][j]] for g, j in index], budget)]
    seen = sorted(x for b in batches for x in b)
    assert seen == sorted((g, j) for g, grp in enumerate(groups) for j in range(len(grp)))
    for b in batches:
        assert pack_tree([groups[g][j] for g, j in b]).num_tokens <= budget
    whole = pack_tree(groups[0]).num_tokens
    assert whole > budget and len(batches) > len(groups), "a group larger than the budget must be split"
    with pytest.raises(ValueError, match="max_tokens"):
        split_units([[list(range(100))]], 50)


@pytest.mark.parametrize("bad,word", [([[]], "empty"), ([torch.zeros(2, 2, dtype=torch.long)], "1-D"),
                                      ([torch.tensor([1.7, 2.2])], "integer token ids"),  # truncated to 1, 2
                                      ([[1, 2.5]], "integer token ids"), ([[True, 3]], "integer token ids")])
def test_bad_sequences_are_errors(bad, word):
    with pytest.raises(ValueError, match=word):
        pack_tree(bad)


def test_identical_sequences_share_every_token():
    rng = random.Random(0)
    s = [rng.randrange(9) for _ in range(12)]
    p = pack_tree([s, s, s[:5]])
    assert p.num_tokens == 12
    assert torch.equal(p.token_index[0], p.token_index[1])


def test_pad_rows_pads_lists_and_tensors_on_either_side():
    from pact_fast.packing import pad_rows

    assert pad_rows([[1, 2], [], [3]]).tolist() == [[1, 2], [0, 0], [3, 0]]
    assert pad_rows([[1, 2], [3]], 3, value=9, left=True).tolist() == [[9, 1, 2], [9, 9, 3]]
    assert pad_rows([[1, 0]], dtype=torch.float32).dtype == torch.float32
    assert pad_rows([]).shape == (0, 0)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = pad_rows([x, x[:1]], 3)
    assert out.dtype == torch.float64 and out.tolist() == [[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]
    out.sum().backward()
    assert x.grad.tolist() == [2.0, 1.0]
    # lists of floats (log-probs, rewards) were truncated to int64: [[0, -1], [2, 0]]
    assert pad_rows([[0.5, -1.25], [2.0]]).tolist() == [[0.5, -1.25], [2.0, 0.0]]
    assert pad_rows([torch.tensor([0.5]), [1]]).tolist() == [[0.5], [1.0]]
    for rows in ([torch.arange(5), torch.arange(3)], [[1, 2, 3], [4]]):  # tensors were cut to the width silently
        with pytest.raises(ValueError, match="width=2 is shorter than the longest row"):
            pad_rows(rows, width=2)


def test_one_sequence_where_a_list_of_them_goes_is_a_clear_error():
    from pact_fast.packing import split_units

    with pytest.raises(ValueError, match="sequence 0 must be a list or 1-D tensor of token ids, got int 1"):
        pack_tree([1, 2, 3])  # was TypeError: 'int' object is not iterable
    with pytest.raises(ValueError, match="sequence 0 must be a list or 1-D tensor of token ids, got int 1"):
        split_units([[1, 2, 3], [1, 2, 4]], 10)  # sequences passed as units
    with pytest.raises(ValueError, match="sequence 0 must be a list or 1-D tensor of token ids, got str"):
        pack_tree(["abc"])
