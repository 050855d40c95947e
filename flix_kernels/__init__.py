"""flix_kernels: fused kernels for FLix, featurized low-rank mixtures (Lin et al., 2024).

Every discrete feature of an example (language, task, domain, ...) owns a low-rank update of
each adapted linear layer; an example uses the sum of its features' updates::

    y = W x + b + sum_{k in S(x)} s_k B_k A_k drop(x)

Public API: :class:`FeatureSpace`, :class:`Routing`, :func:`flix_linear`, :func:`flix_delta`,
:func:`available_backends`, :class:`FLixLinear`, :func:`inject`, :func:`set_routing`,
:func:`use_routing`, :func:`merge`, :func:`unmerge`, :func:`merge_and_unload`,
:func:`unload`, :func:`flix_layers`, :func:`save_adapters`,
:func:`load_adapters`, :func:`export_peft`, :func:`per_feature_optimizer`, :func:`info`, the ``FLIX_*``
environment switches in :mod:`flix_kernels.settings`; for transformers models
:func:`accept_feature_ids`, :class:`FeatureCollator`, :func:`generate`. OFA factorised
multilingual embeddings: the subpackage :mod:`flix_kernels.ofa` (``fk.ofa``).
"""

from . import settings

settings.kernel_switches()  # a malformed FLIX_* switch stops the import here, naming the variable

from .backends import BackendUnavailableError, available_backends  # noqa: E402
from .features import FeatureSpace  # noqa: E402
from .routing import Routing  # noqa: E402
from .ops import flix_delta, flix_linear  # noqa: E402
from .nn import FLixLinear  # noqa: E402
from .model import flix_layers, inject, merge, merge_and_unload, set_routing, unload, unmerge, use_routing  # noqa: E402
from .serialization import load_adapters, save_adapters  # noqa: E402
from .optim import per_feature_optimizer  # noqa: E402
from .integrations.peft import export_peft, flix_lora_config, from_peft_adapters, load_flix_peft  # noqa: E402
from .integrations.transformers import FeatureCollator, accept_feature_ids, generate  # noqa: E402
from ._info import info  # noqa: E402
from . import ofa  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FeatureCollator",
    "FLixLinear",
    "FeatureSpace",
    "Routing",
    "accept_feature_ids",
    "available_backends",
    "export_peft",
    "flix_delta",
    "flix_layers",
    "flix_linear",
    "flix_lora_config",
    "from_peft_adapters",
    "generate",
    "info",
    "inject",
    "load_adapters",
    "load_flix_peft",
    "merge",
    "merge_and_unload",
    "per_feature_optimizer",
    "ofa",
    "save_adapters",
    "set_routing",
    "unload",
    "unmerge",
    "use_routing",
    "__version__",
]
