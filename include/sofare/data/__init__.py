"""Stage 1, data: the market sources (Binance, Yahoo Finance, FRED, the embedded sample), ingestion
with its quality checks, the warehouse (every table, its upserts and its validation marks), the
visibility rules of the as-of joins, the one feature function, warehouse reports, and alerts.

May import: config, errors, contracts. Imported by every later stage.
"""
