"""Config: one YAML into typed objects, env overrides, var/ root overridable, no I/O at import."""

from __future__ import annotations

import subprocess
import sys
from datetime import time
from pathlib import Path

import pytest

from sofare.config import ConfigError, interval_delta, load_config


def test_defaults_are_typed():
    cfg = load_config(env={})
    assert cfg.market.symbol == "BTCUSDT" and cfg.market.interval == "1h"
    assert cfg.safe_haven.tickers["^GSPC"].close == time(16, 0)
    assert cfg.macro.series["CPIAUCSL"].kind == "index"
    assert cfg.features.warmup_bars >= 100
    assert cfg.var_dir == (cfg.root / "var").resolve()
    assert cfg.default_warehouse_url == f"sqlite:///{cfg.var_dir / 'warehouse.db'}"


def test_env_overrides_nested_keys_with_yaml_types(tmp_path):
    cfg = load_config(
        env={
            "SOFARE_WAREHOUSE__URL": "postgresql://u@h/db",
            "SOFARE_SOURCES__BINANCE__PAGE_LIMIT": "500",
            "SOFARE_FEATURES__RETURN_LAGS": "[1, 2]",
            "SOFARE_PATHS__VAR": str(tmp_path / "elsewhere"),
            "SOFARE_market__interval": "5m",
        }
    )
    assert cfg.warehouse.url == "postgresql://u@h/db"
    assert cfg.sources.binance.page_limit == 500
    assert cfg.features.return_lags == [1, 2]
    assert cfg.var_dir == tmp_path / "elsewhere"
    assert cfg.market.interval == "5m"


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="SOFARE_WAREHOUS__URL: unknown config key 'warehous'"):
        load_config(env={"SOFARE_WAREHOUS__URL": "x"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SOFARE_MARKET__INTERVAL": "7m"}, "market.interval: .*unknown interval '7m'"),
        ({"SOFARE_SOURCES__BINANCE__PAGE_LIMIT": "5000"}, "sources.binance.page_limit"),
        ({"SOFARE_INGEST__RETRIES": "1"}, "ingest.retries"),
        ({"SOFARE_MARKET__SYMBOL": "BTC/USDT"}, "market.symbol"),
    ],
)
def test_invalid_values_name_the_key(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("paths: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})


def test_extra_keys_in_file_are_rejected(tmp_path):
    text = Path(load_config(env={}).root / "include/config/sofare.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("market:\n", "market:\n  colour: blue\n", 1))
    with pytest.raises(ConfigError, match="market.colour"):
        load_config(path, env={})


def test_interval_delta():
    assert interval_delta("15m").total_seconds() == 900
    with pytest.raises(ConfigError, match="unknown interval '2w'"):
        interval_delta("2w")


def test_importing_the_package_does_no_io(tmp_path):
    """With the config file missing, importing every module still works; only load_config fails."""
    code = (
        "import sofare.config, sofare.data.warehouse, sofare.data.features, sofare.data.ingest, sofare.data.sources, sofare.cli\n"
        "import sofare.config as c\n"
        "try:\n    c.load_config()\nexcept c.ConfigError as e:\n    print('LOAD FAILS', e)\n"
    )
    env = {"SOFARE_CONFIG": str(tmp_path / "missing.yaml"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "LOAD FAILS config file not found" in out.stdout
