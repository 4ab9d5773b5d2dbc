"""Data-aware factors: the whitened fits minimise the output error on the calibration inputs, equal the
kernel fits on white inputs, are exact at full rank and fall back cleanly on degenerate inputs."""
import pytest
import torch
import torch.nn.functional as F

from twistc.decomp.svd import lowered, truncated_svd, truncation_errors
from twistc.decomp.tucker import Tucker2, tucker2
from twistc.decomp.whiten import (InputStats, output_error, tucker2_whitened, whitened_svd,
                                  whitened_truncation_errors, whitener)


def _correlated(n_rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.linspace(0.05, 3, n)
    return torch.randn(n_rows, n, generator=g, dtype=torch.float64) @ mix.double()


def _stats(x):
    return InputStats(x.T @ x, x.shape[0])


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_svd_beats_plain_svd_on_the_calibration_inputs_and_its_error_is_predicted(rank):
    k = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    x = _correlated(4000, 20)
    cov = _stats(x).covariance
    plain, aware = truncated_svd(k, rank).reconstruct(), whitened_svd(k, cov, rank).reconstruct()
    measured = lambda a: float(((x.float() @ (k - a).T).norm() / (x.float() @ k.T).norm()))
    assert measured(aware) < measured(plain) * 0.95
    assert measured(aware) == pytest.approx(output_error(k, aware, cov), rel=1e-3)
    assert whitened_truncation_errors(k, cov, [rank])[0] == pytest.approx(output_error(k, aware, cov), rel=1e-4)


def test_on_white_inputs_whitened_svd_is_plain_svd():
    k = torch.randn(10, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = torch.eye(16, dtype=torch.float64) * 3.0
    for rank in (2, 5):
        torch.testing.assert_close(whitened_svd(k, cov, rank).reconstruct(), truncated_svd(k, rank).reconstruct(),
                                   atol=1e-9, rtol=0)
        assert whitened_truncation_errors(k, cov, [rank]) == pytest.approx(truncation_errors(k, [rank]), rel=1e-6)


def test_full_rank_is_exact_even_with_a_dead_input():
    k = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    x = _correlated(500, 6)
    x[:, 2] = 0  # a dead channel: the covariance is singular
    low = whitened_svd(k, _stats(x).covariance, 6)
    torch.testing.assert_close(low.reconstruct(), k, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_degenerate_inputs_give_no_whitening_and_never_a_nan(bad):
    cov = torch.zeros(5, 5, dtype=torch.float64) if bad == "zero" else torch.full((5, 5), float("nan"))
    assert whitener(cov) is None and whitened_svd(torch.randn(3, 5), cov, 2) is None
    assert whitened_truncation_errors(torch.randn(3, 5), cov, [2]) is None
    constant = InputStats(torch.ones(5, 5, dtype=torch.float64) * 4, 1)  # every input the same: rank 1, damped
    low = whitened_svd(torch.randn(3, 5), constant.covariance, 2)
    assert torch.isfinite(low.u).all() and torch.isfinite(low.v).all()


def _conv_inputs(s=6, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, s, 9, 9, generator=g) * torch.linspace(0.1, 2, s)[None, :, None, None]
    x = x + 0.7 * x.roll(1, 1)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, s * 9).double()
    return _stats(patches)


def test_data_aware_tucker_beats_hooi_on_the_output_and_is_exact_at_full_rank():
    w = torch.randn(10, 6, 3, 3, generator=torch.Generator().manual_seed(5))
    stats = _conv_inputs()
    for ranks in ((3, 2), (5, 3)):
        plain = tucker2(w, ranks).reconstruct()
        aware = Tucker2(*tucker2_whitened(w, stats, ranks, tucker2)).reconstruct()
        assert output_error(lowered(w), lowered(aware), stats.covariance) < \
            output_error(lowered(w), lowered(plain), stats.covariance)
    full = Tucker2(*tucker2_whitened(w, stats, (10, 6), tucker2)).reconstruct()
    torch.testing.assert_close(full.float(), w, atol=1e-4, rtol=0)


def test_the_covariance_follows_the_column_order_and_gives_the_channel_covariance():
    stats = _conv_inputs(s=4)
    shape = (5, 4, 3, 3)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    cm, tm = stats.in_order(shape, "channel-major"), stats.in_order(shape, "tap-major")
    # the same layer, the same output error, whichever order the columns are in
    for order, cov in (("channel-major", cm), ("tap-major", tm)):
        k = lowered(w, order)
        approx = whitened_svd(k, cov, 3).reconstruct()
        assert output_error(k, approx, cov) == pytest.approx(
            output_error(lowered(w), whitened_svd(lowered(w), cm, 3).reconstruct(), cm), rel=1e-4)
    channels = stats.channels(shape)
    assert channels.shape == (4, 4) and torch.allclose(channels, channels.T)
    assert torch.allclose(torch.diagonal(channels), torch.diagonal(cm).reshape(4, 9).mean(1))


def test_data_aware_factors_are_conditioned_like_the_kernel_fits():
    """Balanced: orthonormal directions scaled by sqrt(singular values), however anisotropic the inputs, so that
    fine-tuning them is not slowed by the whitening's inverse (large entries along quiet input directions)."""
    k = torch.randn(12, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = _correlated(4000, 20)
    x[:, :5] *= 1e-3  # quiet directions
    low = whitened_svd(k, _stats(x).covariance, 6)
    gram_u, gram_v = low.u.T @ low.u, low.v @ low.v.T
    torch.testing.assert_close(gram_u, torch.diag(torch.diagonal(gram_u)), atol=1e-9, rtol=0)
    torch.testing.assert_close(gram_u, gram_v, atol=1e-9, rtol=0)  # U^T U = V V^T = diag(s)
    assert float(low.v.abs().max()) < 2 * float(k.abs().max())
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    patches = F.unfold(torch.randn(64, 8, 10, 10, generator=torch.Generator().manual_seed(6),
                                   dtype=torch.float64) * torch.logspace(-3, 0, 8).double()[None, :, None, None], 3)
    cols = patches.transpose(1, 2).reshape(-1, 72)
    core, u_out, u_in = tucker2_whitened(w, _stats(cols), (6, 4), tucker2)
    for u in (u_out, u_in):
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-9, rtol=0)
