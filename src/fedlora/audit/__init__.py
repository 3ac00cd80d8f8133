"""Empirical privacy audits (above the federation: they drive clients and the DP step).

``canaries``: the black-box one-run audit (canary sentences in one client, the global model scored);
``whitebox``: Dirac gradient canaries inserted at the DP step itself, scored on the released gradients;
``mutations``: the white-box audit against deliberately broken mechanisms (the mutation table).
The bound math stays in ``fedlora.privacy.audit``.
"""
