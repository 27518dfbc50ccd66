"""Old home of the public functions, kept for one release: import them from ``zoo`` (or the modules named below).

``load_config`` lives in ``zoo.config_source``; ``build``, ``param_shapes`` and ``param_count`` in ``zoo.model``;
``init_params``, ``forward``, ``prefill``, ``step`` and ``init_decode_state`` (formerly ``init_state``) in
``zoo.runtime``; ``TokenError`` and the input checks in ``zoo.checks``. Nothing inside the zoo imports this module.
"""

from zoo.checks import TokenError, check_params, check_seed  # noqa: F401
from zoo.config import check_config  # noqa: F401
from zoo.config_source import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, ConfigSourceError, load_config  # noqa: F401
from zoo.model import Params, State, boxed_param_shapes, build, param_count, param_shapes  # noqa: F401
from zoo.runtime import forward, init_decode_state, init_params, prefill, step  # noqa: F401

init_state = init_decode_state
