"""The operate half's first stage: the nginx front door, the stable/canary serving processes, canary analysis and
rollback. May import every stage before it (data, validation, training, registry, serving) and the top-level
config/errors/contracts; nothing imports it but tasks, cli and orchestration."""
