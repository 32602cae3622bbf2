"""Token-tree drafting: several candidate continuations verified in one target forward.

A chain is wasted from its first rejected token on. A tree spends the same verify positions on
the alternatives the drafter itself finds likely: where the drafter is unsure between two
tokens, both get a branch. The tree is shaped per sequence and per step (dynamic, as in
EAGLE-2 / Sequoia rather than one fixed shape), best first:

  score(node)  the estimated chance the verifier walks down to the node: along the path from
               the root, each token's accept rate (the drafter's probability calibrated against
               the verdicts seen so far) times the chance that its earlier siblings were all
               rejected;
  candidates   the children of a node in the order the drafter draws them: its most likely
               tokens (greedy requests) or tokens drawn without replacement from q (sampled
               requests; the first one is exactly the chain's sample);
  growth       level by level, up to depth k: every candidate of the frontier joins a pool,
               and the best `branching` new ones that can still make the cut are expanded at
               the next level. The draft is the pool's `nodes` best: deep where the drafter is
               sure, wide where it is not. A candidate's score is capped by its earlier
               siblings', so the pick always keeps siblings a prefix of their draw order (which
               sampled verification needs) and every node's parent.

  lookup       greedy trees also take in the sequence's prompt-lookup continuation (what
               followed the latest earlier occurrence of its longest matching n-gram): it
               follows the drafter's nodes where they agree and adds nodes where they do not,
               scored with a calibration of their own. A small drafter is weakest exactly where
               code repeats what the sequence already holds (names, argument lists), and that is
               where lookup is right. (Sampled trees have none: their siblings must be drawn
               from q in order.)

Each level costs one drafter forward over the nodes being expanded and their ancestors, fed as
a block under the tree mask on top of the sequence's cached context. After the verdict the
accepted path's cache entries are compacted into place (kernels/compaction.py), so the next
step feeds only what it must.
"""

from __future__ import annotations

import bisect
import collections
import heapq
from dataclasses import dataclass, field

import torch

from specserve.actors.engine.drafters import Draft, DraftRequest, ModelDrafter, PromptLookup, SeqState
from specserve.actors.engine.request import SamplingParams
from specserve.kernels.tree import tree_mask


@dataclass
class _Tree:
    """The candidate pool of one sequence's tree; the draft is its best `budget` nodes."""

    seq_id: int
    st: SeqState
    budget: int
    depth_max: int
    forwards: int = 0
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # pool index of the parent, -1 = the root
    scores: list[float] = field(default_factory=list)  # estimated reach probability, capped by earlier siblings'
    probs: list[float] = field(default_factory=list)  # the drafter's probability of each token
    depths: list[int] = field(default_factory=list)
    q_rows: list = field(default_factory=list)  # (ids, probs) each token was drawn from (sampled)
    rates: list[float] = field(default_factory=list)  # estimated accept rate of each node once tested
    lookup: list[int | None] = field(default_factory=list)  # a prompt-lookup node's calibration rank; None: the model's
    fed: list[int] = field(default_factory=list)  # pool nodes in the drafter cache after the context

    def add(self, token: int, parent: int, score: float, prob: float, q_row, rate: float,
            lookup: int | None = None) -> int:
        self.tokens.append(token)
        self.probs.append(prob)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.q_rows.append(q_row)
        self.rates.append(rate)
        self.lookup.append(lookup)
        return len(self.tokens) - 1

    def children(self, parent: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == parent]

    def ancestors(self, nodes: list[int]) -> list[int]:
        """`nodes` and all their ancestors, in pool order (parents first)."""
        keep: set[int] = set()
        for i in nodes:
            while i >= 0 and i not in keep:
                keep.add(i)
                i = self.parents[i]
        return sorted(keep)

    def cutoff(self) -> float:
        """The score a node needs to be among the best `budget` so far (0 while there is room)."""
        if len(self.scores) < self.budget:
            return 0.0
        return heapq.nlargest(self.budget, self.scores)[-1]

    def best(self) -> list[int]:
        """The `budget` best nodes in pool order. Scores never grow down a path or along the
        siblings' draw order, and ties go to the earlier node, so the pick is closed under
        parents and earlier siblings: a valid tree whose siblings are a prefix of their draws.
        (A lookup node, greedy trees only, may outscore an earlier sibling; greedy verification
        needs only the closure under parents.)"""
        ranked = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))
        return sorted(ranked[: self.budget])

    def draft(self, keep: list[int]) -> Draft:
        index = {node: j for j, node in enumerate(keep)}
        draft = Draft([self.tokens[i] for i in keep], forwards=self.forwards, requested=self.depth_max,
                      parents=[index.get(self.parents[i], -1) for i in keep])
        if keep and self.q_rows[keep[0]] is not None:
            m = max(self.q_rows[i][0].shape[0] for i in keep)
            draft.q_ids = torch.zeros(len(keep), m, dtype=torch.long)
            draft.q_probs = torch.zeros(len(keep), m)
            for j, i in enumerate(keep):
                ids, probs = self.q_rows[i]
                draft.q_ids[j, : ids.shape[0]], draft.q_probs[j, : probs.shape[0]] = ids, probs
        return draft


