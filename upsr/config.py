"""Config sections of the model library (schedule, noise weighting, networks, losses, inference).

Plain dataclasses whose defaults are the paper's values (DESIGN §1); ``configs/tiny.yaml``
holds the tiny twin used by tests and CPU demos. Invalid values raise ``ValueError`` naming
the key; ``upsr.typed_config`` adds the file and section to the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
