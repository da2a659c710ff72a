"""The operate half's last stage: prediction outcomes, live quality, Evidently drift, severity -> action,
the monitor page's figures, and the replay that proves the loop on history. May import every stage before
it; Evidently is imported inside the functions that need it (its cold import takes seconds)."""
