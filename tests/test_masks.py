"""Tests of iaf_jax.masks: MADE masks (report Algorithm 1 / Figure 3) and PixelCNN masks (report Figure 12).

Connectivity is computed independently of the mask-building code: a path from an input to an output exists iff
the product of the binary masks has a positive entry.
"""

import itertools

import jax
import numpy as np
import pytest

from iaf_jax import masks as masks_lib
from iaf_jax.layers import MaskedConv2D

# ----------------------------------------------------------------------------- helpers


def connectivity(masks):
  """[num_inputs, num_outputs] boolean: True iff some path input -> output survives every mask."""
  paths = np.eye(masks[0].shape[0], dtype=np.int64)
  for m in masks:
    assert set(np.unique(m)).issubset({0.0, 1.0}), "masks must be binary"
    paths = paths @ m.astype(np.int64)
  return paths > 0


def le_rule(prev_degrees, cur_degrees):
  """Figure 3's rule: unit of degree d keeps the inputs of degree <= d. [len(prev), len(cur)] (kernel layout)."""
  prev, cur = np.asarray(prev_degrees), np.asarray(cur_degrees)
  return (prev[:, None] <= cur[None, :]).astype(np.float32)


def ge_rule(prev_degrees, cur_degrees):
  """Algorithm 1's pseudo-code taken literally: keep iff v_{n-1}(i) >= v_n(j)."""
  prev, cur = np.asarray(prev_degrees), np.asarray(cur_degrees)
  return (prev[:, None] >= cur[None, :]).astype(np.float32)


MADE_CASES = [
    (k, hidden, hd, nc, r)
    for k in (1, 2, 3, 5, 8)
    for hidden in ((), (8,), (8, 8), (3, 11, 5), (16, 9, 8))
    for hd in ("sequential", "random")
    for nc in (0, 3)
    for r in (1, 2)
]


# ----------------------------------------------------------------------------- MADE: connectivity


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("k,hidden,hidden_degrees,num_context,r", MADE_CASES)
def test_made_masks_shapes_and_autoregressive_connectivity(k, hidden, hidden_degrees, num_context, r, seed):
  masks = masks_lib.made_masks(k, hidden, num_context=num_context, num_outputs_per_latent=r,
                               hidden_degrees=hidden_degrees, seed=seed)
  # Shapes follow the kernels they multiply: [in, out].
  sizes = [k + num_context, *hidden, k * r]
  assert len(masks) == len(hidden) + 1
  for m, (n_in, n_out) in zip(masks, zip(sizes[:-1], sizes[1:])):
    assert m.shape == (n_in, n_out)
  conn = connectivity(masks)
  z_conn = conn[:k]          # [k, k * r]
  for j in range(k):
    for rr in range(r):
      col = j * r + rr       # latent-major columns
      for i in range(k):
        if z_conn[i, col]:
          assert i < j, f"output {rr} of latent {j} sees z_{i} (must only see z_<{j})"
  # In particular no output ever sees its own latent or a later one, and output 0 sees no latent.
  assert not z_conn[:, :r].any()
  assert not z_conn[k - 1].any()


@pytest.mark.parametrize("k,hidden,hidden_degrees,num_context,r",
                         [c for c in MADE_CASES if c[2] == "sequential" and all(h >= c[0] for h in c[1])])
def test_made_sequential_wide_masks_connect_every_allowed_pair(k, hidden, hidden_degrees, num_context, r):
  """With sequential degrees and hidden widths >= k, output j reaches z_i for EVERY i < j, and the context."""
  masks = masks_lib.made_masks(k, hidden, num_context=num_context, num_outputs_per_latent=r,
                               hidden_degrees=hidden_degrees)
  conn = connectivity(masks)
  expected = np.repeat(np.arange(k)[:, None] < np.arange(k)[None, :], r, axis=1)  # [i, j*r+rr]: i < j
  np.testing.assert_array_equal(conn[:k], expected)
  if num_context:
    assert conn[k:].all(), "context must reach every output"
    assert masks[0][k:].all(), "context must feed every unit of the first layer"


