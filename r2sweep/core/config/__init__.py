"""The configuration: every section of a trial or search-space file, loaded strictly.

``sections`` holds the strict dataclass loader and the train/r2 sections,
``trial`` the trial file (data, model, train, r2, downstream, proxy),
``sweep`` the search-space file (objective, search, sweep), ``consistency``
the checks that span sections, ``strict_yaml`` the YAML reader that refuses
duplicate keys and YAML 1.1 surprises.
"""
