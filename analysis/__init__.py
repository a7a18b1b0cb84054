"""dpledger.analysis: pure numeric code. Imports no other project package.

RDP of the sampled Gaussian (``rdp``, ``grid``), the one composition path
(``composition``), budget and steps-from-epochs (``budget``), the gla rule (``gla``),
fills between checkpoints (``fits`` and its ``fill_*`` methods), correlations,
charts and the report's HTML (``html_report``).
"""