@pytest.mark.parametrize("k,hidden,hidden_degrees,num_context,r",
                         [c for c in MADE_CASES if c[3] > 0])
def test_made_context_feeds_every_first_layer_unit(k, hidden, hidden_degrees, num_context, r):
  masks = masks_lib.made_masks(k, hidden, num_context=num_context, num_outputs_per_latent=r,
                               hidden_degrees=hidden_degrees, seed=3)
  assert masks[0].shape[0] == k + num_context
  assert np.all(masks[0][k:] == 1.0)
  if hidden_degrees == "sequential":
    # sequential degrees start at -1 in every layer, so the context reaches every output (any widths)
    assert connectivity(masks)[k:].all()


@pytest.mark.parametrize("k,hidden_sizes", [(1, (4,)), (2, (5, 3)), (4, (4, 8)), (7, (13,)), (8, (16, 16))])
@pytest.mark.parametrize("hidden_degrees", ["sequential", "random"])
def test_made_degrees_range(k, hidden_sizes, hidden_degrees):
  degrees = masks_lib.made_degrees(k, hidden_sizes, hidden_degrees=hidden_degrees, seed=5)
  np.testing.assert_array_equal(degrees[0], np.arange(k))
  assert [len(d) for d in degrees[1:]] == list(hidden_sizes)
  for d in degrees[1:]:
    # -1: context only; k-1 would feed no output (output j has degree j-1 <= k-2).
    assert d.min() >= -1 and d.max() <= max(k - 2, -1)
  if hidden_degrees == "sequential":
    for d, size in zip(degrees[1:], hidden_sizes):
      counts = np.bincount(d + 1, minlength=k)
      # cycled: every admissible degree appears floor or ceil of size / k times
      assert counts.max() - counts.min() <= 1 and counts.sum() == size


def test_made_degrees_random_depends_on_seed_and_is_reproducible():
  a = masks_lib.made_degrees(6, (40, 40), hidden_degrees="random", seed=1)
  b = masks_lib.made_degrees(6, (40, 40), hidden_degrees="random", seed=1)
  c = masks_lib.made_degrees(6, (40, 40), hidden_degrees="random", seed=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a[1:], c[1:]))


@pytest.mark.parametrize("bad", [dict(num_latent=0, hidden_sizes=(4,)), dict(num_latent=3, hidden_sizes=(4, 0)),
                                 dict(num_latent=3, hidden_sizes=(4,), hidden_degrees="bogus")])
def test_made_degrees_rejects_bad_arguments(bad):
  with pytest.raises(ValueError):
    masks_lib.made_degrees(**bad)


@pytest.mark.parametrize("hidden_degrees", ["sequential", "random"])
@pytest.mark.parametrize("k,hidden,num_context,r", [(4, (6, 5), 2, 2), (5, (9,), 0, 1), (3, (2, 4, 3), 1, 2)])
def test_made_masks_obey_figure3_rule_for_their_degrees(k, hidden, num_context, r, hidden_degrees):
  """Each mask keeps input i of unit j iff degree(i) <= degree(j); outputs have degree j-1, context -1."""
  degrees = masks_lib.made_degrees(k, hidden, hidden_degrees=hidden_degrees, seed=4)
  masks = masks_lib.made_masks(k, hidden, num_context=num_context, num_outputs_per_latent=r,
                               hidden_degrees=hidden_degrees, seed=4)
  layer_degrees = [np.concatenate([np.arange(k), -np.ones(num_context, int)]), *degrees[1:],
                   np.repeat(np.arange(k) - 1, r)]
  for m, prev, cur in zip(masks, layer_degrees[:-1], layer_degrees[1:]):
    np.testing.assert_array_equal(m, le_rule(prev, cur))


# ----------------------------------------------------------------------------- Figure 3 / Algorithm 1