class Calibration:
    """P(the verifier accepts a candidate | its depth, its rank among its siblings, its drafter
    probability), learned online.

    A small drafter's probabilities are rarely its acceptance rates: the demo drafter's argmax
    is accepted far more often than it believes (even at 5 %), a second candidate of the same
    probability far less, and a token deep in a path the verifier already accepted is more
    likely right than the first. Scoring with raw probabilities then buys width where depth
    would pay. Each verdict tells which candidates were tested and which one was taken, so the
    rate is counted per (rank), (rank, probability bin) and (rank, bin, depth); each finer
    estimate is shrunk toward the coarser one with `strength` pseudo-trials, so a cell the trees
    have rarely tested borrows from its neighbours instead of keeping a pessimistic prior (which
    would keep it untested for good).
    """

    EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # probability bins: finer where drafters are unsure
    PRIOR = (0.6, 0.25, 0.1)  # accept rate of the first / second / later candidate before any verdict

    def __init__(self, depths: int = 4, ranks: int = 3, strength: float = 8.0, cap: float = 5000.0,
                 prior: tuple[float, ...] = PRIOR):
        self.depths, self.ranks, self.strength, self.cap = depths, ranks, strength, cap
        self.prior = prior
        self.hits: dict[tuple, float] = collections.defaultdict(float)
        self.trials: dict[tuple, float] = collections.defaultdict(float)

    def _keys(self, depth: int, rank: int, prob: float) -> list[tuple]:
        r, b, d = min(rank, self.ranks - 1), bisect.bisect_right(self.EDGES, prob), min(depth, self.depths)
        return [(r,), (r, b), (r, b, d)]

    def rate(self, depth: int, rank: int, prob: float) -> float:
        """Estimated accept rate of the `rank`-th candidate (0 = first drawn) of probability
        `prob` at `depth` (1 = a child of the root), given that it is tested."""
        keys = self._keys(depth, rank, prob)
        estimate = self.prior[keys[0][0]]
        for key in keys:
            estimate = (self.hits[key] + self.strength * estimate) / (self.trials[key] + self.strength)
        return estimate

    def observe(self, depth: int, rank: int, prob: float, accepted: bool) -> None:
        for key in self._keys(depth, rank, prob):
            if self.trials[key] >= self.cap:
                self.hits[key] *= 0.5
                self.trials[key] *= 0.5
            self.hits[key] += accepted
            self.trials[key] += 1


