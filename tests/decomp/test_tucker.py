import pytest
import torch

from twistc.decomp.tucker import hooi, hosvd, mode_energies, tucker2

torch.set_default_dtype(torch.float32)


def _low_rank(t, s, k, ranks):
    core = torch.randn(ranks[0], ranks[1], *k)
    u_out = torch.linalg.qr(torch.randn(t, ranks[0]))[0]
    u_in = torch.linalg.qr(torch.randn(s, ranks[1]))[0]
    return torch.einsum("abhw,ta,sb->tshw", core, u_out, u_in)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (8, 24, 1, 5), (5, 3, 3, 3)])
def test_full_rank_reconstructs_exactly(shape):
    w = torch.randn(shape)
    f = tucker2(w, (shape[0], shape[1]))
    torch.testing.assert_close(f.reconstruct(), w, atol=1e-5, rtol=0)


def test_factors_orthonormal_and_shapes():
    w = torch.randn(12, 10, 3, 3)
    f = tucker2(w, (5, 4))
    assert f.core.shape == (5, 4, 3, 3) and f.u_out.shape == (12, 5) and f.u_in.shape == (10, 4)
    torch.testing.assert_close(f.u_out.T @ f.u_out, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.u_in.T @ f.u_in, torch.eye(4), atol=1e-5, rtol=0)


def test_exactly_low_rank_tensor_is_recovered_and_projection_is_idempotent():
    w = _low_rank(20, 12, (3, 3), (6, 4))
    once = tucker2(w, (6, 4)).reconstruct()
    torch.testing.assert_close(once, w, atol=1e-5, rtol=0)
    torch.testing.assert_close(tucker2(once, (6, 4)).reconstruct(), once, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_hooi_error_never_above_hosvd(seed):
    torch.manual_seed(seed)
    w = torch.randn(24, 16, 3, 3) + _low_rank(24, 16, (3, 3), (4, 4)) * 3
    err = lambda f: float((f.reconstruct() - w).norm())
    e_hosvd, e_hooi = err(hosvd(w, (6, 5))), err(hooi(w, (6, 5)))
    assert e_hooi <= e_hosvd + 1e-5
    # the truncation is a real approximation, not the identity
    assert e_hooi > 1e-3 * float(w.norm())


def test_hosvd_factor_spans_leading_singular_vectors():
    w = torch.randn(10, 6, 3, 3)
    u = hosvd(w, (3, 2)).u_out
    svd_u = torch.linalg.svd(w.reshape(10, -1), full_matrices=False)[0][:, :3]
    torch.testing.assert_close(u @ u.T, svd_u @ svd_u.T, atol=1e-5, rtol=0)


def test_mode_energies_are_squared_singular_values():
    w = torch.randn(7, 5, 3, 3)
    s = torch.linalg.svdvals(w.reshape(7, -1).double()) ** 2
    torch.testing.assert_close(mode_energies(w, 0), s, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hooi_runs_in_float32_or_float64_and_returns_the_weights_dtype(dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 48, 3, 3)
    f = hooi(w.to(dtype), (20, 16))
    assert {f.core.dtype, f.u_out.dtype, f.u_in.dtype} == {dtype}
    # a float32 (or narrower) kernel is decomposed in float32: the same error as in float64 to ~1e-6
    err = lambda f: float((f.reconstruct().double() - w.to(dtype).double()).norm() / w.to(dtype).double().norm())
    reference = err(hooi(w.to(dtype).double(), (20, 16)))
    assert err(f) == pytest.approx(reference, rel=1e-2 if dtype == torch.bfloat16 else 1e-5)
    if dtype == torch.float64:  # float64 stays float64: orthonormal to its own precision
        torch.testing.assert_close(f.u_in.T @ f.u_in, torch.eye(16, dtype=dtype), atol=1e-12, rtol=0)
