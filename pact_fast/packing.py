"""Prefix-tree packing: merge token sequences into a trie and flatten it depth-first.

One packed row holds every sequence of a PACT group (trace-conditioned and prompt-only copies
of each rollout, plus the trace), each shared prefix once (SPEC section 2):

- ``position_ids[i]``: depth of token i in the trie, the position it has in its own sequence;
- ``subtree_end[i]``: one past the last packed index in token i's subtree; key ``k`` is
  visible to query ``q`` iff ``k <= q < subtree_end[k]``;
- ``token_index[j][t]``: packed index of token t of sequence j; token t of sequence j is
  predicted by the hidden state at ``token_index[j][t - 1]``.

Shared prefixes are found from token ids alone, so any chat template works.
"""
from dataclasses import dataclass

import torch


class _Trie:
    """Token trie with one node per distinct prefix; children kept in insertion order."""

    def __init__(self):
        self.token = []  # node -> token id
        self.children = [{}]  # node -> {token id: child node}; node 0 is the empty root
        self.size = 0  # tokens (non-root nodes)

    def new_tokens(self, seqs):
        """How many nodes inserting all of ``seqs`` would add (prefixes shared among them counted once)."""
        virtual = {}  # (parent, token) -> id of a node that would be created
        for seq in seqs:
            node, is_real = 0, True
            for tok in seq:
                if is_real and tok in self.children[node]:
                    node = self.children[node][tok]
                    continue
                key = (is_real, node, tok)
                if key not in virtual:
                    virtual[key] = len(virtual)
                node, is_real = virtual[key], False
        return len(virtual)

    def insert(self, seq):
        """Insert ``seq``; returns the node of each of its tokens."""
        node, nodes = 0, []
        for tok in seq:
            child = self.children[node].get(tok)
            if child is None:
                child = len(self.children)
                self.children[node][tok] = child
                self.children.append({})
                self.token.append(tok)
                self.size += 1
            nodes.append(child)
            node = child
        return nodes


@dataclass
class PackedTree:
    """A DFS-flattened token trie. All tensors are int64 on CPU; move them with ``.to(device)``."""

    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L]
    subtree_end: torch.Tensor  # [L]
    token_index: list  # per sequence j: [n_j] packed index of each token

    @property
    def num_tokens(self):
        return int(self.input_ids.numel())

    def to(self, device):
        return PackedTree(self.input_ids.to(device), self.position_ids.to(device), self.subtree_end.to(device),
                          [t.to(device) for t in self.token_index])

    def predictor_rows(self, seq_ids=None, token_ids=None):
        """Rows of the packed hidden state that predict chosen tokens, and those tokens.

        Args:
            seq_ids: sequences to score (default: all, in order).
            token_ids: optional per chosen sequence an integer tensor (or list) of the token positions
                1 <= t < n to score (default: every token 1..n-1).

        Returns:
            ``rows [M]`` (packed index of the hidden state that predicts each token; the same row
            repeats at a branch point), ``targets [M]`` (the predicted token ids) and ``offsets [S+1]``
            (the scored tokens of the s-th chosen sequence are ``rows[offsets[s]:offsets[s+1]]``).
        """
        seq_ids = range(len(self.token_index)) if seq_ids is None else seq_ids
        rows, targets, offsets = [], [], [0]
        for s, j in enumerate(seq_ids):
            if not 0 <= j < len(self.token_index):  # a negative id would pick a sequence from the end
                raise ValueError(f"predictor_rows: sequence id {j} is outside [0, {len(self.token_index)})")
            index = self.token_index[j]
            if token_ids is None:
                t = torch.arange(1, len(index))
            else:
                t = torch.as_tensor(token_ids[s])
                if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:  # a mask read as ids 0 and 1
                    raise TypeError(f"predictor_rows: token_ids[{s}] must hold integer token positions, got "
                                    f"{t.dtype} (for a boolean mask m pass m.nonzero().squeeze(1))")
                t = t.long()
            if t.numel() and (int(t.min()) < 1 or int(t.max()) >= len(index)):
                raise ValueError(f"predictor_rows: sequence {j} asks to score tokens in [{int(t.min())}, "
                                 f"{int(t.max())}]; it has tokens 1..{len(index) - 1} to score (token 0 has no "
                                 "predictor)")
            rows.append(index[t - 1])
            targets.append(self.input_ids[index[t]])
            offsets.append(offsets[-1] + t.numel())
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return cat(rows), cat(targets), torch.tensor(offsets)


def _as_list(seq, j):
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1:
            raise ValueError(f"pack_tree: sequence {j} must be 1-D, got shape {tuple(seq.shape)}")
        if seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool:
            raise ValueError(f"pack_tree: sequence {j} must hold integer token ids, got {seq.dtype}")
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):  # one sequence passed where a list of them goes
        raise ValueError(f"pack_tree: sequence {j} must be a list or 1-D tensor of token ids, got {type(seq).__name__} "
                         f"{seq!r:.40} (the argument is a list of sequences)")
    seq = list(seq)
    if not seq:
        raise ValueError(f"pack_tree: sequence {j} is empty")
    if any(isinstance(t, bool) or int(t) != t for t in seq):
        raise ValueError(f"pack_tree: sequence {j} must hold integer token ids, got {seq[:8]}")
    return [int(t) for t in seq]


