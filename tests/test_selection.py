"""Select-and-refit's closed forms (folding.selection) on synthetic activations where the answer is known."""

from __future__ import annotations

import torch

from tensorscale.folding.selection import (least_squares_reader, lost_share, obs_select, obs_select_columns,
                                           obs_select_grouped, residual_selection)


def _activations(n_free: int, n_copies: int, tokens: int = 4000, seed: int = 0):
    """Activations where the last `n_copies` units are linear combinations of the first `n_free`."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randn(tokens, n_free, generator=g, dtype=torch.float64)
    mix = torch.randn(n_free, n_copies, generator=g, dtype=torch.float64)
    return torch.cat([free, free @ mix], dim=1)


def test_least_squares_refit_is_exact_when_dropped_units_are_combinations_of_kept_ones():
    x = _activations(6, 3)
    w = torch.randn(5, 9, dtype=torch.float64)
    gram = x.T @ x
    keep = list(range(6))
    m = least_squares_reader(gram, 1, keep, damp=1e-9).double()
    assert torch.allclose(x @ w.T, x[:, keep] @ (w @ m).T, atol=1e-5 * float((x @ w.T).abs().max()))
    assert lost_share(gram, w, m, keep, 1) < 1e-9


def test_obs_drops_the_redundant_units():
    """Units that other units can stand in for cost nothing to drop; independent ones do."""
    x = _activations(6, 3)
    w = torch.randn(5, 9, dtype=torch.float64)
    gram = x.T @ x
    kept = obs_select_columns(gram, w, 6, damp=1e-9, step=1)
    m = least_squares_reader(gram, 1, kept, damp=1e-9)
    assert lost_share(gram, w, m, kept, 1) < 1e-6  # a lossless choice exists and OBS finds one


def test_grouped_selection_keeps_equal_groups():
    x = _activations(12, 0)
    w = torch.randn(4, 12, dtype=torch.float64)
    gram = x.T @ x
    kept = obs_select_grouped(gram, w, 2, 4, group_of=[0, 0, 0, 1, 1, 1], per_group=2)
    assert len(kept) == 4 and sum(u < 3 for u in kept) == 2
    groups = obs_select(gram, w, 2, 3, groups=3)
    assert groups in ([0, 1, 2], [3, 4, 5])


def test_residual_selection_keeps_massive_dimensions():
    score = torch.ones(16)
    score[3] = 0.0  # its readers barely use it, but it carries most of the energy (a massive activation)
    share = torch.full((16,), 0.2 / 15)
    share[3] = 0.8
    keep, scale, forced = residual_selection(score, share, 12)
    assert 3 in keep and forced == [3] and len(keep) == 12
    assert abs(scale - (16 / 12 * float(share[keep].sum())) ** 0.5) < 1e-6
