"""Settings of the dashboard service (env prefix DASHBOARD_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class DashboardSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DASHBOARD_", extra="ignore", populate_by_name=True)

    service = "dashboard"
    # Reads: the default and largest `days=` window, and how the per-ticker league tables are cut.
    default_days: int = 30
    max_days: int = 3650
    ticker_min_votes: int = 5  # a ticker needs this many votes to enter the top / bottom 10
    ticker_top_n: int = 10
    heatmap_max_tickers: int = 20  # the heatmap shows the tickers with the most votes
    # Anomaly alerts: the recent window's positive rate against the forecast from the `history_windows` before it
    # (trend and a cycle of `season_windows`: the weekday for daily windows); with less history than two cycles,
    # against the `baseline_windows` windows before it (two-proportion test).
    anomaly_window_s: float = 86_400.0
    anomaly_history_windows: int = 28  # 0: the two-window test only
    anomaly_season_windows: int = 7
    anomaly_baseline_windows: int = 7
    anomaly_min_votes: int = 20  # in the recent window, and in the baseline
    anomaly_alpha: float = 0.01  # one-sided, both tests
    anomaly_min_drop: float = 0.10  # and at least this many points lower (0.10 = 10 points)
    # Live stream: how often it looks for a change, and how often it sends a heartbeat comment.
    stream_poll_s: float = 1.0
    stream_heartbeat_s: float = 15.0


@lru_cache
def get_settings() -> DashboardSettings:
    return DashboardSettings()