def pack_tree(sequences):
    """Merge token sequences (lists or 1-D tensors of ids) into one DFS-flattened trie.

    Returns a ``PackedTree`` with ``L`` = number of distinct prefixes (trie nodes). Packed order is
    depth-first pre-order with children in order of first appearance, so the first sequence is laid
    out contiguously from index 0.
    """
    seqs = [_as_list(s, j) for j, s in enumerate(sequences)]
    trie = _Trie()
    seq_nodes = [trie.insert(s) for s in seqs]
    L = trie.size
    order = [0] * (L + 1)  # node -> packed index (root excluded)
    input_ids = [0] * L
    depth = [0] * L
    subtree_end = [0] * L
    nxt = 0
    stack = [(child, 0, False) for child in reversed(list(trie.children[0].values()))]
    while stack:
        node, d, done = stack.pop()
        if done:
            subtree_end[order[node]] = nxt
            continue
        order[node] = nxt
        input_ids[nxt] = trie.token[node - 1]
        depth[nxt] = d
        nxt += 1
        stack.append((node, d, True))
        stack.extend((child, d + 1, False) for child in reversed(list(trie.children[node].values())))
    token_index = [torch.tensor([order[n] for n in nodes], dtype=torch.long) for nodes in seq_nodes]
    return PackedTree(torch.tensor(input_ids, dtype=torch.long), torch.tensor(depth, dtype=torch.long),
                      torch.tensor(subtree_end, dtype=torch.long), token_index)


def packed_size(sequences):
    """Tokens of the trie that ``pack_tree(sequences)`` builds: each distinct prefix once."""
    return _Trie().new_tokens([_as_list(seq, j) for j, seq in enumerate(sequences)])


def split_units(units, max_tokens):
    """Assign units (each a list of sequences that must share a micro-batch, e.g. the two copies of a
    rollout) to micro-batches whose packed trie stays within ``max_tokens``.

    Returns a list of micro-batches, each a list of unit indices in order. Units are filled in order;
    one that does not fit starts the next micro-batch, which packs its own copy of the ancestors it
    needs (a shared prompt is packed again)."""
    batches, current, trie = [], [], _Trie()
    for u, unit in enumerate(units):
        seqs = [_as_list(seq, j) for j, seq in enumerate(unit)]
        alone = _Trie().new_tokens(seqs)
        if alone > max_tokens:
            raise ValueError(f"split_units: unit {u} packs to {alone} tokens, more than max_tokens={max_tokens}; "
                             "raise the budget or truncate the sequences")
        if current and trie.size + trie.new_tokens(seqs) > max_tokens:
            batches.append(current)
            current, trie = [], _Trie()
        for seq in seqs:
            trie.insert(seq)
        current.append(u)
    if current:
        batches.append(current)
    return batches


def pad_rows(rows, width=None, value=0, *, dtype=None, device=None, left=False):
    """Rows of different lengths as one padded tensor ``[B, W]``.

    Args:
        rows: B lists of numbers, or B 1-D tensors (which keep their autograd graph).
        width: W, at least the longest row; default the longest row (0 without rows).
        value: the padding value.
        dtype, device: default the tensor rows' own, or on the CPU int64 for lists of ints, the values' type
            where a row holds another (float32 for Python floats).
        left: pad before each row (left-padded prompts) instead of after it.
    """
    longest = max((len(r) for r in rows), default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"pad_rows: width={width} is shorter than the longest row ({longest}); rows are never cut")
    if rows and all(isinstance(r, torch.Tensor) for r in rows):
        out = torch.stack([torch.nn.functional.pad(r, (width - len(r), 0) if left else (0, width - len(r)),
                                                   value=value) for r in rows])  # [B, W]
        return out.to(dtype=dtype or out.dtype, device=device or out.device)
    rows = [torch.as_tensor(r) for r in rows]
    if dtype is None:  # int64 for ids and masks, promoted by the values (a float would be truncated to an int)
        dtype = torch.long
        for r in rows:
            if r.numel():
                dtype = torch.promote_types(dtype, r.dtype)
    out = torch.full((len(rows), width), value, dtype=dtype)  # [B, W]
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        out[i, start:start + len(r)] = r
    return out if device is None else out.to(device)


def pack_back_to_back(sequences):
    """The unshared layout: sequences one after another, each attending only to itself (a forest of
    chains, i.e. a block-diagonal causal mask). What padding-free RL trainers pack today; the
    baseline the trie is measured against. Same ``PackedTree`` interface as ``pack_tree``."""
    seqs = [_as_list(s, j) for j, s in enumerate(sequences)]
    ids, pos, ends, index, start = [], [], [], [], 0
    for s in seqs:
        n = len(s)
        ids += s
        pos += range(n)
        ends += [start + n] * n
        index.append(torch.arange(start, start + n))
        start += n
    return PackedTree(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                      torch.tensor(ends, dtype=torch.long), index)
