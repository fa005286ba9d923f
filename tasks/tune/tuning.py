"""TEMPORARY: the old ``tuning`` module's names that flows/seam.py still imports; delete at the issue 13 merge.

The search lives in ``space``, ``storage``, ``study``, ``objective`` and ``workers`` now.
"""

from forgeline.tasks.tune.space import apply_params as apply_params
from forgeline.tasks.tune.study import TuneResult as TuneResult
