"""dataward: train and serve diffusion models that protect their training data.

The public API: :class:`Ward` (create/open, train, sample, forget, verify, add, status), :class:`TrainConfig`,
:class:`DPConfig`, :class:`GuardConfig`, and data sources via :func:`load_source`.
"""

__version__ = "0.1.0"

from dataward import numerics, openmp  # noqa: E402  (first: pin the CPU kernels and the threads' waiting before torch loads)

numerics.select_from_environment()
openmp.select_from_environment()

from dataward.data import Dataset, load_source  # noqa: E402
from dataward.errors import DatawardError  # noqa: E402
from dataward.models.guard import GuardConfig  # noqa: E402
from dataward.training.privacy import DPConfig  # noqa: E402
from dataward.training.loop import TrainConfig  # noqa: E402
from dataward.ward import SampleResult, Ward, WardConfig  # noqa: E402

__all__ = ["Ward", "WardConfig", "SampleResult", "TrainConfig", "DPConfig", "GuardConfig", "Dataset", "load_source", "DatawardError", "__version__"]