class TreeDrafter(ModelDrafter):
    """A model drafter that answers tree requests (`DraftRequest.nodes > 0`) with token trees.

    Chain requests (nodes = 0) are drafted as by ModelDrafter; pipelined drafting is off here,
    since the drafter would have to guess which branch the verifier takes.
    """

    name = "tree"

    LOOKUP_PRIOR = (0.3, 0.6)  # accept rate of a lookup node after the model's / after a lookup node

    def __init__(self, runner, confidence_threshold: float = 0.0, top_m: int = 16, branching: int = 3,
                 min_score: float = 0.0, lookup: int = 8):
        super().__init__(runner, confidence_threshold, top_m)
        self.branching = branching  # most children per node
        self.min_score = min_score  # candidates scored lower are never verified (0: fill the budget)
        self.lookup = lookup  # longest prompt-lookup branch merged into greedy trees (0: none)
        self.prompt_lookup = PromptLookup()
        self.lookup_calibration = Calibration(ranks=2, prior=self.LOOKUP_PRIOR)
        self._fed_nodes: dict[int, dict[int, int]] = {}  # seq -> {draft index: cache offset after the context}
        # seq -> (parents, drafter probs, lookup ranks (None: the drafter's node)) of its last tree
        self._last_tree: dict[int, tuple[list[int], list[float], list[int | None]]] = {}
        # greedy and sampled verification accept differently: one calibration each
        self.calibration = {True: Calibration(), False: Calibration()}  # by params.greedy

    def has_ahead_work(self) -> bool:
        return False

    def swap_weights(self, state: dict, version: str) -> None:
        super().swap_weights(state, version)
        self._fed_nodes.clear()  # the cached tree nodes are gone with the cache
        self._last_tree.clear()

    def start(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        super().start(seq_id, prompt_ids, params)
        self.prompt_lookup.drop(seq_id)

    def stop(self, seq_id: int) -> None:
        self._fed_nodes.pop(seq_id, None)
        self._last_tree.pop(seq_id, None)
        self.prompt_lookup.drop(seq_id)
        super().stop(seq_id)

    def propose(self, reqs: list[DraftRequest]) -> list[Draft]:
        chains = [r for r in reqs if r.nodes <= 0 or r.k <= 0]
        drafts = dict(zip([r.seq_id for r in chains], super().propose(chains) if chains else []))
        trees = [_Tree(r.seq_id, self.seqs[r.seq_id], r.nodes, r.k) for r in reqs if r.nodes > 0 and r.k > 0]
        if trees:
            self._grow(trees)
        for tree in trees:
            if self.lookup > 0 and tree.st.params.greedy:
                self._add_lookup(tree)
        for tree in trees:
            drafts[tree.seq_id] = self._finish(tree)
        return [drafts[r.seq_id] for r in reqs]

    def _finish(self, tree: _Tree) -> Draft:
        """The tree's draft; remembers where its nodes sit in the drafter cache for the verdict."""
        keep = tree.best()
        draft = tree.draft(keep)
        where = {node: pos for pos, node in enumerate(tree.fed)}
        self._fed_nodes[tree.seq_id] = {j: where[node] for j, node in enumerate(keep) if node in where}
        self._last_tree[tree.seq_id] = (draft.parents, [tree.probs[i] for i in keep], [tree.lookup[i] for i in keep])
        st = tree.st
        st.last_draft, st.awaiting, st.last_k, st.ready = draft.tokens, False, 0, None
        return draft

    # -- growing the trees -----------------------------------------------------------------------

    def _grow(self, trees: list[_Tree]) -> None:
        """Level by level: candidates of the frontier join the pool, the best few are expanded
        next, one batched drafter forward per level; the draft is the pool's best at the end."""
        root_logits = self._forward([t.st for t in trees], [self._unfed(t.st, t.st.context) for t in trees])
        for t in trees:
            t.forwards = 1
        frontier = [[(-1, root_logits[i])] for i in range(len(trees))]
        for level in range(max(t.depth_max for t in trees)):
            new_nodes = [self._expand(t, f) if level < t.depth_max else [] for t, f in zip(trees, frontier)]
            nxt = [self._next_frontier(t, nodes) if level + 1 < t.depth_max else []
                   for t, nodes in zip(trees, new_nodes)]
            growing = [i for i, nodes in enumerate(nxt) if nodes]
            if not growing:
                break
            logits = self._forward_tree([trees[i] for i in growing], [nxt[i] for i in growing])
            frontier = [[] for _ in trees]
            for i, rows in zip(growing, logits):
                frontier[i] = list(zip(nxt[i], rows))
                trees[i].forwards += 1

    def _next_frontier(self, tree: _Tree, nodes: list[int]) -> list[int]:
        """The new nodes worth expanding: the best `branching`, if they can still make the draft."""
        cut = max(tree.cutoff(), self.min_score)
        best = sorted(nodes, key=lambda i: (-tree.scores[i], i))[: self.branching]
        return sorted(i for i in best if tree.scores[i] >= cut)

    def _candidates(self, tree: _Tree, parent: int, logits: torch.Tensor):
        """(token, probability) children of `parent` in draw order, and the q row they came from."""
        st = tree.st
        depth = 0 if parent < 0 else tree.depths[parent]
        if st.params.greedy:
            probs = torch.softmax(logits.float(), dim=-1)
            top, ids = torch.topk(probs, self.branching)
            return list(zip(ids.tolist(), top.tolist())), None
        # the chain's q and noise at this position: argmax probs / noise is the chain's token,
        # the order of probs / noise draws the rest without replacement (Gumbel-top-b)
        ids, probs, noise = self._sparse_q(st, logits, len(st.context) + depth)
        order = torch.argsort(probs / noise, descending=True)[: self.branching]
        order = order[probs[order] > 0]
        return [(int(ids[j]), float(probs[j])) for j in order], (ids, probs)

    def _expand(self, tree: _Tree, frontier: list[tuple[int, torch.Tensor]]) -> list[int]:
        """Add the children of the frontier nodes to the pool; returns the new nodes."""
        added = []
        # a seeded sampled request's tree must not depend on other traffic (its tokens depend on
        # the tree), so it scores with the drafter's own probabilities
        p = tree.st.params
        calibrated = not p.seeded_sampling
        for parent, logits in frontier:
            cands, q_row = self._candidates(tree, parent, logits)
            score = 1.0 if parent < 0 else tree.scores[parent]
            cap, miss = score, 1.0
            depth = 1 if parent < 0 else tree.depths[parent] + 1
            for rank, (token, prob) in enumerate(cands):
                # the verifier reaches this candidate when its parent was reached and every
                # earlier sibling rejected; it then takes it with the calibrated rate
                rate = self.calibration[p.greedy].rate(depth, rank, prob) if calibrated else prob / miss
                cap = min(cap, score * miss * rate)  # never above an earlier sibling (see _Tree.best)
                miss *= max(0.0, 1.0 - rate)
                if cap < self.min_score or cap <= 0.0:
                    break
                added.append(tree.add(token, parent, cap, prob, q_row, rate))
        return added

    def _add_lookup(self, tree: _Tree) -> None:
        """Merge the sequence's prompt-lookup continuation into the pool (greedy requests).

        Where the model proposed the same token, the branch follows the model's node; where it
        did not, a lookup node joins as the last child. Its score: its parent's, times the chance
        that the verifier rejected every model child there, times its own calibrated accept rate
        (rank 0 right after a model node, 1 under another lookup node). Lookup nodes are not fed
        to the drafter; a verdict that takes one leaves the drafter to feed it on the next step.
        """
        tokens = self.prompt_lookup.continuation(tree.seq_id, tree.st.context, min(self.lookup, tree.depth_max))
        cur, run = -1, 0
        for token in tokens:
            kids = tree.children(cur)
            same = next((i for i in kids if tree.tokens[i] == token), None)
            if same is not None:
                cur, run = same, 0
                continue
            depth = 1 if cur < 0 else tree.depths[cur] + 1
            miss = 1.0
            for i in kids:
                miss *= max(0.0, 1.0 - tree.rates[i])
            rank = min(run, 1)
            rate = self.lookup_calibration.rate(depth, rank, 0.0)
            score = (1.0 if cur < 0 else tree.scores[cur]) * miss * rate
            if score <= self.min_score or score <= 0.0:
                return
            cur, run = tree.add(token, cur, score, 0.0, None, rate, lookup=rank), run + 1

    def _forward_tree(self, trees: list[_Tree], expand: list[list[int]]) -> list[torch.Tensor]:
        """Feed each tree's nodes to expand (with their ancestors) on top of its cached context.

        Returns, per tree, the drafter's logits at each node of `expand`.  # [len(expand_i), vocab]
        """
        feeds = [t.ancestors(nodes) for t, nodes in zip(trees, expand)]
        n = max(len(f) for f in feeds)
        tokens = torch.zeros(len(trees), n, dtype=torch.long)
        parents = torch.full((len(trees), n), -1, dtype=torch.long)
        depth = torch.zeros(len(trees), n, dtype=torch.long)
        wheres = [{node: j for j, node in enumerate(feed)} for feed in feeds]  # node -> block position
        for b, (t, feed, where) in enumerate(zip(trees, feeds, wheres)):
            tokens[b, : len(feed)] = torch.tensor([t.tokens[i] for i in feed])
            parents[b, : len(feed)] = torch.tensor([where.get(t.parents[i], -1) for i in feed])
            depth[b, : len(feed)] = torch.tensor([t.depths[i] - 1 for i in feed])
            st = t.st
            st.fed = len(st.context)  # drop the previous level's nodes: they are fed again below
            self.runner.truncate(st.slot, st.fed)
        # a node at depth d sits at position len(context) + d - 1 and sees the context (cached)
        # and its ancestors; top-level nodes have parent -1 and see, in the block, only themselves
        mask = tree_mask(parents)
        logits = self.runner.forward([t.st.slot for t in trees], tokens, [len(f) for f in feeds], mask, depth)
        out = []
        for b, (t, feed, where, nodes) in enumerate(zip(trees, feeds, wheres, expand)):
            t.fed = feed
            rows = torch.tensor([where[i] for i in nodes], device=logits.device)
            out.append(logits[b, rows].float().cpu())
        return out

    # -- the verdict -----------------------------------------------------------------------------

    def verdict(self, seq_id: int, accepted: int, next_token: int, path: list[int] | None = None) -> None:
        where = self._fed_nodes.pop(seq_id, None)
        st = self.seqs[seq_id]
        if where is None:  # a chain: ModelDrafter's bookkeeping
            return super().verdict(seq_id, accepted, next_token, path)
        base = len(st.context)
        kept = list(path if path is not None else range(accepted))
        in_cache = []
        for node in kept:  # fed nodes are ancestor-closed, so the cached part of the path is a prefix
            if node not in where:
                break
            in_cache.append(where[node])
        super(ModelDrafter, self).verdict(seq_id, accepted, next_token, path)
        self._calibrate(seq_id, kept)
        if in_cache and in_cache != list(range(len(in_cache))):
            # root = the context's last token at base - 1; the path's cached nodes follow it
            block_path = torch.tensor([[0] + [j + 1 for j in in_cache]])
            self.runner.compact([st.slot], [base - 1], block_path)
        st.fed = base + len(in_cache)
        self.runner.truncate(st.slot, min(st.fed, self.runner.length(st.slot)))

    def _calibrate(self, seq_id: int, path: list[int]) -> None:
        """Count the candidates the verdict tested: along the path, the children of each node
        up to the one taken; after the path, all children of its last node (all rejected)."""
        parents, probs, lookup = self._last_tree.pop(seq_id, ([], [], []))
        calibration = self.calibration[self.seqs[seq_id].params.greedy]
        cur = -1
        for depth, taken in enumerate(path + [None], start=1):
            kids = [i for i, par in enumerate(parents) if par == cur]
            for rank, child in enumerate(i for i in kids if lookup[i] is None):
                calibration.observe(depth, rank, probs[child], child == taken)
                if child == taken:
                    break
            if taken is None or lookup[taken] is not None:  # the model's children were all rejected:
                for child in (i for i in kids if lookup[i] is not None):  # its lookup child was tested
                    self.lookup_calibration.observe(depth, lookup[child], 0.0, child == taken)
            cur = taken
