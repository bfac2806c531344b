"""The post-projection path of the per-head reads (``fxcircuits.heads.Post``): rounds folded into the batch axis,
checked against running them one after another.  Whole patched runs with and without folding are compared on
six architectures by ``test_patching.test_every_read_path_gives_the_same_numbers`` ("rounds apart")."""
import pytest
import torch
from torch import nn

from fxcircuits.components import between
from fxcircuits.heads import Post, gather_heads, record_values, repeated_heads
from zoo import CONFIGS, NO_ATTENTION

BATCH, SEQ = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)


def _posts(cm) -> list[Post]:
    return [n.target for n in cm.patcher.graph.nodes if isinstance(n.target, Post)]


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - NO_ATTENTION))
def test_every_architecture_folds_its_rounds_into_the_batch(traced, name):
    """Folding is a speed property that a wrong shape analysis would lose silently (the rounds would run apart,
    with the same numbers): every architecture's q, k and v paths must fold."""
    _, cm = traced(name)
    posts = _posts(cm)
    assert posts and all(post.uses is not None for post in posts)


class _PerPromptRotary(nn.Module):
    """A projection output [batch, seq, 8] split into 2 heads and multiplied by a table with a row per prompt, as
    rotary tables built from per-prompt positions are; ``source`` is the projection, ``target`` the product."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        table = positions[..., None].float().expand(-1, -1, 4).cos()                 # [batch, seq, 4]
        heads = self.proj(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)    # [batch, 2, seq, 4]
        return heads * table[:, None]


def _post_of(module: nn.Module, *inputs: torch.Tensor) -> tuple[Post, list]:
    """The path from the module's projection to its output as a ``Post``, and the values of what it reads."""
    gm = torch.export.export(module, inputs, dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}),
                             strict=False).module()
    source = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    target = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    values = record_values(gm, *inputs)
    post = Post(sorted(between(source, [target])), source, target, values)
    return post, [values[e] for e in post.externals]


def test_tables_with_a_row_per_prompt_are_repeated_per_round():
    generator = torch.Generator().manual_seed(0)
    x, positions = torch.randn(3, 5, 8, generator=generator), torch.randint(0, 9, (3, 5), generator=generator)
    post, externals = _post_of(_PerPromptRotary(), x, positions)
    assert "rows" in post.uses and "size" in post.uses
    rounds = torch.randn(4, 3, 5, 8, generator=generator)
    expected = torch.stack([post.module(r, *externals) for r in rounds])
    torch.testing.assert_close(post(rounds, *externals), expected, rtol=0, atol=0)


def test_a_path_that_mixes_the_batch_runs_its_rounds_apart():
    """A path whose values mix prompts (here a mean over the batch) cannot take the rounds as more prompts: that is
    found at trace time, and the rounds run one after another."""

    class Mixing(_PerPromptRotary):
        def forward(self, x, positions):
            heads = self.proj(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
            return heads - heads.mean(0, keepdim=True)

    generator = torch.Generator().manual_seed(0)
    post, externals = _post_of(Mixing(), torch.randn(3, 5, 8, generator=generator), torch.zeros(3, 5, dtype=torch.long))
    assert post.uses is None
    rounds = torch.randn(2, 3, 5, 8, generator=generator)
    torch.testing.assert_close(post(rounds, *externals), torch.stack([post.module(r, *externals) for r in rounds]))


def test_sizes_that_count_the_batch_are_scaled_and_shared_tables_left_alone(traced):
    """On a traced llama each path reshapes by the batch size (scaled by the rounds) and reads rotary tables with
    one row for all prompts (left as they are), as the captured shapes say."""
    _, cm = traced("llama")
    for post in _posts(cm)[:3]:
        assert post.uses.count("size") == 1 and set(post.uses) == {"size", None}


class _CopiedHeads(nn.Module):
    """A projection split into 2 heads [batch, 2, seq, 4], then each head copied 3 times: in a row for each query
    head of its group (``repeat_kv``), or the group taken in turn (``tiled``)."""

    def __init__(self, tiled: bool):
        super().__init__()
        self.proj, self.tiled = nn.Linear(8, 8), tiled

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[:2]
        heads = self.proj(x).view(b, s, 2, 4).transpose(1, 2)
        copies = heads[:, None].expand(b, 3, 2, s, 4) if self.tiled else heads[:, :, None].expand(b, 2, 3, s, 4)
        return copies.reshape(b, 6, s, 4)


@pytest.mark.parametrize("tiled", [False, True])
def test_heads_copied_for_their_group_are_read_from_before_the_copies(tiled):
    """Grouped-query keys and values are copied for each query head of their group (``repeat_kv``); patching gives
    each query head its own, so the per-head reads stop before the copies (``repeated_heads``) and gather each
    head's own.  Only copies in a row are taken so: heads taken in turn are read as they are."""
    inputs = torch.randn(2, 5, 8), torch.arange(5).expand(2, -1)
    gm = torch.export.export(_CopiedHeads(tiled), inputs, dynamic_shapes=({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}),
                             strict=False).module()
    target = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    found = repeated_heads(target, record_values(gm, *inputs))
    assert (found is target) == tiled
    assert found.meta["val"].shape[1] == (6 if tiled else 2)

@pytest.mark.parametrize("picks", [
    ((0, 0), (0, 0), (0, 1), (0, 1), (0, 2), (0, 2)),   # one round of grouped-query heads (repeat_kv's layout)
    ((0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)),   # a round per head of a group, before repeat_kv's copies
    ((0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2)),   # core heads taken in turn: no shortcut applies
    ((1, 2), (0, 0), (1, 1), (0, 2), (1, 0), (0, 1)),   # any other order
])
def test_gathering_the_heads_takes_each_query_heads_own(picks):
    """Query head h's core input is head ``picks[h][1]`` of round ``picks[h][0]``, whichever shortcut serves it."""
    core = torch.randn(2, 3, 3, 5, 4)  # [rounds, batch, core heads, seq, head size]
    expected = torch.stack([core[r, :, c] for r, c in picks], dim=1)
    assert torch.equal(gather_heads(core, picks, False), expected)
    shared = tuple((0, c) for _, c in picks)  # where all heads read one stream, round 0 serves them all
    assert torch.equal(gather_heads(core[:1], picks, True), torch.stack([core[0, :, c] for _, c in shared], dim=1))


@pytest.mark.parametrize("layout", [(3, 2, 0, 4, 4), (3, 1, 2, 5, 3), (1, 4, 1, 4, 6)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_the_grid_view_reads_each_groups_block_in_place(layout, dim):
    """``_grid_view`` [groups, *other axes, width] is block g = columns start + g·step … + width of ``dim``, a view of
    the same memory, also of a transposed tensor (a weight in aten.linear's layout)."""
    from fxcircuits.heads import _grid_view
    groups, _, start, step, width = layout
    for t in (torch.randn(5, 16, 2), torch.randn(16, 5, 2).transpose(0, 1)):
        t = t.movedim(1, dim)
        view = _grid_view(t, dim, layout)
        expected = torch.stack([t.narrow(dim, start + g * step, width).movedim(dim, -1) for g in range(groups)])
        assert torch.equal(view, expected) and view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def test_grouped_query_keys_and_values_are_read_before_their_copies(traced):
    """Llama (4 query heads, 2 key-value heads) copies its keys and values per query head; each layer's k and v
    paths end before the copies, at the 2 heads."""
    _, cm = traced("llama")
    heads = [next(iter(p.module.graph.find_nodes(op="output"))).args[0].meta["val"].shape[1] for p in _posts(cm)]
    assert sorted(heads) == [2, 2, 2, 2, 4, 4]