# Figure 3 of the report, verbatim: rows = first-layer hidden units (v_1), columns = inputs (v_0: z then h).
FIG3_V0 = [0, 1, 2, 3, -1, -1, -1]
FIG3_V1_LABELS = [-1, 2, 0, 1, 0]
FIG3_TABLE = np.array([
    [0, 0, 0, 0, 1, 1, 1],
    [1, 1, 1, 0, 1, 1, 1],
    [1, 1, 0, 0, 1, 1, 1],
    [1, 0, 0, 0, 1, 1, 1],
    [1, 0, 0, 0, 1, 1, 1],
], np.float32)


def test_figure3_every_row_is_a_le_rule_row_with_the_printed_degrees():
  """Every printed row is exactly `v0 <= d` for some d, and those d are (as a multiset) the printed v_1.

  The printed labels of rows 3 and 4 (0 and 1) are swapped relative to their contents (row "0" occurs twice
  with different contents, which no rule on degrees can produce): the table is the `<=` rule for
  v_1 = [-1, 2, 1, 0, 0]. The rows with unambiguous labels (-1, 2 and the last 0) match the `<=` rule as printed.
  """
  inferred = []
  for row in FIG3_TABLE:
    matches = [d for d in range(-1, 4) if np.array_equal(le_rule(FIG3_V0, [d])[:, 0], row)]
    assert len(matches) == 1, f"row {row} is not a `<=` row"
    inferred.append(matches[0])
  assert sorted(inferred) == sorted(FIG3_V1_LABELS)
  np.testing.assert_array_equal(le_rule(FIG3_V0, [-1, 2, 1, 0, 0]).T, FIG3_TABLE)
  as_printed = le_rule(FIG3_V0, FIG3_V1_LABELS).T
  for row in (0, 1, 4):
    np.testing.assert_array_equal(as_printed[row], FIG3_TABLE[row])


def test_figure3_is_not_the_literal_ge_rule():
  """Under `>=` a degree -1 unit would see everything and a degree >= 0 unit none of h: no row of Figure 3."""
  for d in range(-1, 4):
    ge_row = ge_rule(FIG3_V0, [d])[:, 0]
    for row in FIG3_TABLE:
      assert not np.array_equal(ge_row, row)


@pytest.mark.parametrize("k,hidden", [(3, (5,)), (4, (8, 8)), (5, (5, 7, 6))])
def test_literal_ge_rule_breaks_the_autoregressive_property(k, hidden):
  """Algorithm 1 read literally (keep iff v_{n-1}(i) >= v_n(j), v_{N+1} = [-1..k-2]) lets outputs see z_>=j."""
  degrees = masks_lib.made_degrees(k, hidden)
  v_out = np.arange(k) - 1
  layer_degrees = [*degrees, v_out]
  ge_masks = [ge_rule(p, c) for p, c in zip(layer_degrees[:-1], layer_degrees[1:])]
  conn = connectivity(ge_masks)
  violations = [(i, j) for i in range(k) for j in range(k) if conn[i, j] and i >= j]
  assert violations, "the literal >= rule was expected to violate the autoregressive property"
  # e.g. the last latent reaches output 0 directly through the highest-degree units
  assert conn[k - 1, 0]
  # whereas the `<=` rule (made_masks) never does
  ok = connectivity(masks_lib.made_masks(k, hidden))
  assert not any(ok[i, j] for i in range(k) for j in range(k) if i >= j)


# ----------------------------------------------------------------------------- PixelCNN masks


