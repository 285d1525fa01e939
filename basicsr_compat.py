"""The one place that lets basicsr 1.4.2 import on current torchvision.

basicsr imports ``torchvision.transforms.functional_tensor``, which torchvision renamed to
``_functional_tensor``. Import this module before any ``basicsr`` import.
"""

import sys

import torchvision.transforms._functional_tensor as _functional_tensor

sys.modules.setdefault("torchvision.transforms.functional_tensor", _functional_tensor)
