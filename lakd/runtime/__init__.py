"""Process-level helpers, the floor every other layer may import: distributed set-up and collectives
(``distributed``), device resolution (``device``), seeding and RNG state (``seeding``),
OpenMP's wait policy set before torch loads (``threads``), progress bars on a terminal (``progress``).

Nothing here imports from models, data, distillers, engine, analysis or cli.
"""
