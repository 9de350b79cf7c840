"""Tests of mlproject.metrics: hand-computed values, degenerate input, and agreement with
empyrical-reloaded on random series where the two definitions coincide.

How empyrical-reloaded 0.7.1 takes its input: an ndarray or a pd.Series of simple returns (a
plain list fails: it reads ``returns.shape``). It skips NaNs (bottleneck ``nanmean``/``nanstd``),
we assume finite input. Its drawdown and annual return anchor the equity at a starting value
before the first return, so ours are compared on ``equity = [1, cumprod(1 + r)]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlproject import metrics as m

NAN, INF = float("nan"), float("inf")
MINUTE_PPY = 390.0 * 252.0  # 98280: RTH minute bars


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


@pytest.fixture(scope="module")
def ep():
    import empyrical  # a pinned dev dependency: missing it is a failure, not a skip

    return empyrical


def _returns(kind: str) -> np.ndarray:
    """Seeded per-bar return series of a few shapes."""
    if kind == "normal":
        return np.random.default_rng(1).normal(0.0, 0.01, 2000)
    if kind == "fat_tailed":  # Student t with 3 degrees of freedom: finite variance, heavy tails
        return np.random.default_rng(2).standard_t(3, 2000) * 0.005
    if kind == "drift":
        return np.random.default_rng(3).normal(0.001, 0.01, 2000)
    if kind == "minute":  # minute-bar scale: tiny drift, small moves, more points
        return np.random.default_rng(4).normal(2e-6, 5e-4, 5000)
    raise ValueError(kind)


def _equity(returns: np.ndarray) -> np.ndarray:
    return np.concatenate(([1.0], np.cumprod(1.0 + returns)))


# -- against empyrical -------------------------------------------------------------------------

KINDS = ("normal", "fat_tailed", "drift", "minute")


@pytest.mark.parametrize("ppy", [252.0, MINUTE_PPY])
@pytest.mark.parametrize("kind", KINDS)
def test_return_metrics_match_empyrical(ep, kind: str, ppy: float) -> None:
    r = _returns(kind)
    equity = _equity(r)
    pairs = {
        "sharpe": (m.sharpe_ratio(r, ppy), ep.sharpe_ratio(r, annualization=ppy)),
        "sortino": (m.sortino_ratio(r, ppy), ep.sortino_ratio(r, annualization=ppy)),
        "volatility": (m.annualized_volatility(r, ppy), ep.annual_volatility(r, annualization=ppy)),
        "downside_risk": (m.downside_risk(r, ppy), ep.downside_risk(r, annualization=ppy)),
        "annual_return": (m.annualized_return(equity, ppy), ep.annual_return(r, annualization=ppy)),
        # empyrical reports drawdown as a negative number, we as a positive fraction.
        "max_drawdown": (m.max_drawdown(equity), -ep.max_drawdown(r)),
        "calmar": (m.calmar_ratio(equity, ppy), ep.calmar_ratio(r, annualization=ppy)),
    }
    for name, (ours, theirs) in pairs.items():
        assert ours == pytest.approx(theirs, rel=1e-9, abs=0), name


@pytest.mark.parametrize("required", [-0.002, 0.0005])
def test_sortino_and_downside_risk_with_required_return_match_empyrical(ep, required: float) -> None:
    # ``required_return`` is per period in both (empyrical subtracts it from every return as is).
    r = _returns("fat_tailed")
    assert m.downside_risk(r, 252.0, required) == pytest.approx(
        ep.downside_risk(r, required_return=required, annualization=252.0), rel=1e-9, abs=0)
    assert m.sortino_ratio(r, 252.0, required) == pytest.approx(
        ep.sortino_ratio(r, required_return=required, annualization=252.0), rel=1e-9, abs=0)


def test_ours_and_empyrical_agree_on_equity_returns_input(ep) -> None:
    # What the platform does: returns derived from the equity curve, not the other way round.
    equity = 50_000.0 * _equity(_returns("drift"))
    r = m.equity_returns(equity)
    assert m.sharpe_ratio(r, 252.0) == pytest.approx(ep.sharpe_ratio(r, annualization=252.0), rel=1e-9)
    assert m.max_drawdown(equity) == pytest.approx(-ep.max_drawdown(r), rel=1e-9)


def test_where_empyrical_differs_on_degenerate_input(ep) -> None:
    """Zero denominators: empyrical divides and returns inf, we return nan (the ratio is
    undefined; an inf would win every "best model" comparison). Wipeouts: empyrical raises a
    negative terminal wealth to the power 1 / years, which is nan, or even a large positive
    number when that power happens to be an even integer; we report -1 (everything lost)."""
    flat = np.full(5, 0.01)
    assert ep.sharpe_ratio(flat, annualization=252) == INF
    assert _is_nan(m.sharpe_ratio(flat, 252.0))
    all_up = np.array([0.01, 0.02, 0.005])
    assert ep.sortino_ratio(all_up, annualization=252) == INF
    assert _is_nan(m.sortino_ratio(all_up, 252.0))
    wiped = np.array([0.5, -2.0])  # equity 1 -> 1.5 -> -1.5
    assert ep.annual_return(wiped, annualization=252) > 1e20  # (-1.5) ** 126
    assert m.annualized_return(_equity(wiped), 252.0) == -1.0


# -- return metrics by hand --------------------------------------------------------------------


def test_downside_risk_and_sortino_by_hand() -> None:
    r = [-0.01, 0.02, -0.03, 0.0]
    # below 0: [-0.01, 0, -0.03, 0] -> squares 1e-4 + 9e-4 = 1e-3 over 4 periods = 2.5e-4
    assert m.downside_risk(r, 1.0) == pytest.approx(0.015811388300841896, rel=1e-12)
    assert m.downside_risk(r, 4.0) == pytest.approx(2 * 0.015811388300841896, rel=1e-12)
    # mean -0.005 per period: -0.005 * 252 / (0.015811388300841896 * sqrt(252))
    assert m.sortino_ratio(r, 252.0) == pytest.approx(-0.005 * 252 / (0.015811388300841896 * 15.874507866387544))
    # A constant losing series is fine for Sortino: -0.01 * 252 / (0.01 * sqrt(252)) = -sqrt(252)
    assert m.sortino_ratio([-0.01] * 4, 252.0) == pytest.approx(-15.874507866387544, rel=1e-12)


def test_volatility_and_sharpe_by_hand() -> None:
    r = [0.01, -0.01, 0.02, 0.0]  # mean 0.005
    # deviations 0.005, -0.015, 0.015, -0.005: squares sum 5e-4, / 3 -> std 0.012909944487358056
    assert m.annualized_volatility(r, 252.0) == pytest.approx(0.012909944487358056 * 15.874507866387544)
    assert m.sharpe_ratio(r, 252.0) == pytest.approx(0.005 / 0.012909944487358056 * 15.874507866387544)


def test_return_metrics_degenerate() -> None:
    for few in ([], [0.01]):  # fewer than 2 returns
        assert _is_nan(m.sharpe_ratio(few, 252.0))
        assert _is_nan(m.annualized_volatility(few, 252.0))
        assert _is_nan(m.sortino_ratio(few, 252.0))
    assert _is_nan(m.downside_risk([], 252.0))
    assert m.downside_risk([0.01], 252.0) == 0.0  # one winning period: no downside, a true 0
    # Zero variance. 0.1 repeated has a float residue in np.std (~1e-17); still exactly 0 here.
    for flat in (np.zeros(10), np.full(1000, 0.1), np.full(10, 0.001)):
        assert _is_nan(m.sharpe_ratio(flat, 252.0))
        assert m.annualized_volatility(flat, 252.0) == 0.0
        assert _is_nan(m.sortino_ratio(flat, 252.0))  # no period below 0
    # Single equity point / empty equity.
    for equity in ([100.0], []):
        assert m.total_return(equity) == 0.0
        assert m.max_drawdown(equity) == 0.0
        assert m.max_drawdown_duration(equity) == 0
    assert m.annualized_return([100.0], 252.0) == 0.0
    assert _is_nan(m.calmar_ratio([100.0], 252.0))
    assert _is_nan(m.calmar_ratio([1.0, 2.0, 3.0], 252.0))  # never falls: no drawdown


def test_max_drawdown_duration_by_hand() -> None:
    assert m.max_drawdown_duration([1.0, 2.0, 1.5, 1.8, 2.0, 1.0]) == 2  # 1.5, 1.8; then 1
    assert m.max_drawdown_duration([5, 4, 5, 4, 4, 4, 6]) == 3
    assert m.max_drawdown_duration([3.0, 2.0, 1.0]) == 2  # never recovers: runs to the end
    assert m.max_drawdown_duration([1.0, 2.0, 3.0]) == 0
    assert m.max_drawdown_duration([1.0, 1.0, 1.0]) == 0  # at the peak is not below it
    assert m.max_drawdown([5, 4, 5, 4, 4, 4, 6]) == pytest.approx(0.2)


# -- trade statistics by hand ------------------------------------------------------------------


def test_trade_statistics_by_hand() -> None:
    pnls = [100.0, -50.0, 30.0, -20.0, 0.0]  # a breakeven trade counts as a trade, not a win
    assert m.win_rate(pnls) == pytest.approx(2 / 5)
    assert m.profit_factor(pnls) == pytest.approx(130 / 70)
    assert m.average_win(pnls) == pytest.approx(65.0)  # (100 + 30) / 2
    assert m.average_loss(pnls) == pytest.approx(-35.0)  # (-50 - 20) / 2
    assert m.payoff_ratio(pnls) == pytest.approx(65 / 35)
    assert m.expectancy(pnls) == pytest.approx(12.0)  # 60 / 5
    assert m.average_bars_held([3, 1, 10, 2, 4]) == pytest.approx(4.0)


def test_trade_statistics_all_wins() -> None:
    pnls = [10.0, 20.0]
    assert m.win_rate(pnls) == 1.0
    assert m.profit_factor(pnls) == INF
    assert m.average_win(pnls) == 15.0
    assert _is_nan(m.average_loss(pnls))
    assert m.payoff_ratio(pnls) == INF
    assert m.expectancy(pnls) == 15.0


def test_trade_statistics_all_losses() -> None:
    pnls = [-10.0, -30.0]
    assert m.win_rate(pnls) == 0.0
    assert m.profit_factor(pnls) == 0.0
    assert _is_nan(m.average_win(pnls))
    assert m.average_loss(pnls) == -20.0
    assert _is_nan(m.payoff_ratio(pnls))  # no wins: the average win is undefined
    assert m.expectancy(pnls) == -20.0


@pytest.mark.parametrize("pnls", [[], np.zeros(0)])
def test_trade_statistics_no_trades(pnls) -> None:
    for fn in (m.win_rate, m.profit_factor, m.average_win, m.average_loss, m.payoff_ratio,
               m.expectancy, m.average_bars_held):
        assert _is_nan(fn(pnls)), fn.__name__


def test_trade_statistics_only_breakeven() -> None:
    assert m.win_rate([0.0, 0.0]) == 0.0
    assert _is_nan(m.profit_factor([0.0, 0.0]))
    assert _is_nan(m.payoff_ratio([0.0, 0.0]))
    assert m.expectancy([0.0, 0.0]) == 0.0


def test_exposure_and_turnover_by_hand() -> None:
    assert m.exposure([0, 1, -2, 0]) == 0.5
    assert m.turnover([0, 1, -2, 0]) == pytest.approx(1.5)  # (0 + 1 + 3 + 2) / 4
    assert m.turnover([2, 2, -1]) == pytest.approx(5 / 3)  # first bar: 2 from flat; then 0, 3
    assert m.exposure([0, 0, 0]) == 0.0 and m.turnover([0, 0, 0]) == 0.0
    assert m.exposure([]) == 0.0 and m.turnover([]) == 0.0
    assert m.exposure([-3]) == 1.0 and m.turnover([-3]) == 3.0


# -- probabilistic Sharpe ratio ----------------------------------------------------------------


def test_psr_by_hand() -> None:
    # r = [-0.01, 0, 0, 0.03]: mean 0.005, deviations -0.015, -0.005, -0.005, 0.025
    #   sum of squares 9e-4 -> sample std sqrt(9e-4 / 3) = 0.017320508, SR = 0.005 / that = 1/sqrt(12)
    #   population m2 = 2.25e-4, m3 = 12e-6 / 4 = 3e-6, m4 = 44.25e-8 / 4 = 11.0625e-8
    #   g3 = 3e-6 / 3.375e-6 = 8/9, g4 = 11.0625e-8 / 5.0625e-8 = 59/27
    #   1 - g3*SR + (g4 - 1)/4 * SR^2 = 1 - 0.2566001196 + 0.0246913580 = 0.7680912384
    #   z = SR * sqrt(3) / sqrt(0.7680912384) = 0.5 / 0.8764081460 = 0.5705104434
    #   Phi(0.5705104434) = 0.7158342295
    assert m.probabilistic_sharpe_ratio([-0.01, 0.0, 0.0, 0.03]) == pytest.approx(0.7158342295, abs=1e-10)
    # Against a benchmark of SR* = 0.1 per period: z = (1/sqrt(12) - 0.1) * sqrt(3) / 0.8764081915
    #   = 0.3267949192 / 0.8764081460 = 0.3728798 -> Phi = 0.6453811
    assert m.probabilistic_sharpe_ratio([-0.01, 0.0, 0.0, 0.03], 0.1) == pytest.approx(0.6453811, abs=1e-7)


def test_psr_at_its_own_sharpe_is_one_half() -> None:
    r = _returns("fat_tailed")
    assert m.probabilistic_sharpe_ratio(r, m.sharpe_ratio(r, 1.0)) == pytest.approx(0.5, abs=1e-12)


def test_psr_grows_with_the_track_record() -> None:
    # Tiling keeps the skewness and kurtosis and (nearly) the Sharpe; only n grows.
    r = np.array([-0.01, 0.0, 0.0, 0.03])
    psr = [m.probabilistic_sharpe_ratio(np.tile(r, k)) for k in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(psr, psr[1:])), psr
    below = [m.probabilistic_sharpe_ratio(np.tile(r, k), 0.5) for k in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(below, below[1:])), below  # SR < SR*: confidence it is below grows


def test_psr_matches_scipy_moments() -> None:
    from scipy import stats

    r = _returns("drift")
    sr = r.mean() / r.std(ddof=1)
    g3, g4 = stats.skew(r), stats.kurtosis(r, fisher=False)  # population (bias=True) moments
    z = sr * math.sqrt(r.size - 1) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr**2)
    assert m.probabilistic_sharpe_ratio(r) == pytest.approx(stats.norm.cdf(z), rel=1e-9)


def test_psr_undefined() -> None:
    assert _is_nan(m.probabilistic_sharpe_ratio([]))
    assert _is_nan(m.probabilistic_sharpe_ratio([0.01, 0.02]))  # fewer than 3 returns
    assert _is_nan(m.probabilistic_sharpe_ratio(np.full(10, 0.001)))  # zero variance


def test_deflated_sharpe_reproduces_the_papers_example() -> None:
    """Bailey & Lopez de Prado (2014), section 6: 100 trials whose annualised Sharpe ratios vary by
    V = 1/2, daily returns (250 a year): SR0 = 0.1132 per day (1.79 a year). A track record of
    1,250 days at an annualised SR of 2.5, skewness -3 and kurtosis 10 then has DSR 0.9004."""
    sr0 = m.expected_max_sharpe(100, math.sqrt(0.5 / 250))
    assert sr0 == pytest.approx(0.1132, abs=1e-4)
    sr, n, g3, g4 = 2.5 / math.sqrt(250), 1250, -3.0, 10.0
    z = (sr - sr0) * math.sqrt(n - 1) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr**2)
    assert 0.5 * (1 + math.erf(z / math.sqrt(2))) == pytest.approx(0.9004, abs=1e-3)
    assert m.expected_max_sharpe(1, 1.0) == 0.0 and m.expected_max_sharpe(10, 0.0) == 0.0


def test_deflated_sharpe_is_the_psr_for_one_trial_and_falls_with_more() -> None:
    r = _returns("drift")
    assert m.deflated_sharpe_ratio(r, 0.0, 1) == pytest.approx(m.probabilistic_sharpe_ratio(r), abs=1e-15)
    dsr = [m.deflated_sharpe_ratio(r, 0.0, k) for k in (1, 2, 10, 100, 1000)]
    assert all(a > b for a, b in zip(dsr, dsr[1:])), dsr
    # The benchmark is raised by E[max] of N no-skill Sharpe estimates, whose spread is 1/sqrt(n-1).
    raised = 0.05 + m.expected_max_sharpe(10, 1 / math.sqrt(r.size - 1))
    assert m.deflated_sharpe_ratio(r, 0.05, 10) == pytest.approx(m.probabilistic_sharpe_ratio(r, raised), abs=1e-15)
    assert _is_nan(m.deflated_sharpe_ratio([0.01, 0.02], 0.0, 5))


# -- trading_metrics ---------------------------------------------------------------------------

KEYS = {"total_return", "annual_return", "annual_volatility", "sharpe", "sortino", "calmar",
        "max_drawdown", "max_drawdown_duration", "win_rate", "profit_factor", "average_win",
        "average_loss", "payoff_ratio", "expectancy", "n_trades", "average_bars_held", "exposure",
        "turnover", "commissions", "slippage", "psr", "final_equity"}


def test_trading_metrics_has_every_key_as_float() -> None:
    equity = np.array([100.0, 110.0, 99.0, 105.0, 120.0])
    positions = np.array([0, 1, 1, -1, 0])
    out = m.trading_metrics(equity, positions, [100.0, -50.0, 30.0, -20.0, 0.0], [3, 1, 10, 2, 4],
                            252.0, commissions=4.5, slippage=2)
    assert set(out) == KEYS
    assert all(type(v) is float for v in out.values()), {k: type(v) for k, v in out.items()}
    assert out["n_trades"] == 5.0 and out["final_equity"] == 120.0
    assert out["commissions"] == 4.5 and out["slippage"] == 2.0
    assert out["max_drawdown"] == pytest.approx(0.1) and out["max_drawdown_duration"] == 2.0
    assert out["total_return"] == pytest.approx(0.2)
    assert out["exposure"] == pytest.approx(0.6) and out["turnover"] == pytest.approx(4 / 5)
    assert out["profit_factor"] == pytest.approx(130 / 70)
    assert out["sharpe"] == pytest.approx(m.sharpe_ratio(m.equity_returns(equity), 252.0))


def test_trading_metrics_degenerate_is_still_all_floats() -> None:
    for equity in ([], [100.0], [100.0, 100.0]):
        out = m.trading_metrics(equity, [0] * len(equity), [], [], 252.0)
        assert set(out) == KEYS
        assert all(type(v) is float for v in out.values())
        assert out["n_trades"] == 0.0 and _is_nan(out["win_rate"]) and _is_nan(out["sharpe"])
    assert _is_nan(m.trading_metrics([], [], [], [], 252.0)["final_equity"])


def test_periods_per_year_from_bar_timestamps():
    """Session-aware annualisation: RTH minute bars 390/day, hourly 24/day on a 24h market,
    daily 252, weekly 52.18 (calendar time for bars slower than daily)."""
    import pandas as pd

    from mlproject.data import synthetic_bars
    from mlproject.metrics import periods_per_year

    rth_minutes = synthetic_bars(390 * 3, seed=0).index  # 09:31..16:00, three sessions
    assert periods_per_year(rth_minutes) == 390 * 252
    assert periods_per_year(rth_minutes[150:600]) == 390 * 252  # cut first and last session: 240 + 210 bars
    assert periods_per_year(rth_minutes[100:1000]) == 390 * 252  # 290, 390, 220
    five_minutes = synthetic_bars(78 * 3, seed=0, bar_minutes=5).index
    assert periods_per_year(five_minutes) == 78 * 252
    hourly_24h = pd.date_range("2024-01-01", periods=24 * 10, freq="h")
    assert periods_per_year(hourly_24h) == 24 * 252
    daily = pd.bdate_range("2024-01-01", periods=300)
    assert periods_per_year(daily) == 252.0
    weekly = pd.date_range("2024-01-05", periods=100, freq="W-FRI")
    assert periods_per_year(weekly) == pytest.approx(365.25 / 7)
