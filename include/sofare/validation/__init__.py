"""Stage 2, validation: the Great Expectations suites (expectations/) run over warehouse intervals,
their results as `validation_runs` rows and per-day marks, Data Docs, and the rule that training reads
only validated days (`require_validated`).

May import: data, and config, errors, contracts. GX is imported inside functions (cold import ~6 s).
"""

SUITES = ("candles", "safe_haven_bars", "macro_observations", "features")  # one per table, in expectations/