def test_channel_groups():
  np.testing.assert_array_equal(masks_lib.channel_groups(6, 3), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(masks_lib.channel_groups(3, 3), [0, 1, 2])
  np.testing.assert_array_equal(masks_lib.channel_groups(4, 1), [0, 0, 0, 0])
  with pytest.raises(ValueError):
    masks_lib.channel_groups(5, 2)


@pytest.mark.parametrize("kernel_size", [2, 4, (3, 2), (2, 3), (4, 5)])
def test_pixelcnn_mask_even_kernel_raises(kernel_size):
  with pytest.raises(ValueError):
    masks_lib.pixelcnn_mask(kernel_size, 2, 2, "A", num_groups=2)


def test_pixelcnn_mask_bad_type_or_groups_raises():
  with pytest.raises(ValueError):
    masks_lib.pixelcnn_mask(3, 2, 2, "C", num_groups=2)
  with pytest.raises(ValueError):
    masks_lib.pixelcnn_mask(3, 3, 4, "A", num_groups=2)


PIX_H, PIX_W = 5, 6


def _raster_before(p, q):
  """q strictly before p in raster order."""
  return (q[0], q[1]) < (p[0], p[1])


def _conv_jacobian(mask, kernel_size, in_ch, num_context, out_ch, seed):
  """d y[h, w, o] / d x[h', w', i] of a real MaskedConv2D (weight norm) with random parameters.

  Every parameter is random (drawn with numpy, shapes from eval_shape), masked kernel entries included, so
  only the mask can zero a connection.
  """
  layer = MaskedConv2D(out_ch, kernel_size, mask=mask, weight_norm=True)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(PIX_H, PIX_W, in_ch + num_context)).astype(np.float32)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x[None])
  params = jax.tree_util.tree_map(lambda s: (rng.normal(size=s.shape) + 1.0).astype(np.float32), shapes)
  f = lambda xi: layer.apply(params, xi[None])[0]
  return np.asarray(jax.jit(jax.jacfwd(f))(x))  # [H, W, out, H, W, in + ctx]


PIX_CASES = [(ks, t, cin, cout, g)
             for ks in (1, 3, 5)
             for t in ("A", "B")
             for (cin, cout, g) in ((2, 4, 2), (3, 3, 3), (4, 2, 1))]


@pytest.mark.parametrize("kernel_size,mask_type,in_ch,out_ch,groups", PIX_CASES)
def test_pixelcnn_mask_on_real_conv_by_gradients(kernel_size, mask_type, in_ch, out_ch, groups):
  num_context = 2 if in_ch % 2 == 0 else 0
  mask = masks_lib.pixelcnn_mask(kernel_size, in_ch, out_ch, mask_type, num_groups=groups, num_context=num_context)
  assert mask.shape == (kernel_size, kernel_size, in_ch + num_context, out_ch)
  assert set(np.unique(mask)).issubset({0.0, 1.0})
  jac = _conv_jacobian(mask, kernel_size, in_ch, num_context, out_ch, seed=kernel_size * 10 + in_ch)
  nz = np.abs(jac) > 0
  gin = np.arange(in_ch) // (in_ch // groups)
  gout = np.arange(out_ch) // (out_ch // groups)
  half = kernel_size // 2
  for p in itertools.product(range(PIX_H), range(PIX_W)):
    for q in itertools.product(range(PIX_H), range(PIX_W)):
      block = nz[p[0], p[1], :, q[0], q[1], :in_ch]  # [out, in] (z channels only)
      ctx_block = nz[p[0], p[1], :, q[0], q[1], in_ch:]
      in_field = abs(p[0] - q[0]) <= half and abs(p[1] - q[1]) <= half
      if not in_field:
        assert not block.any() and not ctx_block.any()
        continue
      # the context is unmasked: every tap of the receptive field, also later pixels
      if num_context:
        assert ctx_block.all(), (p, q)
      if q == p:
        allowed = gin[None, :] < gout[:, None] if mask_type == "A" else gin[None, :] <= gout[:, None]
        np.testing.assert_array_equal(block, allowed, err_msg=f"centre tap at {p}")
      elif _raster_before(p, q):
        assert block.any(), f"pixel {q} before {p} inside the kernel must influence it"
      else:
        assert not block.any(), f"pixel {q} after {p} influences it"


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_pixelcnn_mask_rectangular_kernel(mask_type):
  m = masks_lib.pixelcnn_mask((3, 5), 2, 2, mask_type, num_groups=2)
  assert m.shape == (3, 5, 2, 2)
  assert m[0].all()                      # row above the centre: all kept
  assert m[1, :2].all()                  # left of the centre: kept
  assert not m[1, 3:].any() and not m[2].any()  # right of the centre and rows below: cut
  centre = m[1, 2]
  expected = np.array([[0, 1], [0, 0]]) if mask_type == "A" else np.array([[1, 1], [0, 1]])
  np.testing.assert_array_equal(centre, expected)
